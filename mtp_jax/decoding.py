"""The decoding engine: a fixed-capacity KV cache, plain and self-speculative decoding loops with
the MTP heads (chains and trees), compiled once per prompt bucket. generate.py is its command line.

Plain decoding runs head 1's path, which for every head type is the decoder's n_layers blocks,
final norm and unembedding. Each mode is one compiled program per prompt bucket (the prompt is
padded to a power of two): the prefill, then a `lax.while_loop` of decoding steps on the device,
so nothing recompiles per token and the host waits only for the finished output.

Self-speculative decoding (Stern et al. 2018; Gloeckle et al. 2024, §3.2): at the last committed
position head 1 gives the next token and heads 2 … n draft the n - 1 after it. One forward pass
over that block verifies the drafts (speculative.py: a chain or a Medusa tree; greedy, or
rejection sampling that keeps plain sampling's distribution); the accepted drafts are committed
with head 1's own next token after them, and the same pass already holds every head's drafts at
that position, so each pass both verifies and drafts. Rolling the cache back is resetting the
index: attention reads only slots <= the query's position (a tree's nodes: the committed slots
and their ancestors'), stale slots are overwritten before they are read, and a tree's accepted
path is first moved to consecutive slots. Heads that read the previous head's tokens
(heads.HeadType.reads_previous_draft: 'sequential') draft module by module as in DeepSeek-V3:
module 2 reads the token committed after each position, module k > 2 module k-1's draft (its
argmax; at the last committed position, the draft itself). With context drafts (`lookup`), a
pass after which the text's last tokens occurred before verifies what followed them there
instead (speculative.lookup_draft), searched on the device inside the same program, and after
copies accepted whole in a row longer ones (speculative.copy_chains). A pass's size follows its
drafts: an outer loop runs a loop of the heads' chains while nothing is copied, then a loop of
each copy length while copies of that length are drafted. On XLA-CPU a branch between the
sizes (lax.cond) copies the KV caches every pass; a while loop updates them in place.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import speculative
from mtp_jax.decode_result import Result
from mtp_jax.errors import UserError
from mtp_jax.mtp import MTPModel
from mtp_jax.speculative import Tree


class Sampling(NamedTuple):
    """How the next token is chosen from logits; a static argument of the compiled programs."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    top_p: float = 1.0  # sample within this probability mass (nucleus)


class Carry(NamedTuple):
    """The state of self-speculative decoding's device loop from one verify pass to the next."""

    count: jax.Array  # tokens committed
    passes: jax.Array  # verify passes run
    block: jax.Array  # [tree.size]: the certain token, then the drafts to verify
    q: jax.Array  # [n - 1, V]: the drafts' distributions (sampling)
    caches: list
    tokens: jax.Array  # [capacity + depth + 1]: the prompt and the committed tokens, at their positions
    accepted: jax.Array  # [capacity]: drafts accepted by each pass
    overlaps: jax.Array  # [capacity, n - 1]: each pass's Σ_x min(p, q) per draft position (sampling)
    level: jax.Array  # int32: 0, block's drafts are the heads'; j >= 1, copied (speculative.copy_chains()[j - 1])


# ---------------------------------------------------------------------------------------------
# Caches and compiled steps
# ---------------------------------------------------------------------------------------------


def init_caches(model: MTPModel, batch: int, size: int, all_heads: bool) -> list[dict]:
    """Zeroed caches [B·N_kv, size, H]: the trunk's layers, then (all_heads) one per head block.

    For every head type the first n_layers entries are the decoder's layers in order, the path
    of plain decoding."""
    shape = model.decoder.shape
    n_blocks = (
        len(model.trunk_layers) + sum(model.head_type.has_block(k) for k in range(1, model.n_predict + 1))
        if all_heads
        else shape.n_layers
    )
    kv = (batch * shape.kv_heads, size, shape.head_dim)
    # Separate buffers per layer (stacked layers: one [L, ...] buffer): the steps donate (update in
    # place) every one of them.
    return model.decoder.stack_caches(
        [{"k": jnp.zeros(kv, shape.dtype), "v": jnp.zeros(kv, shape.dtype)} for _ in range(n_blocks)]
    )


