"""The nano train step with attention swapped for variants, timed interleaved in one process.

    python benchmarks/attention_variants.py [--preset=nano] [--rounds=4] [--steps=3]

Variants of `model.attend` (the training path: T == S, keys at the query positions):
  einsum     ours (scores, position mask, softmax, weighted sum);
  skip       returns v: no attention at all, which bounds what any attention could save;
  block128   causal by query blocks of 128: block i reads only keys [0, 128 (i + 1)),
             skipping the masked half of the scores;
  block64    the same with blocks of 64;
  xla_sdpa   jax.nn.dot_product_attention (XLA's implementation), transposed in and out.
Median step time of each as a ratio to the first (benchmarks/NOTES.md §5).
"""

import argparse
import functools
import pathlib
import runpy
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import bench, model, sharding  # noqa: E402
from mtp_jax.train import make_train_step  # noqa: E402

ours = model.attend


def skip(q, k, v, q_positions, k_positions):
    return v


def blockwise(q, k, v, q_positions, k_positions, block: int):
    t = q.shape[-2]
    outs = []
    for i in range(t // block):
        queries, keys = slice(i * block, (i + 1) * block), slice(0, (i + 1) * block)
        outs.append(ours(q[..., queries, :], k[..., keys, :], v[..., keys, :],
                         q_positions[..., queries], k_positions[..., keys]))
    return jnp.concatenate(outs, axis=-2)


def xla_sdpa(q, k, v, q_positions, k_positions):
    def heads_minor(a):  # [B, N, T, H] <-> [B, T, N, H]
        return a.transpose(0, 2, 1, 3)

    return heads_minor(jax.nn.dot_product_attention(heads_minor(q), heads_minor(k), heads_minor(v), is_causal=True))


VARIANTS = {"einsum": ours, "skip": skip, "block128": functools.partial(blockwise, block=128),
            "block64": functools.partial(blockwise, block=64), "xla_sdpa": xla_sdpa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = parser.parse_args()
    config = runpy.run_path(str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "baseline.py"))[
        "get_config"](args.preset)
    mesh = sharding.make_mesh(config.mesh)
    steppers = {}
    for name, attend in VARIANTS.items():
        model.attend = attend  # read when the step is traced, below
        setup = make_train_step(config, bench.vocab_size(config), mesh, config.num_train_steps)
        steppers[name] = bench.make_stepper(config, setup, mesh, args.rounds * args.steps + 2)
    model.attend = ours
    for step in steppers.values():
        step(), step()
    times = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            times[name] += [step() for _ in range(args.steps)]
    base = statistics.median(times["einsum"])
    for name, t in times.items():
        print(f"{name:10s} {statistics.median(t):.3f} s  {statistics.median(t) / base:.3f}x")


if __name__ == "__main__":
    main()
