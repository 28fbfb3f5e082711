"""The nano MLP's forward and backward under different weight layouts, timed interleaved.

    python benchmarks/mlp_variants.py [--rounds=7]

Why `model.fused_projection` exists (benchmarks/NOTES.md §5): on XLA-CPU one dot reading a
[2m, d] matrix transposed is much faster than separate gate and up dots, because the weight
gradients then need no transposed copy of the activation gradient. Each variant computes
the gradients of sum(SwiGLU(x)) with respect to the weights and x, for x [16, 256, 384] and
m = 1024; the figure is the median call time.
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax.model import fused_projection  # noqa: E402


def swiglu_down(gate, up, w_down):
    return jnp.sum((jax.nn.silu(gate) * up) @ w_down)


def variants(wg, wu):
    """name -> (loss(params, x), params): the same function of x with differently laid out weights."""
    return {
        "separate [d, m] (before)": (lambda p, x: swiglu_down(x @ p[0], x @ p[1], p[2]), (wg, wu)),
        "separate [m, d], read transposed": (lambda p, x: swiglu_down(x @ p[0].T, x @ p[1].T, p[2]), (wg.T, wu.T)),
        "fused [d, 2m]": (
            lambda p, x: swiglu_down(*jnp.split(x @ p[0], 2, axis=-1), p[1]),
            (jnp.concatenate([wg, wu], axis=1),),
        ),
        "fused [2m, d], read transposed": (
            lambda p, x: swiglu_down(*jnp.split(x @ p[0].T, 2, axis=-1), p[1]),
            (jnp.concatenate([wg.T, wu.T]),),
        ),
        "fused at run time from [d, m] (model.fused_projection)": (
            lambda p, x: swiglu_down(
                *fused_projection(x, [nnx.Param(p[0]), nnx.Param(p[1])], x.dtype, fuse=True), p[2]
            ),
            (wg, wu),
        ),
        "stacked [2, m, d] einsum": (
            lambda p, x: swiglu_down(
                *(lambda y: (y[..., 0, :], y[..., 1, :]))(jnp.einsum("btd,kmd->btkm", x, p[0])), p[1]
            ),
            (jnp.stack([wg.T, wu.T]),),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (16, 256, 384))
    wg, wu = (0.02 * jax.random.normal(k, (384, 1024)) for k in keys[1:3])
    w_down = 0.02 * jax.random.normal(keys[3], (1024, 384))
    reference = None
    calls = {}
    for name, (loss, weights) in variants(wg, wu).items():
        grad = jax.jit(jax.grad(lambda p, x, loss=loss: loss(p, x), argnums=(0, 1)))  # weights' and x's
        params = (*weights, w_down)
        dx = np.asarray(grad(params, x)[1])
        reference = dx if reference is None else reference
        np.testing.assert_allclose(dx, reference, rtol=1e-4, atol=1e-6)  # the same function
        calls[name] = (grad, params)
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, (grad, params) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(grad(params, x))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(next(iter(times.values())))
    for name, t in times.items():
        print(f"{statistics.median(t) * 1000:7.1f} ms  {statistics.median(t) / base:5.2f}x  {name}")


if __name__ == "__main__":
    main()