def _positions(tokens: jax.Array, index) -> jax.Array:
    return index + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def plain_step(model: MTPModel, tokens, caches, index, last, key, sampling: Sampling):
    """Run tokens [B, t] at positions index … index + t - 1 through the decoder's layers.

    Returns head 1's choice [B] and its log-probability after position index + last, and the
    caches. The sampling key is folded with that position, so a seed fixes every draw."""
    decoder = model.decoder
    h, caches = decoder.run_blocks(
        decoder.embed(tokens), _positions(tokens, index), range(decoder.shape.n_layers), caches, index
    )
    logits = model.logits(1, h[:, last])
    token = choose(logits, jax.random.fold_in(key, index + last), sampling)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    return token, logprob, caches


def _decode_plain(graphdef, capacity, sampling: Sampling, params, prompt, length, limit, key):
    """The whole of plain decoding as one program: prefill prompt [1, P] (its first `length`
    tokens are real), then `limit` - 1 single-token steps in a device loop. Returns the new
    tokens [capacity] and their log-probabilities [capacity] (the first `limit` are valid)."""
    model = nnx.merge(graphdef, params)
    caches = init_caches(model, 1, capacity, all_heads=False)
    token, logprob, caches = plain_step(model, prompt, caches, 0, length - 1, key, sampling)
    tokens = jnp.zeros(capacity, jnp.int32).at[0].set(token[0])
    logprobs = jnp.zeros(capacity, jnp.float32).at[0].set(logprob[0])

    def step(i, carry):  # token i - 1 sits at position length + i - 1
        token, caches, tokens, logprobs = carry
        token, logprob, caches = plain_step(model, token[:, None], caches, length + i - 1, 0, key, sampling)
        return token, caches, tokens.at[i].set(token[0]), logprobs.at[i].set(logprob[0])

    _, _, tokens, logprobs = jax.lax.fori_loop(1, limit, step, (token, caches, tokens, logprobs))
    return tokens, logprobs


def _speculate(model: MTPModel, tree: Tree, sampling: Sampling, tokens, positions, caches, index, mask, key, commit):
    """Run tokens [1, T] through the trunk and every head, commit, and draft the next block.

    commit(head 1's hidden states [T, D], key) returns (last: the node after which the next certain
    token follows, successors [T]: the token committed after each node (what 'sequential'
    module 2 reads there; DeepSeek-V3's x[t + 1]), that certain token, extra outputs). Heads
    2 … n then draft at `last`; where head k + 1 reads head k's tokens (reads_previous_draft),
    it reads head k's draft there and its argmax elsewhere. Returns (the next block [tree.size],
    the drafts' distributions q [n - 1, V] (sampling), the caches, extra)."""
    commit_key, draft_key = jax.random.split(key)
    n_trunk = model.decoder.cache_entries(model.trunk_layers)
    h_trunk, new_caches = model.trunk(tokens, positions, caches[:n_trunk], index, mask)
    head_caches = iter(caches[n_trunk:])
    h, inputs, candidates, q = h_trunk, None, [], []
    for k in range(1, model.n_predict + 1):
        cache = next(head_caches) if model.head_type.has_block(k) else None
        h, cache = model.head_hidden(k, h_trunk, h, inputs, positions, cache, index, mask)
        if cache is not None:
            new_caches.append(cache)
        if k == 1:
            last, successors, token, extra = commit(h[0], commit_key)
            inputs = successors[None]
            continue
        # Module k + 1 reads module k's argmax at every position; a greedy chain's draft is one of them.
        read_next = model.head_type.reads_previous_draft and k < model.n_predict
        everywhere = model.head_type.top_tokens(model, k, h[0])[:, 0] if read_next else None
        if sampling.temperature == 0:  # the top candidates (q is read only by rejection sampling)
            if read_next and tree.max_rank == 1:
                draft = everywhere[last][None]
            else:
                draft = model.head_type.top_tokens(model, k, h[0, last], tree.max_rank)
            chosen, q_k = draft[0], jnp.zeros(model.decoder.shape.vocab_size)
        else:
            chosen, q_k = speculative.sample_draft(
                model.logits(k, h[0, last]), jax.random.fold_in(draft_key, k), *sampling
            )
            draft = chosen[None]
        if read_next:
            inputs = everywhere.at[last].set(chosen)[None]
        candidates.append(draft)
        q.append(q_k)
    return tree.block(token, jnp.stack(candidates)), jnp.stack(q), new_caches, extra


