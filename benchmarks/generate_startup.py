"""How soon `generate` starts decoding: a first and a second invocation on one model, side by side.

    python benchmarks/generate_startup.py [--workdir=RUN] [--repeats=3]

Without --workdir, trains the default model (`configs/mtp4.py`, nano, n = 4 linear heads) for 2
steps into a temporary folder: how soon decoding starts does not depend on how long the model
trained. Then, for each repeat, with a new empty JAX_COMPILATION_CACHE_DIR, runs

    python -m mtp_jax.generate --workdir=RUN --prompt='def main():' --speculative --max_new_tokens=64 --json

twice. Time to start decoding = the process's wall time minus the decode_seconds it reports:
the interpreter's start, imports, loading the checkpoint, compiling the program (first) or
loading it from the cache (second), and exit. Prints each pair and the median ratio of second
to first; one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_jax.machine import cpu_model  # noqa: E402  (after the repository root is on the path)

GENERATE = ["--prompt=def main():", "--speculative", "--max_new_tokens=64", "--json"]


def train(workdir: pathlib.Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.main",
            "--config=configs/mtp4.py",
            f"--workdir={workdir}",
            "--config.num_train_steps=2",
            "--config.eval_every=1000",
            "--config.sample_tokens=0",
            "--config.induction_batches=0",
            "--config.parse_rate_prompts=0",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_seconds(workdir: pathlib.Path, cache: pathlib.Path) -> tuple[float, dict]:
    """(wall time minus decoding, generate's JSON) of one invocation."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mtp_jax.generate", f"--workdir={workdir}", *GENERATE],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall - out["decode_seconds"], out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="a trained workdir (default: train the default model for 2 steps)")
    p.add_argument("--repeats", type=int, default=3, help="pairs of invocations, each with a fresh cache")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        workdir = pathlib.Path(args.workdir) if args.workdir else tmp / "run"
        if not args.workdir:
            train(workdir)
        pairs = []
        for repeat in range(args.repeats):
            cache = tmp / f"cache{repeat}"
            (first, out1), (second, out2) = (start_seconds(workdir, cache) for _ in range(2))
            pairs.append(
                {
                    "first_s": round(first, 2),
                    "second_s": round(second, 2),
                    "first_compile_s": round(out1["compile_seconds"], 2),
                    "second_compile_s": round(out2["compile_seconds"], 2),
                    "ratio": round(second / first, 3),
                }
            )
            print(
                f"repeat {repeat}: first {first:.2f} s (compiling {out1['compile_seconds']:.2f} s), second "
                f"{second:.2f} s (compiling {out2['compile_seconds']:.2f} s): {second / first:.2f}",
                flush=True,
            )
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "cores": os.cpu_count(),
                "pairs": pairs,
                "median_first_s": statistics.median(p["first_s"] for p in pairs),
                "median_second_s": statistics.median(p["second_s"] for p in pairs),
                "median_ratio": statistics.median(p["ratio"] for p in pairs),
            }
        )
    )


if __name__ == "__main__":
    main()
