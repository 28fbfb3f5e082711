"""Speculative decoding's parts: the tree (Medusa's construction, its attention mask, greedy
acceptance, cache compaction) and rejection sampling, whose output distribution must be the plain
sampler's exactly (checked against enumeration, and shown to fail for a wrong acceptance rule)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import decoding, speculative
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel
from mtp_jax.speculative import Tree

SHAPE = ModelShape(vocab_size=256, d_model=32, n_layers=2, n_heads=2, mlp_dim=64)
# A branching tree: head 2's top three, head 3's top two after head 2's best, one deeper node.
TREE = Tree(((0,), (1,), (0, 0), (2,), (0, 1), (1, 0), (0, 0, 0)))


@functools.partial(jax.jit, static_argnums=0)
def forward_logits(graphdef, params, tokens):
    """Head 1's logits [B, T, V] from an ordinary forward pass over tokens [B, T], no cache."""
    model = nnx.merge(graphdef, params)
    decoder = model.decoder
    h, _ = decoder.run_blocks(decoder.embed(tokens), jnp.arange(tokens.shape[1])[None], range(decoder.shape.n_layers))
    return model.logits(1, h)


def test_tree_build_takes_the_likeliest_paths_parents_first():
    # Random acceptances, best rank first (no ties among path products, almost surely).
    acceptance = -np.sort(-np.random.default_rng(0).dirichlet(np.ones(4), size=3)[:, :3], axis=1)
    tree = Tree.build(acceptance, 9)
    # Reference: every path of up to 3 ranks, by the product of its acceptances.
    value = lambda path: np.prod([acceptance[d, r] for d, r in enumerate(path)])  # noqa: E731
    paths = [p for depth in (1, 2, 3) for p in itertools.product(range(3), repeat=depth)]
    best = sorted(paths, key=lambda p: -value(p))[:9]
    assert sorted(tree.paths) == sorted(best)
    assert all(p[:-1] in tree.paths[:i] for i, p in enumerate(tree.paths) if len(p) > 1)
    assert Tree.chain(3).is_chain and not tree.is_chain


def test_tree_attention_equals_each_path_run_as_a_sequence():
    """Each node's logits from one tree pass (over a cache whose unused slots hold noise) equal
    those of an ordinary forward pass over prompt + the node's root-to-node path."""
    graphdef, params = nnx.split(MTPModel(SHAPE, 4, "linear", rngs=nnx.Rngs(params=0)))
    prompt, block, slots = jnp.asarray([[5, 6, 7, 8, 9]]), jnp.asarray([11, 12, 13, 14, 15, 16, 17, 18]), 24
    base, layers = prompt.shape[1], range(SHAPE.n_layers)

    @jax.jit
    def tree_pass(params):
        model = nnx.merge(graphdef, params)
        decoder = model.decoder
        noise = jax.random.normal(jax.random.key(0), (len(layers), 2, SHAPE.n_heads, slots, SHAPE.head_dim))
        caches = [{"k": layer[0], "v": layer[1]} for layer in noise]
        _, caches = decoder.run_blocks(decoder.embed(prompt), jnp.arange(base)[None], layers, caches, 0)
        h, _ = decoder.run_blocks(
            decoder.embed(block[None]),
            base + jnp.asarray(TREE.depths)[None],
            layers,
            caches,
            base,
            mask=TREE.mask(base, slots),
        )
        return model.logits(1, h[0])  # [size, V]

    # Every root-to-node path after the prompt, padded at the end (causality: padding is not read).
    paths = [np.asarray(speculative.path_to(TREE, jnp.int32(i)))[: TREE.depths[i] + 1] for i in range(TREE.size)]
    sequences = jnp.asarray(
        [prompt[0].tolist() + block[p].tolist() + [0] * (TREE.max_depth - len(p) + 1) for p in paths]
    )
    reference = forward_logits(graphdef, params, sequences)[jnp.arange(TREE.size), base + jnp.asarray(TREE.depths)]
    np.testing.assert_allclose(tree_pass(params), reference, rtol=1e-4, atol=1e-4)


def test_accept_greedy_finds_the_deepest_agreeing_path():
    block = jnp.asarray([9, 1, 2, 3, 4, 5, 6, 7])  # node tokens; parents: 0 0 1 0 1 2 3
    # Head 1's argmax after each node: root -> 2 (node 2 agrees), node 2 -> 6 (node 6 agrees),
    # node 6 -> 0 (node 7, a child of node 3, is not on this path).
    greedy = jnp.asarray([2, 0, 6, 0, 0, 0, 0, 0])
    path, accepted = speculative.accept_greedy(TREE, block, greedy)
    assert path.tolist() == [0, 2, 6, 6] and int(accepted) == 2
    path, accepted = speculative.accept_greedy(TREE, block, jnp.asarray([8, 0, 0, 0, 0, 0, 0, 0]))
    assert path.tolist() == [0, 0, 0, 0] and int(accepted) == 0


