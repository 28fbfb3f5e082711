"""Sharding: mesh sizes from config, where the rules put each parameter, and sharded training that
equals one device's for every preset and MTP head type; the compiled memory per device."""

import functools
import math
from typing import NamedTuple

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mtp_jax import sharding, train_step
from mtp_jax.errors import UserError
from tests.util import load_config

VOCAB = 256
STEPS = 3
# The presets of configs/base.py: the mesh shape alone picks the strategy.
PRESETS = {
    "data_parallel_8": dict(data=-1, fsdp=1, tensor=1),
    "fsdp_8": dict(data=1, fsdp=-1, tensor=1),
    "fsdp_4_tensor_2": dict(data=1, fsdp=-1, tensor=2),
}
SINGLE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def tiny_config(head_type: str, mesh: dict):
    """The tiny MTP config shrunk further (compile time dominates); grad_clip off so that Adam's
    first moment holds the raw gradients."""
    config = load_config()
    config.mtp_head_type = head_type
    config.mtp_n_tokens = 2
    config.model.d_model, config.model.mlp_dim, config.seq_len = 32, 64, 16
    config.grad_clip = 0.0
    config.mesh.update(mesh)
    return config


def windows(config) -> np.ndarray:
    """STEPS batches of random token windows [STEPS, B, T + n] (int32)."""
    shape = (STEPS, config.batch_size, config.seq_len + config.mtp_n_tokens)
    return np.random.default_rng(0).integers(0, VOCAB, shape, dtype=np.int32)


class Run(NamedTuple):
    losses: np.ndarray  # [STEPS]
    grads: list  # the gradients of each step, host trees shaped like the parameters
    start: dict  # the initial state, on the host
    state: dict  # the final state, on the mesh
    memory: object  # the compiled step's memory analysis


@functools.cache
def trajectory(head_type: str, preset: str | None) -> Run:
    """STEPS train steps on the preset's mesh over 8 devices (None: one device), all from the
    one-device run's initial state (compiling the sharded initialiser costs as much as the step).

    The gradient of step k comes out of Adam's first moment: mu_k = b1 mu_{k-1} + (1 - b1) g_k."""
    config = tiny_config(head_type, PRESETS[preset] if preset else SINGLE_DEVICE)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:8] if preset else jax.devices()[:1])
    setup = train_step.make_train_step(config, VOCAB, mesh, STEPS)
    if preset is None:
        start = jax.device_get(jax.jit(setup.init_state, out_shardings=setup.state_shardings)())
    else:
        start = trajectory(head_type, None).start
    state = jax.device_put(start, setup.state_shardings)
    b1 = config.adam_b1
    mu_before = optax.tree_utils.tree_get(start["opt_state"], "mu")
    losses, grads = [], []
    for batch in windows(config):
        state, metrics = setup.step_fn(state, sharding.global_batch(batch, mesh))
        mu = jax.device_get(optax.tree_utils.tree_get(state["opt_state"], "mu"))
        grads.append(jax.tree.map(lambda m, m0: (m - b1 * m0) / (1 - b1), mu, mu_before))
        losses.append(float(metrics["total_loss"]))
        mu_before = mu
    return Run(np.array(losses), grads, start, state, setup.step_fn.memory_analysis())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("head_type", ["linear", "parallel", "sequential"])
def test_sharded_losses_and_gradients_equal_one_device(head_type, preset):
    run, ref = trajectory(head_type, preset), trajectory(head_type, None)
    np.testing.assert_allclose(run.losses, ref.losses, rtol=1e-5)
    for step_grads, ref_step_grads in zip(run.grads, ref.grads):
        for path, g in jax.tree_util.tree_flatten_with_path(step_grads)[0]:
            ref = functools.reduce(lambda t, k: t[k.key], path, ref_step_grads)
            scale = np.abs(ref).max()
            assert scale > 0, jax.tree_util.keystr(path)
            # Relative to the parameter's largest gradient entry: single entries can be ~0.
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def spec(x):
    """x's PartitionSpec without trailing Nones (P('fsdp', None) and P('fsdp') mean the same)."""
    axes = list(x.sharding.spec)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


# (path in the params, its shape, its PartitionSpec under the rules): embed -> fsdp; heads, mlp, vocab -> tensor.
RULED = {
    "common": [
        (("decoder", "embedding"), (VOCAB, 32), P("tensor", "fsdp")),
        (("decoder", "unembedding"), (32, VOCAB), P("fsdp", "tensor")),
        (("decoder", "blocks", 0, "attn", "wq"), (32, 4, 8), P("fsdp", "tensor")),
        (("decoder", "blocks", 0, "attn", "wo"), (4, 8, 32), P("tensor", None, "fsdp")),
        (("decoder", "blocks", 1, "mlp", "w_down"), (64, 32), P("tensor", "fsdp")),
        (("decoder", "final_norm", "scale"), (32,), P()),
    ],
    "linear": [(("heads", 0), (32, VOCAB), P("fsdp", "tensor"))],
    "parallel": [
        (("heads", 0, "attn", "wk"), (32, 4, 8), P("fsdp", "tensor")),
        (("heads", 0, "mlp", "w_up"), (32, 64), P("fsdp", "tensor")),
    ],
    "sequential": [
        (("heads", 0, "merge"), (64, 32), P(None, "fsdp")),
        (("heads", 0, "block", "attn", "wv"), (32, 4, 8), P("fsdp", "tensor")),
    ],
}