def _decode_speculative(
    graphdef, capacity, tree: Tree, sampling: Sampling, lookup: int, params, prompt, length, limit, key
):
    """The whole of self-speculative decoding as one program (a device loop over verify passes,
    so the host never waits between passes). Greedy (temperature 0) verifies `tree`; sampling
    verifies a chain by rejection sampling. With `lookup` > 0 (greedy; `tree` is the longest
    of speculative.copy_chains), a pass whose context ends in tokens seen before verifies the
    tokens that followed them there (speculative.lookup_draft) in a copy chain of its level,
    and other passes the heads' chain alone: each size has its own loop, so no pass verifies
    more rows than it has drafts. Returns the new tokens [capacity + depth + 1] (the first
    `limit` are valid), the number of verify passes, how many drafts each accepted [capacity]
    and each draft position's Σ_x min(p, q) [capacity, n - 1] (sampling; the first `passes` rows
    are valid)."""
    model = nnx.merge(graphdef, params)
    # A verify pass at the last committed position writes tree.size slots from it.
    caches = init_caches(model, 1, capacity + tree.size, all_heads=True)

    def commit_prompt(h, key):  # head 1's logits after the prompt's last token alone
        token = choose(model.logits(1, h[length - 1][None]), key, sampling)[0]
        successors = jnp.concatenate([prompt[0, 1:], prompt[0, :1]]).at[length - 1].set(token)
        return length - 1, successors, token, ()

    block, q, caches, _ = _speculate(
        model,
        tree,
        sampling,
        prompt,
        _positions(prompt, 0),
        caches,
        0,
        None,
        jax.random.fold_in(key, length - 1),
        commit_prompt,
    )

    def more(carry: Carry):  # a pass pays only if at least two tokens are still wanted
        return carry.count + 1 < limit

    size = capacity + tree.max_depth + 1
    tokens = jax.lax.dynamic_update_slice(jnp.zeros(size, jnp.int32), prompt[0, :size], (0,))
    level = jnp.int32(0)
    if lookup:
        block, found = speculative.lookup_draft(tokens.at[length].set(block[0]), length, block)
        level = found.astype(jnp.int32)
    carry = Carry(
        jnp.int32(0),
        jnp.int32(0),
        block,
        q,
        caches,
        tokens,
        jnp.full(capacity, -1, jnp.int32),
        jnp.zeros((capacity, model.n_predict - 1), jnp.float32),
        level,
    )

    def passes(tree: Tree, levels=None):  # verify passes of `tree` while more() (and carry.level in levels)
        body = functools.partial(verify_pass, model, tree, sampling, length, key, lookup=lookup > 0)
        go = more if levels is None else lambda c: more(c) & jnp.any(c.level == jnp.asarray(levels))
        return lambda carry: jax.lax.while_loop(go, body, carry)

    if lookup:  # each pass as long as its drafts: the heads' or a copy of its level
        chains = [Tree.chain(model.n_predict - 1), *speculative.copy_chains(lookup, model.n_predict)]
        loops = [passes(c, [j for j, same in enumerate(chains) if same == c]) for c in dict.fromkeys(chains)]
        done = jax.lax.while_loop(more, lambda carry: functools.reduce(lambda c, loop: loop(c), loops, carry), carry)
    else:
        done = passes(tree)(carry)
    tokens = jax.lax.dynamic_update_slice(done.tokens, done.block[:1], (length + done.count,))  # the last certain one
    new_tokens = jax.lax.dynamic_slice(jnp.pad(tokens, (0, size)), (length,), (size,))
    return new_tokens, done.passes, done.accepted, done.overlaps


