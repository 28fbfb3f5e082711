"""Attention implementations (model.attention): each equals the reference einsum path, alone and
inside the model, forward and gradients, causal, with a KV cache and with an explicit mask."""

import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import attention, decoding
from mtp_jax.config import validate
from mtp_jax.errors import UserError
from mtp_jax.heads import HEAD_TYPES
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel, build_model, mtp_loss
from tests.util import ROOT, load_config

# Block sizes: 4 divides T = 12, 5 leaves a padded last block, 64 is one block (the reference).
IMPLEMENTATIONS = [("dot_product", 0), ("blockwise", 4), ("blockwise", 5), ("blockwise", 64)]
SHAPE = ModelShape(vocab_size=61, d_model=32, n_layers=2, n_heads=4, mlp_dim=48, attention="xla")
B, N, T, H = 2, 3, 12, 8


def qkv(t: int = T, s: int = T, lead=(B, N), seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(*lead, n, H)), jnp.float32) for n in (t, s, s))


def value_and_grads(impl, block_size, q, k, v, q_positions, k_positions, mask=None):
    """The outputs and the gradients of a fixed nonlinear function of them w.r.t. q, k and v."""

    def f(q, k, v):
        out = attention.IMPLEMENTATIONS[impl](q, k, v, q_positions, k_positions, mask, block_size)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1])), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def assert_same_as_reference(impl, block_size, q, k, v, *rest):
    ref_out, ref_grads = value_and_grads("xla", 0, q, k, v, *rest)
    out, grads = value_and_grads(impl, block_size, q, k, v, *rest)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def numpy_attention(q, k, v, allowed):
    scores = np.einsum("...th,...sh->...ts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("...ts,...sh->...th", p / p.sum(-1, keepdims=True), v)


def test_reference_equals_numpy_causal_attention():
    q, k, v = qkv()
    positions = jnp.arange(T)[None, None]
    out = attention.reference(q, k, v, positions, positions)
    expected = numpy_attention(*map(np.asarray, (q, k, v)), np.tril(np.ones((T, T), bool)))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl, block_size", IMPLEMENTATIONS)
def test_causal_attention_and_gradients_equal_the_reference(impl, block_size):
    q, k, v = qkv()
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))[:, None]  # [B, 1, T], as the model passes them
    assert_same_as_reference(impl, block_size, q, k, v, positions, positions)


@pytest.mark.parametrize("impl, block_size", IMPLEMENTATIONS)
def test_cached_attention_equals_the_reference(impl, block_size):
    # The KV-cache layout: [B·N, S, H] with 3 new queries at positions 7, 8, 9 reading slots <= their
    # position of a 16-slot cache whose later slots hold stale values.
    q, k, v = qkv(t=3, s=16, lead=(B * N,))
    q_positions = jnp.broadcast_to(jnp.arange(7, 10), (B * N, 3))
    assert_same_as_reference(impl, block_size, q, k, v, q_positions, jnp.arange(16))


