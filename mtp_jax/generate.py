"""Decoding with a fixed-capacity KV cache, plain or self-speculative with the MTP heads.

    python -m mtp_jax.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=N] [--temperature=T]
        [--top_k=K] [--top_p=P] [--seed=S] [--speculative] [--json]
    python -m mtp_jax.generate --workdir=DIR --benchmark [--prompts=10 --prompt_len=128 …]

Plain decoding runs head 1's path, which for every head type is the decoder's n_layers blocks,
final norm and unembedding. Each mode is one compiled program per prompt bucket (the prompt is
padded to a power of two): the prefill, then a `lax.while_loop` of decoding steps on the device,
so nothing recompiles per token and the host waits only for the finished output.

Self-speculative greedy decoding (Stern et al. 2018; Gloeckle et al. 2024, §3.2): at the last
committed position head 1 gives the next token for certain and heads 2 … n draft the n - 1
after it. One forward pass over [certain token, drafts] verifies the drafts against head 1's
greedy choice at each position; the longest agreeing prefix is committed together with head 1's
own next token there, and the same pass already holds every head's drafts at that position, so
each pass both verifies and drafts. Rolling the cache back is resetting the index: attention
reads only slots <= the query's position, and stale slots are overwritten before they are read.
'sequential' heads draft module by module as in DeepSeek-V3: module k reads the embedding of
module k-1's greedy token at the same position (at committed positions, module 2 thus sees the
true next token).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax.cli import fail
from mtp_jax.errors import UserError
from mtp_jax.mtp import MTPModel

# ---------------------------------------------------------------------------------------------
# Caches and compiled steps
# ---------------------------------------------------------------------------------------------


def head_has_block(model: MTPModel, k: int) -> bool:
    """Whether head k owns a transformer block (and so a KV cache of its own)."""
    return model.head_type == "parallel" or (model.head_type == "sequential" and k > 1)


def init_caches(model: MTPModel, batch: int, size: int, all_heads: bool) -> list[dict]:
    """Zeroed caches [B·N, size, H]: the trunk's layers, then (all_heads) one per head block.

    For every head type the first n_layers entries are the decoder's layers in order, the path
    of plain decoding."""
    shape = model.decoder.shape
    n_blocks = (len(model.trunk_layers) + sum(head_has_block(model, k) for k in range(1, model.n_tokens + 1))
                if all_heads else shape.n_layers)
    kv = (batch * shape.n_heads, size, shape.head_dim)
    # Separate buffers per layer (stacked layers: one [L, ...] buffer): the steps donate (update in
    # place) every one of them.
    return model.decoder.stack_caches([{"k": jnp.zeros(kv, shape.dtype), "v": jnp.zeros(kv, shape.dtype)}
                                       for _ in range(n_blocks)])


def _positions(tokens: jax.Array, index) -> jax.Array:
    return index + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def _head_logits(model: MTPModel, k: int, h: jax.Array) -> jax.Array:
    """Head k's float32 logits [..., V] from its hidden state [..., D]."""
    return jnp.dot(model.decoder.final_norm(h), model.head_matrix(k), preferred_element_type=jnp.float32)


def _plain_step(model: MTPModel, tokens, caches, index, last, key, settings: dict):
    """Run tokens [B, t] at positions index … index + t - 1 through the decoder's layers.

    Returns head 1's choice [B] and its log-probability after position index + last, and the
    caches. The sampling key is folded with that position, so a seed fixes every draw."""
    decoder = model.decoder
    h, caches = decoder.run_blocks(decoder.embed(tokens), _positions(tokens, index),
                                   range(decoder.shape.n_layers), caches, index)
    logits = _head_logits(model, 1, h[:, last])
    token = choose(logits, jax.random.fold_in(key, index + last), **settings)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    return token, logprob, caches


def _heads_step(model: MTPModel, tokens, caches, index):
    """Run tokens [B, t] through the trunk and every head; returns each head's greedy token at
    every position [n, B, t] (head k's at position p guesses the token at p + k) and the caches."""
    positions = _positions(tokens, index)
    n_trunk = model.decoder.cache_entries(model.trunk_layers)
    h_trunk, new_caches = model.trunk(tokens, positions, caches[:n_trunk], index)
    head_caches = iter(caches[n_trunk:])
    h, greedy = h_trunk, []
    for k in range(1, model.n_tokens + 1):
        cache = next(head_caches) if head_has_block(model, k) else None
        # 'sequential' module k reads x[t + k - 1]: module k-1's greedy token at the same position.
        h, cache = model.head_hidden(k, h_trunk, h, greedy[-1] if greedy else None, positions, cache, index)
        if cache is not None:
            new_caches.append(cache)
        greedy.append(jnp.argmax(_head_logits(model, k, h), axis=-1).astype(jnp.int32))
    return jnp.stack(greedy), new_caches