def verify_pass(
    model: MTPModel, tree: Tree, sampling: Sampling, length, key, carry: Carry, lookup: bool = False
) -> Carry:
    """One verify pass of self-speculative decoding (the device loop's body): run the block
    drafted last time (its first tree.size tokens) through the trunk and every head, accept its
    longest agreeing path (greedy) or rejection-sample a chain (sampling), commit it, and draft
    the next block (with lookup, as long as carry.block, copied from the context where it can be)."""
    count, passes, drafted, q, caches, tokens, accepted, overlaps, level = carry
    block = drafted[: tree.size]
    n, size, sampled = model.n_predict, tree.size, sampling.temperature > 0
    base = length + count

    def commit(h, key):  # h: [size, D], head 1 after each node
        if sampled:
            p = jax.nn.softmax(speculative.filter_logits(model.logits(1, h), *sampling), axis=-1)
            a, token, overlap = speculative.accept_sampled(block, p, q, key)
            path = jnp.arange(size)
        else:
            greedy = model.head_type.top_tokens(model, 1, h)[:, 0]
            path, a = speculative.accept_greedy(tree, block, greedy)
            token, overlap = greedy[path[-1]], jnp.zeros(n - 1)
        # After each accepted node, the next node on the path (then the certain token).
        successors = jnp.full(size, token)
        for d in range(tree.max_depth):
            successors = successors.at[path[d]].set(jnp.where(d < a, block[path[d + 1]], token))
        return path[a], successors, token, (path, a, overlap)

    mask = None if tree.is_chain else tree.mask(base, caches[0]["k"].shape[1])
    positions = base + jnp.asarray(tree.depths)[None]
    next_block, q, caches, (path, a, overlap) = _speculate(
        model, tree, sampling, block[None], positions, caches, base, mask, jax.random.fold_in(key, base), commit
    )
    if not tree.is_chain:
        caches = speculative.compact(caches, base, path)
    # Commit the path (its tail past the accepted drafts is overwritten by the next pass).
    tokens = jax.lax.dynamic_update_slice(tokens, block[path[: tree.max_depth + 1]], (base,))
    if lookup:  # the context now ends with the next certain token, at base + a + 1
        next_block = jnp.pad(next_block, (0, drafted.shape[0] - size), mode="edge")  # as Tree.block lengthens
        next_block, found = speculative.lookup_draft(
            tokens.at[base + a + 1].set(next_block[0]), base + a + 1, next_block
        )
        level = speculative.next_copy_level(found, level, a == size - 1)
    return Carry(
        count + a + 1,
        passes + 1,
        next_block,
        q,
        caches,
        tokens,
        accepted.at[passes].set(a),
        overlaps.at[passes].set(overlap),
        level,
    )