def test_compact_moves_the_accepted_path_to_consecutive_slots():
    buffer = np.arange(2 * 12 * 3, dtype=np.float32).reshape(2, 12, 3)
    out = speculative.compact([{"k": jnp.asarray(buffer)}], 4, jnp.asarray([0, 2, 6, 6]))[0]["k"]
    expected = buffer.copy()
    expected[:, 4:8] = buffer[:, [4, 6, 10, 10]]
    np.testing.assert_array_equal(out, expected)


def test_accept_sampled_residual_and_bonus():
    """Drafts with q = p are always accepted and the bonus is drawn from the last p; a draft p
    cannot produce is always rejected and replaced from norm(max(0, p - q))."""
    p = jnp.asarray([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    a, token, overlap = speculative.accept_sampled(jnp.asarray([0, 1, 2]), p, p[:2], jax.random.key(0))
    assert int(a) == 2 and int(token) == 1
    np.testing.assert_allclose(overlap, [1.0, 1.0])
    q = jnp.asarray([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    a, token, overlap = speculative.accept_sampled(jnp.asarray([0, 2, 2]), p, q, jax.random.key(0))
    assert int(a) == 0 and int(token) in (0, 1)
    np.testing.assert_allclose(overlap, [0.0, 1.0])


# ---------------------------------------------------------------------------------------------
# Rejection sampling keeps the plain sampler's distribution
# ---------------------------------------------------------------------------------------------

SMALL = ModelShape(vocab_size=4, d_model=16, n_layers=1, n_heads=2, mlp_dim=32)
PROMPT, NEW, SEEDS = [1, 2], 3, 10_000


def peaked_model(head_type: str) -> MTPModel:
    """n = 3 over 4 tokens, with output matrices scaled up so that p and every q are far from
    uniform and from each other (an acceptance rule that ignores p then shows)."""
    model = MTPModel(SMALL, 3, head_type, rngs=nnx.Rngs(params=1))
    model.decoder.unembedding[...] = 15 * model.decoder.unembedding[...]
    for head in model.heads if head_type == "linear" else ():
        head[...] = 15 * head[...]
    return model


def filtered_numpy(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Plain sampling's distribution [..., V], computed independently in numpy."""
    z = logits / temperature
    order = np.argsort(-z, axis=-1, kind="stable")
    keep = np.ones_like(z, bool)
    ranks = np.argsort(order, axis=-1)
    if top_k:
        keep &= ranks < top_k
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1:
        sorted_probs = np.take_along_axis(probs, order, -1)
        before = np.cumsum(sorted_probs, -1) - sorted_probs  # mass strictly above each token
        keep &= np.take_along_axis(before < top_p, ranks, -1)
    probs = np.where(keep, probs, 0)
    return probs / probs.sum(-1, keepdims=True)


def exact_distribution(model: MTPModel, settings: dict) -> np.ndarray:
    """P(first NEW tokens) [V ** NEW] by enumeration: head 1's filtered distributions from full
    forward passes over every continuation."""
    v = SMALL.vocab_size
    outcomes = np.array(list(itertools.product(range(v), repeat=NEW)))  # [V ** NEW, NEW]
    tokens = jnp.asarray(np.concatenate([np.tile(PROMPT, (len(outcomes), 1)), outcomes], axis=1))
    logits = np.asarray(forward_logits(*nnx.split(model), tokens), np.float64)[:, len(PROMPT) - 1 : -1]  # [O, NEW, V]
    probs = filtered_numpy(logits, **settings)
    return np.prod(np.take_along_axis(probs, outcomes[..., None], -1)[..., 0], axis=1)


def empirical_distribution(model: MTPModel, settings: dict) -> np.ndarray:
    """Frequencies of the first NEW tokens over SEEDS seeds, all seeds in one vectorised program."""
    generator = decoding.Generator(model, len(PROMPT) + NEW)
    padded, limit = generator._prompt(PROMPT, NEW)
    graphdef, params = nnx.split(model)
    decode = functools.partial(
        decoding._decode_speculative,
        graphdef,
        generator.capacity,
        Tree.chain(2),
        decoding.Sampling(**settings),
        False,  # no context drafts
        params,
        padded,
        len(PROMPT),
        limit,
    )
    keys = jax.vmap(jax.random.key)(jnp.arange(SEEDS))
    tokens = np.asarray(jax.jit(jax.vmap(decode))(keys)[0])[:, :NEW]  # [SEEDS, NEW]
    index = tokens @ (SMALL.vocab_size ** np.arange(NEW - 1, -1, -1))
    return np.bincount(index, minlength=SMALL.vocab_size**NEW) / SEEDS


def total_variation(empirical: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(TV distance, the bound a correct sampler stays under): twice the TV expected from SEEDS
    draws of `exact` (0.5 Σ sqrt(2 p (1 - p) / (π SEEDS)), the normal approximation)."""
    expected = 0.5 * np.sum(np.sqrt(2 * exact * (1 - exact) / (np.pi * SEEDS)))
    return 0.5 * float(np.abs(empirical - exact).sum()), 2 * expected


@pytest.mark.parametrize(
    "head_type,settings",
    [
        ("linear", dict(temperature=1.0, top_k=0, top_p=1.0)),
        ("sequential", dict(temperature=0.8, top_k=3, top_p=0.9)),
    ],
)
def test_sampled_speculative_reproduces_the_plain_distribution(head_type, settings):
    model = peaked_model(head_type)
    tv, bound = total_variation(empirical_distribution(model, settings), exact_distribution(model, settings))
    assert tv < bound, (tv, bound)


def test_a_wrong_acceptance_rule_fails_the_distribution_bound(monkeypatch):
    """Accepting every draft (the heads' distributions then leak into the output) is caught."""
    model, settings = peaked_model("linear"), dict(temperature=1.0, top_k=0, top_p=1.0)
    monkeypatch.setattr(speculative, "acceptance_probability", lambda p, q: jnp.ones_like(p))
    tv, bound = total_variation(empirical_distribution(model, settings), exact_distribution(model, settings))
    assert tv > 5 * bound, (tv, bound)


def test_sampled_speculative_is_reproducible_and_seeded():
    generator = decoding.Generator(MTPModel(SHAPE, 3, "parallel", rngs=nnx.Rngs(params=0)), 48)
    draw = lambda seed: generator.speculative([7, 8, 9], 40, temperature=1.0, top_p=0.9, seed=seed)  # noqa: E731
    first = draw(0)
    assert first.tokens == draw(0).tokens and first.tokens != draw(1).tokens
    assert len(first.tokens) == 40 and first.forward_passes == 1 + len(first.accepted)
    assert all(0 <= x <= 1 for x in first.alpha() if x is not None)
    assert 1 <= first.predicted_mean_accepted() <= 3


def lookup_reference(context: list[int], end: int, size: int) -> tuple[list[int] | None, int]:
    """(the drafts copied after the latest earlier occurrence of the longest of the context's last
    2, 3 or 4 tokens (ending at `end`), by plain search, repeated past `end` as a loop of the
    match's distance to it goes on, and that distance); (None, 0) where none occurred."""
    for g in sorted(speculative.LOOKUP_NGRAMS, reverse=True):
        if end + 1 < g:
            continue
        for i in range(end - 1, g - 2, -1):
            if context[i - g + 1 : i + 1] == context[end - g + 1 : end + 1]:
                return [context[i + 1 + j % (end - i)] for j in range(size - 1)], end - i
    return None, 0


def test_lookup_draft_copies_what_followed_the_latest_longest_match_and_repeats_a_loop():
    rng = np.random.default_rng(0)
    lookup = jax.jit(speculative.lookup_draft)
    found = looped = 0
    for _ in range(200):
        vocab = int(rng.integers(2, 9))  # small vocabularies repeat n-grams often
        context = rng.integers(0, vocab, 40).tolist()
        end, block = int(rng.integers(0, 40)), rng.integers(100, 200, 6)
        expected, distance = lookup_reference(context, end, 6)
        got, copied = lookup(jnp.asarray(context), end, jnp.asarray(block))
        got = np.asarray(got).tolist()
        assert got[0] == block[0] and bool(copied) == (expected is not None)
        assert got[1:] == (block[1:].tolist() if expected is None else expected), (context, end)
        found += expected is not None
        looped += 0 < distance < 5  # the copy runs past `end` and repeats
    assert 50 < found < 200 and looped > 20  # every outcome was exercised


def test_copies_accepted_whole_in_a_row_are_followed_by_longer_ones():
    assert [chain.size for chain in speculative.copy_chains(7, 4)] == [8, 8, 16, 32]
    assert [chain.size for chain in speculative.copy_chains(1, 4)] == [4, 4, 8, 16]  # never shorter than the heads'
    assert all(chain.is_chain for chain in speculative.copy_chains(7, 4))
    next_level, top = jax.jit(speculative.next_copy_level), len(speculative.COPY_SCALES)
    for found, level, whole in itertools.product((False, True), range(top + 1), (False, True)):
        expected = 0 if not found else min(level + 1, top) if level and whole else 1
        assert int(next_level(found, level, whole)) == expected, (found, level, whole)
