"""The MTP contract: offsets, per-head losses, weights, n = 1 == baseline, remat == naive."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.heads import HEAD_TYPES
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel, auxiliary_weights, build_model, loss_weights, mtp_loss
from tests.util import load_config

SHAPE = ModelShape(vocab_size=61, d_model=32, n_layers=3, n_heads=4, mlp_dim=48)
B, T = 3, 11


def random_window(n: int, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, SHAPE.vocab_size, (B, T + n)), jnp.int32)


def split(model):
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def head_logits(model: MTPModel, window) -> list[np.ndarray]:
    """Every head's logits at once, [B, T, V] each: the naive computation the loss must match."""
    n = model.n_predict
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    h_trunk, _ = model.trunk(window[:, :T], positions)
    h, out = h_trunk, []
    for k in range(1, n + 1):
        h, _ = model.head_hidden(k, h_trunk, h, window[:, k - 1 : T + k - 1], positions)
        out.append(model.logits(k, h))
    return out


def numpy_cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, targets[..., None], -1).mean())


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_head_k_loss_is_cross_entropy_against_tokens_k_ahead(head_type):
    n = 3
    model = MTPModel(SHAPE, n, head_type, rngs=nnx.Rngs(params=1))
    window = random_window(n)
    graphdef, params = split(model)
    metrics, all_logits = jax.jit(
        lambda p: (
            mtp_loss(nnx.merge(graphdef, p), window, (1.0, 0.5, 0.25))[1],
            head_logits(nnx.merge(graphdef, p), window),
        )
    )(params)
    tokens = np.asarray(window)
    for k, logits in enumerate(all_logits, start=1):
        expected = numpy_cross_entropy(np.asarray(logits), tokens[:, k : T + k])  # head k predicts x[t + k]
        np.testing.assert_allclose(float(metrics[f"loss_{k}"]), expected, rtol=1e-5)
        accuracy = (np.asarray(logits).argmax(-1) == tokens[:, k : T + k]).mean()
        np.testing.assert_allclose(float(metrics[f"accuracy_{k}"]), accuracy, atol=1e-7)


@pytest.mark.parametrize(
    "scheme,expected",
    [
        ("geometric", (0.5, 0.25, 0.125)),
        ("uniform", (1.0, 1.0, 1.0)),
        ("mean", (1 / 3, 1 / 3, 1 / 3)),
        ("0.7,0.2,0.1", (0.7, 0.2, 0.1)),
    ],
)
def test_total_is_head1_plus_weighted_auxiliary_losses(scheme, expected):
    np.testing.assert_allclose(auxiliary_weights(scheme, 4), expected)
    config = load_config("mtp4")
    config.mtp_loss_weights, config.mtp_weight = scheme, 0.3
    weights = loss_weights(config)
    graphdef, params = split(MTPModel(SHAPE, 4, "linear", rngs=nnx.Rngs(params=0)))
    total, metrics = jax.jit(lambda p: mtp_loss(nnx.merge(graphdef, p), random_window(4), weights))(params)
    by_hand = metrics["loss_1"] + 0.3 * sum(w * metrics[f"loss_{k}"] for k, w in enumerate(expected, start=2))
    np.testing.assert_allclose(float(total), float(by_hand), rtol=1e-6)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_n1_equals_baseline_bit_for_bit(head_type):
    baseline = load_config("baseline")
    window = random_window(1)
    base_def, base_params = split(build_model(baseline, SHAPE.vocab_size, seed=0))
    base_loss, _ = jax.jit(lambda p: mtp_loss(nnx.merge(base_def, p), window, loss_weights(baseline)))(base_params)
    for overrides in ({"use_mtp": True, "mtp_n_tokens": 1}, {"use_mtp": False, "mtp_n_tokens": 4}):
        config = load_config("mtp3")
        config.update(overrides)
        config.mtp_head_type = head_type
        graphdef, params = split(build_model(config, SHAPE.vocab_size, seed=0))
        assert jax.tree.structure(params) == jax.tree.structure(base_params)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)))
        loss, _ = jax.jit(lambda p: mtp_loss(nnx.merge(graphdef, p), window, loss_weights(config)))(params)  # noqa: B023
        assert float(loss) == float(base_loss)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_rematerialised_chunked_loss_and_gradients_equal_naive(head_type):
    chunk_size = 4  # T = 11: three chunks, the last one padded
    n, weights = 3, (1.0, 0.3, 0.15)
    graphdef, params = split(MTPModel(SHAPE, n, head_type, rngs=nnx.Rngs(params=2)))
    window = random_window(n, seed=5)

    def naive(p):
        logits = head_logits(nnx.merge(graphdef, p), window)
        losses = [
            -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), window[:, k : T + k, None], -1))
            for k, lg in enumerate(logits, start=1)
        ]
        return sum(w * loss for w, loss in zip(weights, losses))

    def efficient(p):
        return mtp_loss(nnx.merge(graphdef, p), window, weights, chunk_size)[0]

    naive_loss, naive_grads = jax.jit(jax.value_and_grad(naive))(params)
    loss, grads = jax.jit(jax.value_and_grad(efficient))(params)
    np.testing.assert_allclose(float(loss), float(naive_loss), rtol=1e-6)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(naive_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=2e-4, atol=1e-7)