@pytest.mark.parametrize("head_type", ["linear", "parallel", "sequential"])
def test_parameters_and_adam_moments_are_sharded_as_the_rules_say(head_type):
    state = trajectory(head_type, "fsdp_4_tensor_2").state
    mesh_sizes = {"fsdp": 4, "tensor": 2, None: 1}
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    for path, shape, expected in RULED["common"] + RULED[head_type]:
        for tree in (state["params"], mu):
            x = functools.reduce(lambda t, k: t[k], path, tree)
            assert x.shape == shape and spec(x) == expected, (path, x.shape, x.sharding.spec)
            expected_shard = tuple(s // mesh_sizes[a] for s, a in zip(shape, tuple(expected) + (None,) * 3))
            assert {s.data.shape for s in x.addressable_shards} == {expected_shard}, path
    assert spec(state["step"]) == P()


def test_data_parallel_replicates_every_parameter():
    state = trajectory("linear", "data_parallel_8").state
    for x in jax.tree.leaves(state):
        assert all(s.data.shape == x.shape for s in x.addressable_shards)


@pytest.mark.parametrize("preset", [None, "fsdp_4_tensor_2"])
def test_compiled_memory_report_is_per_device(preset):
    """The step's argument bytes are one device's shards of the state and the batch."""
    run = trajectory("linear", preset)
    config = tiny_config("linear", SINGLE_DEVICE)
    batch_rows = config.batch_size // (4 if preset else 1)  # the batch splits over data x fsdp = 4
    expected = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(run.state))
    expected += batch_rows * (config.seq_len + config.mtp_n_tokens) * 4
    assert run.memory.argument_size_in_bytes == expected


@pytest.mark.parametrize("head_type", ["linear", "sequential"])
def test_fsdp_needs_less_memory_per_device_than_data_parallel(head_type):
    # Without gathering weights for compute (sharding.compute_shardings) GSPMD split the activations'
    # features instead of their batch: here FSDP's temporaries were 1.8-2.2x data parallelism's.
    fsdp, dp = (trajectory(head_type, p).memory for p in ("fsdp_8", "data_parallel_8"))
    assert fsdp.argument_size_in_bytes < dp.argument_size_in_bytes / 4
    assert fsdp.temp_size_in_bytes <= dp.temp_size_in_bytes
    assert train_step.memory_per_device(fsdp) < train_step.memory_per_device(dp)


@pytest.mark.parametrize(
    "sizes, n_devices, shape",
    [
        (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
        (dict(data=1, fsdp=-1, tensor=2), 8, (1, 4, 2)),
        (dict(data=2, fsdp=-1, tensor=1), 4, (2, 2, 1)),
        (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
        (dict(data=-1, fsdp=1, tensor=1), 1, (1, 1, 1)),
    ],
)
def test_mesh_minus_one_fills_the_remaining_devices(sizes, n_devices, shape):
    assert sharding.mesh_shape(sizes, n_devices) == shape
    mesh = sharding.make_mesh(sizes, jax.devices()[:n_devices])
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == sharding.MESH_AXES


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(data=3, fsdp=-1, tensor=1), "mesh.data=3, mesh.fsdp=-1, mesh.tensor=1 does not divide the 8 devices"),
        (dict(data=2, fsdp=2, tensor=1), "does not divide the 8 devices: choose sizes whose product is 8"),
        (dict(data=-1, fsdp=-1, tensor=1), "is invalid: give positive sizes with at most one -1"),
        (dict(data=0, fsdp=-1, tensor=1), "is invalid"),
    ],
)
def test_mesh_that_does_not_divide_the_devices_is_refused_in_one_line(sizes, message):
    with pytest.raises(UserError, match=message) as error:
        sharding.mesh_shape(sizes, 8)
    assert "\n" not in str(error.value)


def test_batch_that_does_not_divide_over_data_and_fsdp_is_refused_in_one_line():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    sharding.check_batch(8, mesh)
    with pytest.raises(
        UserError, match="batch_size=6 does not divide over the mesh's data x fsdp = 4 shards: use a multiple of 4"
    ) as error:
        sharding.check_batch(6, mesh)
    assert "\n" not in str(error.value)
