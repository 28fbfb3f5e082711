"""The train step with each attention implementation, timed interleaved in one process.

    python benchmarks/attention_variants.py [--preset=nano] [--rounds=4] [--steps=3]

Variants (config `model.attention`, benchmarks/NOTES.md §5 and §7):
  xla            the reference (scores, position mask, softmax, weighted sum);
  skip           returns v: no attention at all, which bounds what any attention could save;
  dot_product    jax.nn.dot_product_attention (XLA's implementation on CPU);
  blockwise_B    online softmax over blocks of B queries x B keys, masked blocks skipped.
Median step time of each as a ratio to the first, and each step's compiled temporaries.
"""

import argparse
import pathlib
import runpy
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import attention, bench, sharding  # noqa: E402
from mtp_jax.train import make_train_step  # noqa: E402

VARIANTS = {"xla": ("xla", 0), "skip": ("skip", 0), "dot_product": ("dot_product", 0),
            "blockwise_512": ("blockwise", 512), "blockwise_256": ("blockwise", 256),
            "blockwise_128": ("blockwise", 128), "blockwise_64": ("blockwise", 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    args = parser.parse_args()
    config = runpy.run_path(str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "baseline.py"))[
        "get_config"](args.preset)
    attention.IMPLEMENTATIONS["skip"] = lambda q, k, v, *_: v
    mesh = sharding.make_mesh(config.mesh)
    steppers, temps = {}, {}
    for name in args.variants.split(","):
        config.model.attention, config.model.attention_block_size = VARIANTS[name]
        setup = make_train_step(config, bench.vocab_size(config), mesh, config.num_train_steps)
        temps[name] = setup.step_fn.memory_analysis().temp_size_in_bytes
        steppers[name] = bench.make_stepper(config, setup, mesh, args.rounds * args.steps + 2)
    for step in steppers.values():
        step(), step()
    times = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            times[name] += [step() for _ in range(args.steps)]
    base = statistics.median(next(iter(times.values())))
    for name, t in times.items():
        print(f"{name:14s} {statistics.median(t):.3f} s  {statistics.median(t) / base:.3f}x  "
              f"temp {temps[name] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