def choose(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token [B] from logits [B, V]: greedy at temperature 0, else sampled."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, speculative.filter_logits(logits, *sampling), axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


class Generator:
    """Compiled decoding of one model with a KV cache of `capacity` positions (prompt + output).

    Each mode is one compiled program per prompt-length bucket: prefill and every decoding step
    run on the device, and the host only reads the result. Programs are compiled ahead of their
    first run, so a Result reports compiling and decoding apart."""

    def __init__(self, model: MTPModel, capacity: int):
        self.model, self.capacity, self.n = model, capacity, model.n_predict
        self.graphdef, self.params = nnx.split(model.for_decoding())
        self._programs = {
            "plain": jax.jit(functools.partial(_decode_plain, self.graphdef, capacity), static_argnums=0),
            "speculative": jax.jit(
                functools.partial(_decode_speculative, self.graphdef, capacity), static_argnums=(0, 1, 2)
            ),
        }
        self._compiled: dict[tuple, jax.stages.Compiled] = {}  # (mode, static args, prompt shape) -> program

    def use(self, params) -> None:
        """Decode with `params` (of the same model graph) from now on: the compiled programs stay."""
        _, self.params = nnx.split(nnx.merge(nnx.graphdef(self.model), params).for_decoding())

    def compilations(self) -> int:
        """How many programs have been compiled so far (one per mode and prompt bucket)."""
        return len(self._compiled)

    def _run(self, mode: str, static: tuple, prompt: jax.Array, *args) -> tuple[tuple, float, float]:
        """(outputs on the host, seconds compiling, seconds running) of mode's program for
        `static` and the prompt's bucket, compiled at its first use."""
        key, begin = (mode, static, prompt.shape), time.perf_counter()
        if key not in self._compiled:
            self._compiled[key] = self._programs[mode].lower(*static, self.params, prompt, *args).compile()
        compiled = time.perf_counter()
        outputs = jax.device_get(self._compiled[key](self.params, prompt, *args))
        return outputs, compiled - begin, time.perf_counter() - compiled

    def _prompt(self, prompt: list[int], max_new_tokens: int) -> tuple[jax.Array, int]:
        """The prompt [1, P] padded to a power of two (so prompts of similar length share one
        compilation; the padding writes cache slots that are overwritten before they are read),
        and how many tokens to generate."""
        if not 0 < len(prompt) < self.capacity:
            raise UserError(
                f"the prompt has {len(prompt)} tokens but the cache holds {self.capacity}: "
                "shorten the prompt or raise --cache_len (it must leave room for new tokens)"
            )
        padded = min(max(16, 1 << (len(prompt) - 1).bit_length()), self.capacity)
        return jnp.asarray([prompt + [0] * (padded - len(prompt))], jnp.int32), min(
            max_new_tokens, self.capacity - len(prompt)
        )

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Result:
        """Plain decoding: one forward pass per token, until max_new_tokens or the cache's end."""
        padded, limit = self._prompt(prompt, max_new_tokens)
        sampling = Sampling(temperature, top_k, top_p)
        (tokens, logprobs), compiling, decoding = self._run(
            "plain", (sampling,), padded, len(prompt), limit, jax.random.key(seed)
        )
        return Result(
            tokens[:limit].tolist(),
            limit,
            [],
            logprobs[:limit].tolist(),
            compile_seconds=compiling,
            decode_seconds=decoding,
        )

    def speculative(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        tree: Tree | None = None,
        lookup: int = 0,
    ) -> Result:
        """Self-speculative decoding: greedy (temperature 0) gives the same tokens as
        generate(temperature=0), with a chain of drafts or a `tree`; sampling verifies a chain by
        rejection sampling, so its tokens are distributed exactly as generate's with the same
        settings (but are not the same draws). lookup > 0 (greedy): where the context's last
        tokens occurred before, a pass verifies the max(n - 1, lookup) tokens that followed them
        there (speculative.lookup_draft), after copies accepted whole in a row twice or four
        times as many rows (speculative.copy_chains); elsewhere the heads' chain."""
        if self.n == 1:
            raise UserError(
                "the model has no extra heads to draft with (it was trained with mtp_n_tokens=1): "
                "drop --speculative, or train with --config.use_mtp=True --config.mtp_n_tokens=4"
            )
        speculative.check_drafting(tree is not None and not tree.is_chain, lookup, temperature)
        tree = speculative.copy_chains(lookup, self.n)[-1] if lookup else tree or Tree.chain(self.n - 1)
        if tree.max_depth > self.n - 1 and not lookup:
            raise UserError(f"the tree is {tree.max_depth} drafts deep but the model has {self.n - 1} draft heads")
        padded, limit = self._prompt(prompt, max_new_tokens)
        sampling = Sampling(temperature, top_k, top_p)
        (tokens, passes, accepted, overlaps), compiling, decoding = self._run(
            "speculative", (tree, sampling, lookup), padded, len(prompt), limit, jax.random.key(seed)
        )
        return Result(
            tokens[:limit].tolist(),
            1 + int(passes),
            accepted[:passes].tolist(),
            overlaps=overlaps[:passes].tolist(),
            compile_seconds=compiling,
            decode_seconds=decoding,
        )


def sample(
    model: MTPModel,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Continue one prompt token by token; returns the new token ids."""
    generator = Generator(model, len(prompt) + max_new_tokens)
    return generator.generate(prompt, max_new_tokens, temperature, top_k, top_p, seed).tokens