def _decode_plain(graphdef, capacity, settings, params, prompt, length, limit, key):
    """The whole of plain decoding as one program: prefill prompt [1, P] (its first `length`
    tokens are real), then `limit` - 1 single-token steps in a device loop. Returns the new
    tokens [capacity] and their log-probabilities [capacity] (the first `limit` are valid)."""
    model, settings = nnx.merge(graphdef, params), dict(settings)
    caches = init_caches(model, 1, capacity, all_heads=False)
    token, logprob, caches = _plain_step(model, prompt, caches, 0, length - 1, key, settings)
    tokens = jnp.zeros(capacity, jnp.int32).at[0].set(token[0])
    logprobs = jnp.zeros(capacity, jnp.float32).at[0].set(logprob[0])

    def step(i, carry):  # token i - 1 sits at position length + i - 1
        token, caches, tokens, logprobs = carry
        token, logprob, caches = _plain_step(model, token[:, None], caches, length + i - 1, 0, key, settings)
        return token, caches, tokens.at[i].set(token[0]), logprobs.at[i].set(logprob[0])

    _, _, tokens, logprobs = jax.lax.fori_loop(1, limit, step, (token, caches, tokens, logprobs))
    return tokens, logprobs


def _decode_speculative(graphdef, capacity, params, prompt, length, limit):
    """The whole of self-speculative greedy decoding as one program (a device loop over verify
    passes, so the host never waits between passes). Returns the new tokens [capacity + n] (the
    first `limit` are valid), the number of verify passes, and how many drafts each accepted
    [capacity] (the first `passes` are valid)."""
    model = nnx.merge(graphdef, params)
    n = model.n_tokens
    # A verify pass at the last committed position writes n - 1 slots past it.
    caches = init_caches(model, 1, capacity + n - 1, all_heads=True)
    greedy, caches = _heads_step(model, prompt, caches, 0)
    block = greedy[:, 0, length - 1]  # [n]: head 1's certain next token, then the heads' drafts

    def more(carry):  # a pass pays only if at least two tokens are still wanted
        return carry[0] + 1 < limit

    def verify(carry):
        count, passes, block, caches, tokens, accepted = carry
        # Commit the certain token (and, provisionally, the drafts) at `count`; the first
        # position the pass rejects is overwritten by the next block.
        tokens = jax.lax.dynamic_update_slice(tokens, block, (count,))
        greedy, caches = _heads_step(model, block[None], caches, length + count)
        greedy = greedy[:, 0]  # [n heads, n positions]
        # Head 1 after position j must agree with the draft at j + 1, for every j before it.
        a = jnp.sum(jnp.cumprod(greedy[0, :n - 1] == block[1:]))
        return count + a + 1, passes + 1, greedy[:, a], caches, tokens, accepted.at[passes].set(a)

    carry = (jnp.int32(0), jnp.int32(0), block, caches, jnp.zeros(capacity + n, jnp.int32),
             jnp.full(capacity, -1, jnp.int32))
    count, passes, block, _, tokens, accepted = jax.lax.while_loop(more, verify, carry)
    return jax.lax.dynamic_update_slice(tokens, block, (count,)), passes, accepted


def choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Next token [B] from logits [B, V]: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus (the top token is always kept).
        cutoff = jnp.take_along_axis(ordered, jnp.sum(cumulative < top_p, axis=-1, keepdims=True), axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    tokens: list[int]  # the new tokens
    forward_passes: int  # prefill included
    accepted: list[int]  # per verify pass, how many drafts were accepted (empty for plain decoding)
    logprobs: list[float] | None = None  # head 1's log-probability of each new token (plain decoding)

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per verify pass (1.0 for plain decoding)."""
        return 1.0 + float(np.mean(self.accepted)) if self.accepted else 1.0

    def acceptance(self, n: int) -> list[float | None]:
        """For each draft k = 2 … n, the fraction of verify passes that accepted it, among those
        that accepted drafts 2 … k-1 (None if no pass got that far)."""
        a = np.asarray(self.accepted)
        return [float(np.mean(a[a >= k - 2] >= k - 1)) if np.any(a >= k - 2) else None for k in range(2, n + 1)]


class Generator:
    """Compiled decoding of one model with a KV cache of `capacity` positions (prompt + output).

    Each mode is one compiled program per prompt-length bucket: prefill and every decoding step
    run on the device, and the host only reads the result."""

    def __init__(self, model: MTPModel, capacity: int):
        self.model, self.capacity, self.n = model, capacity, model.n_tokens
        graphdef, self.params = nnx.split(model)
        self._plain = jax.jit(functools.partial(_decode_plain, graphdef, capacity), static_argnums=0)
        self._speculative = jax.jit(functools.partial(_decode_speculative, graphdef, capacity))

    def compilations(self) -> int:
        """How many programs have been compiled so far (one per mode and prompt bucket)."""
        return self._plain._cache_size() + self._speculative._cache_size()

    def _prompt(self, prompt: list[int], max_new_tokens: int) -> tuple[jax.Array, int]:
        """The prompt [1, P] padded to a power of two (so prompts of similar length share one
        compilation; the padding writes cache slots that are overwritten before they are read),
        and how many tokens to generate."""
        if not 0 < len(prompt) < self.capacity:
            raise UserError(f"the prompt has {len(prompt)} tokens but the cache holds {self.capacity}: "
                            "shorten the prompt or raise --cache_len (it must leave room for new tokens)")
        padded = min(max(16, 1 << (len(prompt) - 1).bit_length()), self.capacity)
        return jnp.asarray([prompt + [0] * (padded - len(prompt))], jnp.int32), \
            min(max_new_tokens, self.capacity - len(prompt))

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0) -> Result:
        """Plain decoding: one forward pass per token, until max_new_tokens or the cache's end."""
        padded, limit = self._prompt(prompt, max_new_tokens)
        settings = (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
        tokens, logprobs = self._plain(settings, self.params, padded, len(prompt), limit, jax.random.key(seed))
        return Result(np.asarray(tokens)[:limit].tolist(), limit, [], np.asarray(logprobs)[:limit].tolist())

    def speculative(self, prompt: list[int], max_new_tokens: int) -> Result:
        """Self-speculative greedy decoding: the same tokens as generate(temperature=0)."""
        if self.n == 1:
            raise UserError("the model has no extra heads to draft with (it was trained with mtp_n_tokens=1): "
                            "drop --speculative, or train with --config.use_mtp=True --config.mtp_n_tokens=4")
        padded, limit = self._prompt(prompt, max_new_tokens)
        tokens, passes, accepted = jax.device_get(
            self._speculative(self.params, padded, len(prompt), limit))
        return Result(tokens[:limit].tolist(), 1 + int(passes), accepted[:passes].tolist())


def sample(model: MTPModel, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """Continue one prompt token by token; returns the new token ids."""
    generator = Generator(model, len(prompt) + max_new_tokens)
    return generator.generate(prompt, max_new_tokens, temperature, top_k, top_p, seed).tokens


# ---------------------------------------------------------------------------------------------
# Teacher-forced acceptance (evaluation)
# ---------------------------------------------------------------------------------------------


def _greedy_chunked(model: MTPModel, k: int, h: jax.Array, chunk_size: int) -> jax.Array:
    """Head k's argmax [B, T] from its hidden state [B, T, D], chunk_size positions at a time so
    that at most [B, chunk_size, V] logits exist at once (0: all positions together)."""
    b, t, d = h.shape
    c = chunk_size if 0 < chunk_size < t else t
    chunks = jnp.pad(h, ((0, 0), (0, (-t) % c), (0, 0))).reshape(b, -1, c, d).swapaxes(0, 1)
    greedy = jax.lax.map(lambda x: jnp.argmax(_head_logits(model, k, x), axis=-1), chunks)  # [chunks, B, c]
    return greedy.swapaxes(0, 1).reshape(b, -1)[:, :t]


@functools.partial(jax.jit, static_argnums=(0, 1))
def teacher_forced_acceptance(graphdef, chunk_size: int, params, window: jax.Array) -> dict:
    """Draft acceptance on real text, which greedy loops cannot inflate. window: [B, T + n].

    With the true tokens as context, head k's argmax at t is accepted when it equals head 1's
    argmax at t + k - 1 (DeepSeek-V3 and Megatron's metric). Returns 'acceptance_k' for k >= 2
    and 'mean_accepted', the expected tokens per verify pass: 1 + sum_k P(drafts 2 … k all
    accepted), over the positions where every head can be checked."""
    model = nnx.merge(graphdef, params)
    n, t = model.n_tokens, window.shape[1] - model.n_tokens
    positions = jnp.broadcast_to(jnp.arange(t), (window.shape[0], t))
    h_trunk, _ = model.trunk(window[:, :t], positions)
    h, greedy = h_trunk, []
    for k in range(1, n + 1):
        h, _ = model.head_hidden(k, h_trunk, h, window[:, k - 1:t + k - 1], positions)
        greedy.append(_greedy_chunked(model, k, h, chunk_size))
    metrics, prefix, expected = {}, True, 1.0
    for k in range(2, n + 1):
        agree = greedy[k - 1][:, :t - k + 1] == greedy[0][:, k - 1:]  # [B, T - k + 1]
        metrics[f"acceptance_{k}"] = jnp.mean(agree)
        prefix = prefix & agree[:, :t - n + 1]
        expected = expected + jnp.mean(prefix)
    metrics["mean_accepted"] = expected
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line: load a trained workdir, generate or benchmark
# ---------------------------------------------------------------------------------------------


def load(workdir: str):
    """(model, config, data) of the newest checkpoint in workdir, restored onto one device."""
    import ml_collections

    from mtp_jax import data as data_lib
    from mtp_jax.checkpoint import Checkpointer
    from mtp_jax.mtp import build_model

    workdir = pathlib.Path(workdir)
    checkpoints, config_path = workdir / "checkpoints", workdir / "config.json"
    checkpointer = Checkpointer(checkpoints, keep=1) if checkpoints.is_dir() else None
    step = checkpointer.latest_step() if checkpointer else None
    if step is None or not config_path.is_file():
        raise UserError(f"no checkpoint in {workdir}: train one first with "
                        f"python -m mtp_jax.main --config=configs/mtp4.py --workdir={workdir}")
    saved = json.loads(config_path.read_text())
    config = ml_collections.ConfigDict(saved)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config, saved["vocab_size"], seed=0)))
    # The whole train state onto one device, as saved (so that its fingerprint can be checked).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.manager.item_metadata(step)["state"])
    try:
        params = checkpointer.restore(step, target)["params"]
    except Exception as e:  # noqa: BLE001 — orbax raises many types for damaged or foreign files
        raise UserError(f"checkpoint {checkpoints / str(step)} does not load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}): retrain, or remove it to use the previous one") from None
    data = data_lib.prepare(config.data, show_progress=sys.stderr.isatty())
    return nnx.merge(graphdef, params), config, data


