"""The memory-efficient loss and the benchmark tool: chunked == unchunked, memory bounded, honest figures."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import bench
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel, build_model, cross_entropy, mtp_loss
from tests.util import ROOT, load_config

REQUIRED_KEYS = {
    "name",
    "params",
    "flops_per_step",
    "temp_bytes",
    "argument_bytes",
    "step_time_s",
    "tokens_per_sec",
    "mfu",
}


@pytest.mark.parametrize("chunk_size", [4, 5, 16])  # divides T, leaves a padded last chunk, one chunk
def test_chunked_cross_entropy_and_gradients_equal_unchunked(chunk_size):
    b, t, d, v = 2, 16, 8, 37
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)

    def loss(h, w, c):
        return cross_entropy(h, w, targets, c)

    (ref, ref_acc), ref_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w, 0)
    (got, acc), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w, chunk_size)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    assert float(acc) == float(ref_acc)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6, atol=1e-7)


def loss_grad_temp_bytes(n: int, chunk_size: int, shape: ModelShape, b: int, t: int) -> int:
    """Compiled temporary memory of value_and_grad of the MTP loss (linear heads), one device."""
    graphdef, params = nnx.split(MTPModel(shape, n, "linear", rngs=nnx.Rngs(params=0)), nnx.Param)
    window = jax.ShapeDtypeStruct((b, t + n), jnp.int32)

    def loss(p, window):
        return mtp_loss(nnx.merge(graphdef, p), window, (1.0,) + (0.3,) * (n - 1), chunk_size)[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, window).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_four_linear_heads_cost_little_more_temp_memory_than_the_baseline():
    # Large vocabulary and many tokens: logits ([B, T, V] float32 = 8 MiB per head) dominate, as
    # at GPT-2 scale. Naively four heads keep four of them; chunked and rematerialised, one chunk.
    shape, b, t = ModelShape(vocab_size=8192, d_model=32, n_layers=1, n_heads=2, mlp_dim=64), 2, 128
    logits_bytes = b * t * shape.vocab_size * 4
    baseline = loss_grad_temp_bytes(1, 32, shape, b, t)
    four_heads = loss_grad_temp_bytes(4, 32, shape, b, t)
    unchunked = loss_grad_temp_bytes(4, 0, shape, b, t)
    assert four_heads <= 1.3 * baseline, (four_heads, baseline)
    assert four_heads < logits_bytes < unchunked, (four_heads, logits_bytes, unchunked)


def test_compile_only_reports_the_real_step_with_sane_figures():
    config = load_config("mtp3")
    result = bench.bench_config(config, compile_only=True, steps=0, warmup=0, peak=None)
    assert REQUIRED_KEYS <= result.keys()
    model = build_model(config, 256, seed=0)
    assert result["params"] == sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # XLA's count (summed over the 8 test devices) includes everything the analytic count has.
    assert result["flops_per_step"] >= result["model_flops_per_step"] > 0
    assert result["temp_bytes"] > 0 and result["argument_bytes"] > 0
    assert result["step_time_s"] is None and result["tokens_per_sec"] is None and result["mfu"] is None


def test_command_line_times_steps_and_prints_one_json_object_per_config():
    # A plain process: one CPU device, as a user runs it.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.bench",
            "--config=configs/mtp3.py:tiny",
            "--json",
            "--steps=3",
            "--warmup=1",
            "--config.batch_size=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    (result,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert REQUIRED_KEYS <= result.keys() and result["name"] == "tiny linear n=3"
    assert result["step_time_s"] > 0
    assert result["tokens_per_sec"] == pytest.approx(2 * 32 / result["step_time_s"])
    # MFU is the analytic FLOPs over the step time and the measured peak (a wall-clock ratio a busy
    # machine can push past 1, so no bound on its value).
    assert (
        result["mfu"] == pytest.approx(result["model_flops_per_step"] / result["step_time_s"] / result["peak_flops"])
        and result["mfu"] > 0
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config=configs/mtp3.py:huge"], "unknown preset 'huge'"),
        (["--config=configs/mtp3.py:tiny", "--config.mtp_n_tokenz=4"], 'Did you mean "mtp_n_tokens"'),
        (["--config=configs/mtp3.py:tiny", "--config.mtp_head_type=tree", "--compile_only"], "mtp_head_type='tree'"),
        # Refused before compiling: no median of zero timed steps.
        (["--config=configs/mtp3.py:tiny", "--steps=0"], "--steps=0 --warmup=2: time at least one step"),
        (["--config=configs/mtp3.py:tiny", "--warmup=-1"], "or pass --compile_only to time none"),
    ],
)
def test_command_line_bad_input_gets_one_error_line_and_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", "mtp_jax.bench", *argv], cwd=ROOT, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