def test_extra_heads_add_the_parameters_each_type_promises():
    counts = {}
    for head_type in HEAD_TYPES:
        _, params = split(MTPModel(SHAPE, 3, head_type, rngs=nnx.Rngs(params=0)))
        counts[head_type] = sum(x.size for x in jax.tree.leaves(params))
    _, base = split(MTPModel(SHAPE, 1, "linear", rngs=nnx.Rngs(params=0)))
    base_count = sum(x.size for x in jax.tree.leaves(base))
    d, v, m = SHAPE.d_model, SHAPE.vocab_size, SHAPE.mlp_dim
    block = 4 * d * d + 3 * d * m + 2 * d
    assert counts["linear"] - base_count == 2 * d * v
    assert counts["parallel"] - base_count == 2 * block
    assert counts["sequential"] - base_count == 2 * (block + 2 * d * d + 2 * d)


def test_rematerialised_trunk_gives_the_naive_loss_and_gradients():
    window = random_window(2, seed=3)

    def loss_and_grads(shape):
        graphdef, params = split(MTPModel(shape, 2, "sequential", rngs=nnx.Rngs(params=4)))
        return jax.jit(jax.value_and_grad(lambda p: mtp_loss(nnx.merge(graphdef, p), window, (1.0, 0.2))[0]))(params)

    loss, grads = loss_and_grads(SHAPE)
    remat_loss, remat_grads = loss_and_grads(dataclasses.replace(SHAPE, remat=True))
    graphdef, params = split(MTPModel(dataclasses.replace(SHAPE, remat=True), 2, "sequential", rngs=nnx.Rngs(0)))
    jaxpr = str(jax.make_jaxpr(lambda p: mtp_loss(nnx.merge(graphdef, p), window, (1.0, 0.2))[0])(params))
    assert jaxpr.count("remat") + jaxpr.count("checkpoint") > 3  # the blocks' and the heads' losses
    np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
    for g, ref in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_bfloat16_compute_tracks_float32_with_float32_parameters_and_gradients(head_type):
    window = random_window(3, seed=7)

    def loss_and_grads(shape):
        graphdef, params = split(MTPModel(shape, 3, head_type, rngs=nnx.Rngs(params=5)))
        return jax.jit(jax.value_and_grad(lambda p: mtp_loss(nnx.merge(graphdef, p), window, (1.0, 0.2, 0.1))[0]))(
            params
        )

    loss, grads = loss_and_grads(SHAPE)
    bf16_loss, bf16_grads = loss_and_grads(dataclasses.replace(SHAPE, dtype="bfloat16"))
    assert bf16_loss.dtype == jnp.float32  # the cross-entropy itself runs in float32
    np.testing.assert_allclose(float(bf16_loss), float(loss), rtol=1e-2)
    for g, ref in zip(jax.tree.leaves(bf16_grads), jax.tree.leaves(grads)):
        assert g.dtype == jnp.float32 and np.all(np.isfinite(g))
        assert np.linalg.norm(np.asarray(g) - np.asarray(ref)) <= 0.1 * np.linalg.norm(np.asarray(ref)) + 1e-6


def test_fused_projection_gives_the_separate_dots_values_and_gradients():
    from mtp_jax.model import fused_projection

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 24, 16))
    weights = [nnx.Param(jax.random.normal(keys[1], (16, 2, 4))), nnx.Param(jax.random.normal(keys[2], (16, 12)))]

    def run(fuse, x):
        return [np.asarray(y) for y in fused_projection(x, weights, jnp.float32, fuse=fuse)]

    fused, separate = run(True, x), run(False, x)
    reference = np.asarray(x) @ np.asarray(weights[0][...]).reshape(16, 8)
    np.testing.assert_allclose(fused[0], reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused, separate):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def grad(fuse):
        return jax.grad(lambda x: sum(jnp.sum(y**2) for y in fused_projection(x, weights, jnp.float32, fuse)))(x)

    # float32 sums in another order: the error scales with the summands (up to ~100 here), not with
    # an entry that cancels to near zero, hence an absolute tolerance relative to the largest entry.
    fused_grad, separate_grad = grad(True), grad(False)
    np.testing.assert_allclose(fused_grad, separate_grad, rtol=1e-5, atol=1e-6 * np.abs(separate_grad).max())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_unembed_argmax_is_numpys_first_argmax_ties_included(tie, rows):
    shape = ModelShape(vocab_size=67, d_model=32, n_layers=1, n_heads=4, mlp_dim=48, tie_embeddings=tie)
    decoder = MTPModel(shape, 1, "linear", rngs=nnx.Rngs(params=3)).decoder
    w = np.asarray(decoder.unembedding_matrix())  # [D, V]
    x = np.random.default_rng(rows).normal(size=(rows, shape.d_model)).astype(np.float32)
    x[0] = 0.0  # every logit ties: the first token wins
    expected = np.argmax(x @ w, axis=-1)
    assert expected[0] == 0
    np.testing.assert_array_equal(np.asarray(decoder.unembed_argmax(jnp.asarray(x))), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(decoder.unembed_argmax)(jnp.asarray(x[None]))), expected[None])