def compression_ratio(text: str) -> float:
    """zlib-compressed size / raw size of the UTF-8 text: low for repetitive text."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


def benchmark(model: MTPModel, config, data, *, prompts: int, prompt_len: int, new_tokens: int,
              cache_len: int) -> dict:
    """Plain greedy vs self-speculative decoding on held-out prompts (the validation split),
    timed in one process, alternating which runs first; plus how repetitive the outputs are and
    the teacher-forced acceptance on the validation set."""
    from mtp_jax import data as data_lib

    tokenizer = data_lib.load_tokenizer(data.directory)
    generator = Generator(model, cache_len)
    starts = np.linspace(0, len(data.val) - prompt_len - new_tokens, prompts).astype(np.int64)
    val = lambda s, n: np.asarray(data.val[s:s + n]).astype(int).tolist()  # noqa: E731
    generator.generate(val(0, prompt_len), new_tokens), generator.speculative(val(0, prompt_len), new_tokens)

    rows = []
    for i, s in enumerate(starts):
        prompt, truth = val(s, prompt_len), val(s + prompt_len, new_tokens)
        runs = {}
        for mode in (("plain", "speculative") if i % 2 == 0 else ("speculative", "plain")):
            begin = time.perf_counter()
            runs[mode] = generator.generate(prompt, new_tokens) if mode == "plain" else \
                generator.speculative(prompt, new_tokens)
            runs[mode + "_s"] = time.perf_counter() - begin
        if runs["plain"].tokens != runs["speculative"].tokens:
            raise AssertionError(f"speculative decoding diverged from greedy decoding on prompt {i}")
        rows.append(dict(plain_tps=len(runs["plain"].tokens) / runs["plain_s"],
                         speculative_tps=len(runs["speculative"].tokens) / runs["speculative_s"],
                         accepted=runs["speculative"].accepted, passes=runs["speculative"].forward_passes,
                         output_ratio=compression_ratio(tokenizer.decode(runs["plain"].tokens)),
                         truth_ratio=compression_ratio(tokenizer.decode(truth))))

    window = config.seq_len + model.n_tokens
    graphdef, params = nnx.split(model, nnx.Param)
    batches = data_lib.eval_windows(data.val, window=window, batch_size=config.batch_size,
                                    num_batches=config.eval_batches)
    forced = [teacher_forced_acceptance(graphdef, config.loss_chunk_size, params, b) for b in batches]
    forced = {k: float(np.mean([f[k] for f in forced])) for k in forced[0]}

    median = lambda key: float(np.median([r[key] for r in rows]))  # noqa: E731
    accepted = Result([], 0, sum((r["accepted"] for r in rows), []))
    return {
        "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache_len": cache_len,
        "plain_tokens_per_sec": median("plain_tps"), "speculative_tokens_per_sec": median("speculative_tps"),
        "speedup": float(np.median([r["speculative_tps"] / r["plain_tps"] for r in rows])),
        "mean_accepted": accepted.mean_accepted, "acceptance": accepted.acceptance(model.n_tokens),
        "output_compression_ratio": median("output_ratio"), "truth_compression_ratio": median("truth_ratio"),
        "teacher_forced_mean_accepted": forced.pop("mean_accepted"), "teacher_forced_acceptance": forced,
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        fail(f"{message}. See --help for the flags")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m mtp_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir (its newest checkpoint is used)")
    p.add_argument("--prompt", help="text to continue (required unless --benchmark)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample within this probability mass (nucleus)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--speculative", action="store_true", help="self-speculative greedy decoding with the MTP heads")
    p.add_argument("--cache_len", type=int, default=0,
                   help="KV-cache positions, prompt included (0: the seq_len the model was trained on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--benchmark", action="store_true",
                   help="time plain vs speculative greedy decoding on validation prompts")
    p.add_argument("--prompts", type=int, default=10, help="benchmark: number of validation prompts")
    p.add_argument("--prompt_len", type=int, default=128, help="benchmark: tokens per prompt")
    args = p.parse_args(argv)
    if not args.benchmark and args.prompt is None:
        fail("--prompt is required (or pass --benchmark)")
    if args.speculative and args.temperature > 0:
        fail("--speculative decodes greedily: drop --temperature (or --speculative to sample)")
    for name in ("max_new_tokens", "prompts", "prompt_len"):
        if getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)} must be >= 1")
    if not 0 < args.top_p <= 1 or args.top_k < 0 or args.temperature < 0 or args.cache_len < 0:
        fail("need --temperature >= 0, --top_k >= 0, 0 < --top_p <= 1 and --cache_len >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    from mtp_jax import data as data_lib

    model, config, data = load(args.workdir)
    cache_len = args.cache_len or config.seq_len
    if args.benchmark:
        if model.n_tokens == 1:
            raise UserError("the model has no extra heads to draft with (it was trained with mtp_n_tokens=1): "
                            "benchmark a model trained with --config.use_mtp=True --config.mtp_n_tokens=4")
        if args.prompt_len >= cache_len:
            raise UserError(f"--prompt_len={args.prompt_len} must be below the cache of {cache_len} positions")
        return benchmark(model, config, data, prompts=args.prompts, prompt_len=args.prompt_len,
                         new_tokens=min(args.max_new_tokens, cache_len - args.prompt_len), cache_len=cache_len)
    tokenizer = data_lib.load_tokenizer(data.directory)
    prompt = tokenizer.encode(args.prompt)
    generator = Generator(model, cache_len)
    begin = time.perf_counter()
    if args.speculative:
        result = generator.speculative(prompt, args.max_new_tokens)
    else:
        result = generator.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                    args.seed)
    seconds = time.perf_counter() - begin  # includes compiling the two steps
    return {"text": tokenizer.decode(result.tokens), "new_tokens": len(result.tokens), "seconds": seconds,
            "tokens_per_sec": len(result.tokens) / seconds, "forward_passes": result.forward_passes,
            "mean_accepted": result.mean_accepted,
            "acceptance": result.acceptance(model.n_tokens) if args.speculative else []}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = run(args)
    except UserError as e:
        fail(str(e))
    if args.json or args.benchmark:
        print(json.dumps(out))
        return
    print(args.prompt + out["text"])
    print(f"{out['new_tokens']} tokens in {out['seconds']:.2f} s ({out['tokens_per_sec']:.1f} tokens/s), "
          f"{out['forward_passes']} forward passes, {out['mean_accepted']:.2f} tokens per pass", file=sys.stderr)


if __name__ == "__main__":
    main()