@pytest.mark.parametrize("impl, block_size", IMPLEMENTATIONS)
def test_explicit_mask_replaces_the_positional_rule(impl, block_size):
    # A tree-attention-like mask: every query sees itself and a random half of all keys, later ones
    # included, so it differs from the causal rule everywhere.
    q, k, v = qkv()
    rng = np.random.default_rng(1)
    mask = jnp.asarray((rng.random((B, 1, T, T)) < 0.5) | np.eye(T, dtype=bool))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))[:, None]
    assert_same_as_reference(impl, block_size, q, k, v, positions, positions, mask)
    out = attention.IMPLEMENTATIONS[impl](q, k, v, positions, positions, mask, block_size)
    expected = numpy_attention(*map(np.asarray, (q, k, v)), np.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_blockwise_gradient_never_holds_a_whole_score_matrix():
    t = 1024
    q, k, v = qkv(t=t, s=t, lead=(1, 2))
    positions = jnp.arange(t)[None, None]
    scores_bytes = 2 * t * t * 4  # one float32 [N, T, T] matrix: 8 MiB

    def temp_bytes(impl, block_size):
        def loss(q, k, v):
            return jnp.sum(attention.IMPLEMENTATIONS[impl](q, k, v, positions, positions, None, block_size))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    # Blocks of 128 queries: the backward pass holds about two [N, 128, T] float32 arrays at a time.
    assert temp_bytes("blockwise", 128) < scores_bytes / 2 < scores_bytes < temp_bytes("xla", 0)


@functools.cache
def model_loss_and_grads(head_type: str, impl: str):
    """The 2-token loss and its gradients of a model whose attention is `impl` (blocks of 5)."""
    n = 2
    window = jnp.asarray(np.random.default_rng(0).integers(0, SHAPE.vocab_size, (B, T + n)), jnp.int32)
    shape = dataclasses.replace(SHAPE, attention=impl, attention_block_size=5)
    graphdef, params = nnx.split(MTPModel(shape, n, head_type, rngs=nnx.Rngs(params=0)), nnx.Param)
    loss = lambda p: mtp_loss(nnx.merge(graphdef, p), window, (1.0, 0.5))[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(nnx.to_pure_dict(params))


# Blockwise for every head type; dot_product (a thin call into jax.nn, tested above at the attention
# level, and slow to compile on CPU) once, through the head type with the most blocks.
@pytest.mark.parametrize("impl, head_type", [("blockwise", h) for h in HEAD_TYPES] + [("dot_product", "sequential")])
def test_model_loss_and_gradients_equal_the_reference_for_every_head_type(impl, head_type):
    ref_loss, ref_grads = model_loss_and_grads(head_type, "xla")
    loss, grads = model_loss_and_grads(head_type, impl)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    jax.tree.map(
        lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6), grads, ref_grads
    )


def test_decoding_with_the_kv_cache_gives_the_reference_tokens():
    """Plain greedy and self-speculative decoding (the cache, rolled back between verify passes)
    give the same tokens with blockwise attention in blocks of 5 as with the reference."""
    head_type = "sequential"
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]

    def decode(shape):
        generator = decoding.Generator(MTPModel(shape, 3, head_type, rngs=nnx.Rngs(params=0)), 28)
        return generator.generate(prompt, 16).tokens, generator.speculative(prompt, 16).tokens

    plain, speculative = decode(dataclasses.replace(SHAPE, attention="blockwise", attention_block_size=5))
    assert (plain, speculative) == decode(SHAPE)
    assert plain == speculative and len(plain) == 16


def test_auto_picks_the_measured_choice_for_the_backend():
    assert attention.resolve("auto") == attention.AUTO[jax.default_backend()]
    assert attention.resolve("dot_product") == "dot_product"


def test_a_model_built_for_another_platform_takes_its_code_paths_and_the_same_parameters():
    config = load_config("mtp3")
    here, tpu = (build_model(config, 61, seed=0, platform=p) for p in (None, "tpu"))
    assert (here.decoder.shape.attention, here.decoder.shape.fuse_projections) == ("xla", True)  # CPU
    assert (tpu.decoder.shape.attention, tpu.decoder.shape.fuse_projections) == ("blockwise", False)
    assert jax.default_backend() == "cpu" and attention.resolve("auto") == "xla"  # nothing global changed
    params = [nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (here, tpu)]
    assert jax.tree.all(jax.tree.map(np.array_equal, *params))
    splash = load_config("mtp3", overrides={"model.attention": "splash"})
    validate(splash, "tpu")  # splash is refused off a TPU (next test), not when compiling for one


def test_decoding_passes_use_separate_projection_dots_and_training_passes_one_fused_dot():
    model = build_model(load_config("mtp3"), 61, seed=0)
    block, d = model.decoder.block(0), model.decoder.shape.d_model
    x, positions = jnp.ones((1, 32, d)), jnp.arange(32)[None]
    cache = decoding.init_caches(model, 1, 64, all_heads=False)[0]

    def concatenations(*args):  # of weight matrices (rank 2; RoPE concatenates rank-4 halves)
        jaxpr = jax.make_jaxpr(lambda *a: block(*a)[0])(*args)
        return sum(e.primitive.name == "concatenate" and e.outvars[0].aval.ndim == 2 for e in jaxpr.jaxpr.eqns)

    assert concatenations(x, positions) == 2  # q/k/v and gate/up, each one dot
    assert concatenations(x, positions, cache, 0) == 0


def test_unknown_attention_or_splash_off_tpu_is_refused_in_one_line():
    config = load_config("mtp3", overrides={"model.attention": "flash"})
    with pytest.raises(UserError, match="model.attention='flash' is unknown"):
        validate(config)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.bench",
            "--config=configs/mtp3.py:tiny",
            "--config.model.attention=splash",
            "--compile_only",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "TPU kernel" in errors[0], proc.stderr
