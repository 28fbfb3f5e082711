"""Cost of one task-accuracy evaluation (evaluate.task_accuracy) with the decoders compiled once
per run versus compiled at every evaluation, interleaved in one process.

    python benchmarks/task_eval_cost.py [--preset=nano] [--task=polyarith] [--repeats=3]

Prints one JSON line: median seconds per evaluation in each mode and their ratio.
"""

import argparse
import json
import pathlib
import runpy
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mtp_jax import evaluate  # noqa: E402
from mtp_jax.decoding import Generator  # noqa: E402
from mtp_jax.mtp import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--task", default="polyarith", choices=("polyarith", "pathstar"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    config = runpy.run_path(str(ROOT / "configs" / "mtp4.py"))["get_config"](args.preset)
    config.data.source = f"task:{args.task}"
    model = build_model(config, 256, seed=0)  # untrained: decoding costs the same
    problems = evaluate.held_out_problems(config)
    reused = Generator(model, evaluate.answer_capacity(problems))
    evaluate.task_accuracy(model, config, problems, reused)  # warm the reused decoder
    times = {"reused": [], "recompiled": []}
    for i in range(args.repeats):
        for mode in ("reused", "recompiled") if i % 2 == 0 else ("recompiled", "reused"):
            begin = time.perf_counter()
            evaluate.task_accuracy(model, config, problems, reused if mode == "reused" else None)
            times[mode].append(time.perf_counter() - begin)
    medians = {mode: float(np.median(t)) for mode, t in times.items()}
    print(
        json.dumps(
            {
                "preset": args.preset,
                "task": args.task,
                "eval_problems": config.data.task.eval_problems,
                **{f"{m}_s": v for m, v in medians.items()},
                "ratio": medians["recompiled"] / medians["reused"],
            }
        )
    )


if __name__ == "__main__":
    main()
