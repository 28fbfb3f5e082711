"""Drafting and verification for self-speculative decoding with the MTP heads.

One verify pass runs a block of tokens: the root, head 1's certain next token, and candidate
drafts from heads 2 … n, all made at the last committed position. The block is a static tree
(`Tree`): node i sits at depth d_i (it stands for the token d_i places past the root) and holds
head d_i + 1's rank-r_i candidate. A chain is the tree of every head's top candidate; Medusa's
trees (arXiv 2401.10774) add lower-ranked candidates where they are most likely accepted
(`Tree.build`, from per-head, per-rank acceptance measured on validation text). One forward pass
verifies the whole tree: each node attends to the committed cache and to its own ancestors
(`Tree.mask`), at position root + depth.

Verification keeps the target distribution exactly:
- greedy (`accept_greedy`): a node is accepted when it and all its ancestors equal head 1's
  argmax after their parents; the deepest accepted path is committed, then head 1's own token.
- sampled (`accept_sampled`, chains only; Leviathan et al. 2023, arXiv 2211.17192): drafts are
  sampled from each head's equally filtered distribution q, draft j is accepted with probability
  min(1, p/q) under head 1's filtered p, the first rejection is resampled from
  norm(max(0, p - q)), and when every draft is accepted a bonus token is drawn from p. The
  committed tokens are then distributed exactly as plain sampling's.

Drafts copied from the context (`lookup_draft`; prompt lookup decoding, Saxena 2023): where the
last few committed tokens occurred before, the tokens that followed them there make a chain
that needs no head at all. Code and other repetitive text often continue a span already
written; the heads draft everywhere else. After copies accepted whole in a row, longer ones
(`copy_chains`, `next_copy_level`). Any draft source keeps greedy decoding exact, since
verification alone decides what is committed.

Nothing here runs the model: decoding.py owns the cache and the device loops, and calls these
functions on the logits it computes.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tree:
    """A static candidate tree. `paths` lists the non-root nodes, parents first; a node's path
    is the candidate rank it takes at each depth (so (0, 1) is head 2's top token followed by
    head 3's second). Node 0 is the root; node i is paths[i - 1]."""

    paths: tuple[tuple[int, ...], ...]

    @classmethod
    def chain(cls, drafts: int) -> Tree:
        """Every head's top candidate, one after another: the plain speculative chain."""
        return cls(tuple((0,) * d for d in range(1, drafts + 1)))

    @classmethod
    def build(cls, acceptance: np.ndarray, size: int) -> Tree:
        """Medusa's greedy construction: the `size` nodes of largest path probability, where a
        node's probability is the product of acceptance[depth - 1, rank] along its path (heads
        assumed independent). acceptance: [n - 1, R], head k + 2's rank-r candidate accepted.
        A node is never likelier than its parent, so popping the best frontier node `size` times
        yields the optimal tree with its parents always first."""
        drafts, ranks = acceptance.shape
        frontier = [(-float(acceptance[0, r]), (r,)) for r in range(ranks)]
        heapq.heapify(frontier)
        paths = []
        while frontier and len(paths) < size:
            value, path = heapq.heappop(frontier)
            paths.append(path)
            if len(path) < drafts:
                for r in range(ranks):
                    heapq.heappush(frontier, (value * float(acceptance[len(path), r]), path + (r,)))
        return cls(tuple(paths))

    @property
    def size(self) -> int:
        """Nodes, the root included: the tokens of one verify pass."""
        return 1 + len(self.paths)

    @property
    def is_chain(self) -> bool:
        return self.paths == Tree.chain(len(self.paths)).paths

    @functools.cached_property
    def depths(self) -> np.ndarray:  # [size]
        return np.array([0] + [len(p) for p in self.paths], np.int32)

    @functools.cached_property
    def ranks(self) -> np.ndarray:  # [size]; the root's is 0
        return np.array([0] + [p[-1] for p in self.paths], np.int32)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @property
    def max_rank(self) -> int:
        """How many candidates per head the tree reads."""
        return int(self.ranks.max()) + 1

    @functools.cached_property
    def _index(self) -> dict[tuple[int, ...], int]:
        """Each node's number by its path (the root's is ())."""
        return {(): 0} | {p: i + 1 for i, p in enumerate(self.paths)}

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """[size, size] bool: node j is node i or one of its ancestors."""
        out = np.zeros((self.size, self.size), bool)
        for path, i in self._index.items():
            for d in range(len(path) + 1):
                out[i, self._index[path[:d]]] = True
        return out

    @functools.cached_property
    def parents(self) -> np.ndarray:  # [size]; the root is its own parent
        return np.array([0] + [self._index[p[:-1]] for p in self.paths], np.int32)

    def mask(self, base, slots: int) -> jax.Array:
        """[size, slots] bool: node i (written at cache slot base + i) sees the committed slots
        below base and the slots of its ancestors, itself included."""
        offset = jnp.arange(slots) - base
        in_tree = (offset >= 0) & (offset < self.size)
        return (offset < 0) | (in_tree & jnp.asarray(self.ancestors)[:, jnp.clip(offset, 0, self.size - 1)])

    def block(self, root: jax.Array, candidates: jax.Array) -> jax.Array:
        """The tokens of a verify pass [size]: root, then each node's candidate from
        candidates [n - 1, R] (head k + 2's candidates, best first). A chain longer than the
        heads (for drafts copied from the context) repeats the last head's draft in its tail."""
        heads = np.minimum(self.depths[1:], candidates.shape[0]) - 1
        nodes = candidates[jnp.asarray(heads), jnp.asarray(self.ranks[1:])]
        return jnp.concatenate([root[None], nodes])

    def to_json(self) -> list[list[int]]:
        return [list(p) for p in self.paths]


def filter_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits [..., V] at temperature, with the tokens outside the top k and the nucleus of mass
    top_p set to -inf: the distribution plain sampling draws from (temperature > 0)."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus (the top token is always kept).
        cutoff = jnp.take_along_axis(ordered, jnp.sum(cumulative < top_p, axis=-1, keepdims=True), axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_draft(
    logits: jax.Array, key: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """One head's sampled draft from its logits [V] at the last committed node: (the token, its
    filtered distribution q [V], which rejection sampling compares with head 1's p)."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered).astype(jnp.int32), jax.nn.softmax(filtered)


def accept_greedy(tree: Tree, block: jax.Array, greedy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The deepest node whose path agrees with head 1's argmax greedy [size] (after each node).

    Returns the accepted path's nodes [max_depth + 1] (root first; padded with its last node)
    and how many drafts it holds."""
    correct = block == greedy[jnp.asarray(tree.parents)]
    correct = correct.at[0].set(True)
    accepted = jnp.all(correct[None, :] | ~jnp.asarray(tree.ancestors), axis=1)  # [size]
    depths = jnp.asarray(tree.depths)
    last = jnp.argmax(jnp.where(accepted, depths, -1))
    return path_to(tree, last), depths[last]


def path_to(tree: Tree, node: jax.Array) -> jax.Array:
    """The nodes from the root to `node` [max_depth + 1], padded with `node`."""
    depths = jnp.asarray(tree.depths)
    on_path = jnp.asarray(tree.ancestors)[node]
    steps = [jnp.argmax(on_path & (depths == d)) for d in range(tree.max_depth + 1)]
    return jnp.where(jnp.arange(tree.max_depth + 1) <= depths[node], jnp.stack(steps), node)


def acceptance_probability(p_draft: jax.Array, q_draft: jax.Array) -> jax.Array:
    """min(1, p/q) for each draft's probability under head 1 (p) and its drafting head (q > 0)."""
    return jnp.minimum(1.0, p_draft / q_draft)


def accept_sampled(block: jax.Array, p: jax.Array, q: jax.Array, key: jax.Array):
    """Rejection sampling of a chain. block: [n] (root, drafts 1 … n-1); p: [n, V] head 1's
    filtered probabilities after each block token; q: [n - 1, V] the distributions the drafts
    were sampled from. Returns (drafts accepted a, the next certain token, Σ_x min(p, q) for each
    draft position [n - 1], the acceptance rate α the drafts had)."""
    drafts = block[1:]
    rows = jnp.arange(drafts.shape[0])
    uniform_key, resample_key = jax.random.split(key)
    ok = jax.random.uniform(uniform_key, drafts.shape) < acceptance_probability(p[rows, drafts], q[rows, drafts])
    a = jnp.sum(jnp.cumprod(ok))
    # After a rejection: norm(max(0, p - q)); after the last draft: p itself (q there is 0).
    residual = jnp.maximum(p[a] - jnp.concatenate([q, jnp.zeros_like(q[:1])])[a], 0.0)
    residual = jnp.where(jnp.sum(residual) > 0, residual, p[a])  # p == q: never rejected, but guard
    token = jax.random.categorical(resample_key, jnp.log(residual)).astype(jnp.int32)
    return a, token, jnp.sum(jnp.minimum(p[:-1], q), axis=-1)


def compact(caches: list[dict], base, path: jax.Array) -> list[dict]:
    """Move the accepted path's cache entries (slots base + path) to consecutive slots from
    base; the other nodes' entries stay behind the index, where nothing reads them."""

    def gather(buffer):  # [B·N, S, H], or [L, B·N, S, H] for stacked layers (model.scan_layers)
        slot_axis = buffer.ndim - 2
        return jax.lax.dynamic_update_slice_in_dim(
            buffer, jnp.take(buffer, base + path, axis=slot_axis), base, axis=slot_axis
        )

    return [{name: gather(buffer) for name, buffer in cache.items()} for cache in caches]


def check_drafting(tree: bool, lookup: int, temperature: float) -> None:
    """Which drafting options go together (one place for the engine and the CLI): a tree is
    verified greedily, sampled drafts only as a chain; context drafts replace a greedy chain's."""
    if tree and temperature > 0:
        raise UserError(
            "tree verification is greedy: drop --tree_size (sampled drafts are verified as a chain) or --temperature"
        )
    if lookup < 0:
        raise UserError(f"--lookup={lookup} must be >= 0 (0: the heads draft alone)")
    if lookup and tree:
        raise UserError("context drafts (--lookup) replace a chain of drafts, not a tree: drop --tree_size or --lookup")
    if lookup and temperature > 0:
        raise UserError("context drafts (--lookup) are verified greedily: drop --temperature or --lookup")


LOOKUP_NGRAMS = (2, 3, 4)  # the context's last tokens looked up; a longer match wins
# A copy's rows, in multiples of the first copy's, after 0, 1, 2 and 3 or more copies accepted whole
# in a row: repeated text is copied in long runs once it has repeated for a while, while a copy
# that may fail early stays short, since a pass's cost rises with its rows.
COPY_SCALES = (1, 1, 2, 4)


def copy_chains(lookup: int, n: int) -> list[Tree]:
    """The chain a context-draft pass of each level 1 … len(COPY_SCALES) verifies: the certain
    token and max(lookup, n - 1) copied drafts, times COPY_SCALES[level - 1] rows."""
    rows = max(lookup, n - 1) + 1
    return [Tree.chain(rows * scale - 1) for scale in COPY_SCALES]


def next_copy_level(found: jax.Array, level: jax.Array, whole: jax.Array) -> jax.Array:
    """The next pass's level: 0 (the heads' chain) where no copy was found; else 1, or one more
    (up to len(COPY_SCALES)) after a copy (level > 0) whose drafts were all accepted (`whole`)."""
    grown = jnp.where(whole & (level > 0), jnp.minimum(level + 1, len(COPY_SCALES)), 1)
    return jnp.where(found, grown, 0).astype(jnp.int32)


def lookup_draft(context: jax.Array, end, block: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(block [size] with its drafts replaced by the size - 1 tokens that followed the latest
    earlier occurrence of context[end - g + 1 … end], the longest such g in LOOKUP_NGRAMS, or the
    block as it was where none occurred; whether one occurred). context [S]: the committed
    tokens at their positions, the root (block[0]) at `end`; nothing past `end` is read. A copy
    longer than the distance d from the match to `end` repeats those d tokens, as text caught in
    a loop of period d goes on."""
    positions = jnp.arange(context.shape[0])
    found = jnp.int32(-1)
    for g in LOOKUP_NGRAMS:
        match = (positions >= g - 1) & (positions < end)
        for j in range(g):  # context[i - j] == context[end - j]
            match &= jnp.roll(context, j) == context[end - j]
        latest = jnp.max(jnp.where(match, positions, -1))
        found = jnp.where(latest >= 0, latest, found)
    copied = context[found + 1 + jnp.arange(block.shape[0] - 1) % (end - found)]  # found < end: a period >= 1
    return jnp.where(found >= 0, block.at[1:].set(copied), block), found >= 0
