"""The train step under config variants, timed interleaved in one process.

    python benchmarks/step_variants.py [--preset=nano] [--variants=xla,blockwise_256,…] [--set=seq_len=1024 …]
        [--rounds=4] [--steps=3]

Variants (benchmarks/NOTES.md §5 and §7; `--set KEY=VALUE` changes the base config for all):
  xla            attention: the reference (scores, position mask, softmax, weighted sum);
  skip           attention returns v: no attention at all, which bounds what any attention could save;
  dot_product    attention: jax.nn.dot_product_attention (XLA's implementation on CPU);
  blockwise_B    attention: online softmax over blocks of B queries x B keys, masked blocks skipped;
  loop, scan     model.scan_layers False / True (attention as configured: 'auto').
Median step time of each as a ratio to the first, and each step's compiled temporaries.
"""

import argparse
import ast
import pathlib
import runpy
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import attention, bench, flops, sharding  # noqa: E402
from mtp_jax.train_step import make_train_step  # noqa: E402

VARIANTS = {
    "xla": {"model.attention": "xla"},
    "skip": {"model.attention": "skip"},
    "dot_product": {"model.attention": "dot_product"},
    **{
        f"blockwise_{b}": {"model.attention": "blockwise", "model.attention_block_size": b} for b in (512, 256, 128, 64)
    },
    "loop": {"model.scan_layers": False},
    "scan": {"model.scan_layers": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--config", default="baseline", help="a file in configs/ (without .py)")
    parser.add_argument("--variants", default="xla,skip,dot_product,blockwise_256,blockwise_128,blockwise_64")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for the base config (repeatable)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = parser.parse_args()
    root = pathlib.Path(__file__).resolve().parent.parent
    base = runpy.run_path(str(root / "configs" / f"{args.config}.py"))["get_config"](args.preset)
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a bare string
            pass
        base.update_from_flattened_dict({key: value})
    attention.IMPLEMENTATIONS["skip"] = lambda q, k, v, *_: v
    mesh = sharding.make_mesh(base.mesh)
    steppers, temps, compile_s = {}, {}, {}
    for name in args.variants.split(","):
        config = base.copy_and_resolve_references()
        config.update_from_flattened_dict(VARIANTS[name])
        start = time.perf_counter()
        setup = make_train_step(config, flops.vocab_size(config), mesh, config.num_train_steps)
        compile_s[name] = time.perf_counter() - start
        temps[name] = setup.step_fn.memory_analysis().temp_size_in_bytes
        steppers[name] = bench.make_stepper(config, setup, mesh, args.rounds * args.steps + 2)
    for step in steppers.values():
        step(), step()
    times = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            times[name] += [step() for _ in range(args.steps)]
    first = statistics.median(next(iter(times.values())))
    for name, t in times.items():
        print(
            f"{name:14s} {statistics.median(t):.3f} s  {statistics.median(t) / first:.3f}x  "
            f"temp {temps[name] / 2**20:.0f} MiB  compile {compile_s[name]:.1f} s"
        )


if __name__ == "__main__":
    main()
