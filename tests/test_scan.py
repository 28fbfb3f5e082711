"""model.scan_layers: the trunk as one scan over stacked parameters equals the Python loop
(initial parameters, losses, gradients, decoding with the KV cache), its stacked axis is not
sharded, and a workdir of one layout is refused by the other in one line."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import decoding, sharding, train
from mtp_jax.errors import UserError
from mtp_jax.heads import HEAD_TYPES
from mtp_jax.model import ModelShape, stack_layers, unstack_layers
from mtp_jax.mtp import MTPModel, mtp_loss
from tests.util import load_config

SHAPE = ModelShape(vocab_size=61, d_model=32, n_layers=3, n_heads=4, mlp_dim=48, attention="xla")
B, T, N_TOKENS = 2, 11, 3
WEIGHTS = (1.0, 0.5, 0.25)


def params_of(model) -> tuple[nnx.GraphDef, dict]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def loss_and_grads(graphdef, params, window):
    loss = lambda p: mtp_loss(nnx.merge(graphdef, p), window, WEIGHTS)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def assert_trees_equal(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance), a, b)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_scanned_layers_equal_the_loop_in_parameters_losses_and_gradients(head_type):
    loop = MTPModel(SHAPE, N_TOKENS, head_type, rngs=nnx.Rngs(params=0))
    scanned = MTPModel(dataclasses.replace(SHAPE, scan_layers=True), N_TOKENS, head_type, rngs=nnx.Rngs(params=0))
    (loop_def, loop_params), (scan_def, scan_params) = params_of(loop), params_of(scanned)
    n_stacked = len(loop.trunk_layers)  # 'parallel': head 1's own last layer stays out of the stack
    assert scan_params["decoder"]["layer_stack"]["attn"]["wq"].shape == (n_stacked, 32, 4, 8)
    assert_trees_equal(stack_layers(loop_params, n_stacked), scan_params, rtol=0, atol=0)  # same init
    assert_trees_equal(unstack_layers(scan_params), loop_params, rtol=0, atol=0)

    window = jnp.asarray(np.random.default_rng(0).integers(0, SHAPE.vocab_size, (B, T + N_TOKENS)), jnp.int32)
    (loop_loss, loop_metrics), loop_grads = loss_and_grads(loop_def, loop_params, window)
    (scan_loss, scan_metrics), scan_grads = loss_and_grads(scan_def, scan_params, window)
    assert_trees_equal(scan_metrics, loop_metrics, rtol=1e-6)
    assert_trees_equal(unstack_layers(scan_grads), loop_grads, rtol=1e-5, atol=1e-7)


def test_scanned_layers_with_remat_equal_the_loop():
    window = jnp.asarray(np.random.default_rng(1).integers(0, SHAPE.vocab_size, (B, T + N_TOKENS)), jnp.int32)
    loop_def, loop_params = params_of(MTPModel(SHAPE, N_TOKENS, "sequential", rngs=nnx.Rngs(params=0)))
    shape = dataclasses.replace(SHAPE, scan_layers=True, remat=True)
    scan_def, scan_params = params_of(MTPModel(shape, N_TOKENS, "sequential", rngs=nnx.Rngs(params=0)))
    (loop_loss, _), loop_grads = loss_and_grads(loop_def, loop_params, window)
    (scan_loss, _), scan_grads = loss_and_grads(scan_def, scan_params, window)
    np.testing.assert_allclose(float(scan_loss), float(loop_loss), rtol=1e-6)
    assert_trees_equal(unstack_layers(scan_grads), loop_grads, rtol=1e-5, atol=1e-7)


def test_decoding_with_stacked_caches_equals_the_loop():
    """Plain (sampled, so log-probabilities are compared too) and self-speculative decoding
    through stacked per-layer caches give the loop's tokens. 'parallel' heads: the cache list
    holds the stack, head 1's own decoder layer and the heads' blocks."""
    head_type = "parallel"
    prompt = [3, 1, 4, 1, 5, 9, 2]

    def decode(shape):
        generator = decoding.Generator(MTPModel(shape, N_TOKENS, head_type, rngs=nnx.Rngs(params=0)), 24)
        plain = generator.generate(prompt, 12, temperature=1.0, seed=3)
        return plain, generator.speculative(prompt, 12).tokens

    (plain, speculative), (loop_plain, loop_speculative) = (
        decode(dataclasses.replace(SHAPE, scan_layers=True)),
        decode(SHAPE),
    )
    assert plain.tokens == loop_plain.tokens and speculative == loop_speculative
    np.testing.assert_allclose(plain.logprobs, loop_plain.logprobs, rtol=1e-5, atol=1e-6)


def test_stacked_axis_is_not_sharded_and_the_rest_follow_the_rules():
    model = nnx.eval_shape(
        lambda: MTPModel(dataclasses.replace(SHAPE, scan_layers=True), 2, "linear", rngs=nnx.Rngs(params=0))
    )
    abstract = nnx.split(model, nnx.Param)[1]
    axes = sharding.logical_axes(abstract)
    assert axes["decoder"]["layer_stack"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
    mesh = sharding.make_mesh(load_config("mtp3", overrides={"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}).mesh)
    shardings = sharding.param_shardings(nnx.to_pure_dict(abstract), axes, mesh)
    assert tuple(shardings["decoder"]["layer_stack"]["attn"]["wq"].spec) == (None, "fsdp", "tensor", None)
    assert tuple(shardings["decoder"]["layer_stack"]["mlp"]["w_down"].spec) == (None, "tensor", "fsdp")


def test_workdir_of_the_other_layout_is_refused_in_one_line(tmp_path):
    # The config.json a loop-layout run saved.
    saved = load_config("mtp3")
    saved_json = json.loads(saved.to_json_best_effort())
    (tmp_path / "config.json").write_text(json.dumps({**saved_json, "vocab_size": 256}))
    train.check_workdir(tmp_path, saved, 256, has_checkpoints=True)  # the same layout resumes
    scanned = load_config("mtp3", overrides={"model.scan_layers": True})
    with pytest.raises(UserError, match=r"model.scan_layers False -> True"):
        train.check_workdir(tmp_path, scanned, 256, has_checkpoints=True)
