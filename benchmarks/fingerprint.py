"""What a code change must not change: one short training run and everything read from its workdir.

    python benchmarks/fingerprint.py --root=CHECKOUT --workdir=DIR --out=FILE.json [-- TRAIN_FLAGS…]
    python benchmarks/fingerprint.py --compare A.json B.json

The first form trains with CHECKOUT's code (PYTHONPATH=CHECKOUT, configs read from there), then
records the run's logged losses and accuracies (timings left out), the texts of greedy, sampled
and self-speculative (chain and tree) generation on a fixed prompt, the induction and parse-rate
probes of `evaluate`, and the sha256 of every file `export` writes. The second form compares two
records key by key and exits 1 when anything differs: two checkouts behave the same when their
records are equal bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys

TRAIN = [
    "--config=configs/mtp3.py:tiny",
    "--config.data.source=stdlib/email",
    "--config.data.val_fraction=0.1",
    "--config.seq_len=64",
    "--config.num_train_steps=20",
    "--config.eval_every=10",
    "--config.induction_batches=1",
    "--config.parse_rate_prompts=2",
    "--config.parse_rate_tokens=32",
    "--config.sample_tokens=16",
]
PROMPT = "def "
GENERATE = {
    "greedy": [],
    "sampled": ["--temperature=0.8", "--seed=1"],
    "chain": ["--speculative"],
    "tree": ["--speculative", "--tree_size=4"],
    "chain_sampled": ["--speculative", "--temperature=0.8", "--seed=1"],
}
EVALUATE = {
    "induction": ["--induction_batches=1"],
    "parse_rate": ["--parse_rate_prompts=2", "--parse_rate_tokens=32"],
    "task": [],
}
TIMINGS = ("time", "per_sec", "mfu", "seconds")  # substrings of logged keys that measure the clock


def python(root: pathlib.Path, module: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=env, capture_output=True, text=True)
    if check and done.returncode:
        raise SystemExit(f"error: python -m {module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def record(root: pathlib.Path, workdir: pathlib.Path, train_flags: list[str]) -> dict:
    python(root, "mtp_jax.main", [*train_flags, f"--workdir={workdir}"])
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    out = {"metrics": [{k: v for k, v in row.items() if not any(t in k for t in TIMINGS)} for row in logged]}
    for name, flags in GENERATE.items():
        result = json.loads(
            python(
                root,
                "mtp_jax.generate",
                [f"--workdir={workdir}", f"--prompt={PROMPT}", "--max_new_tokens=24", "--json", *flags],
            ).stdout
        )
        out[f"generate/{name}"] = {k: v for k, v in result.items() if not any(t in k for t in TIMINGS)}
    for probe, flags in EVALUATE.items():
        # A probe the run's data cannot serve (Python files, a task) is recorded by its error line.
        done = python(
            root, "mtp_jax.evaluate", [f"--workdir={workdir}", f"--probe={probe}", "--json", *flags], check=False
        )
        error = done.stderr.strip().splitlines()[-1:]  # the error line, without the runtime's start-up noise
        result = json.loads(done.stdout) if done.returncode == 0 else {"error": error}
        out[f"evaluate/{probe}"] = {k: v for k, v in result.items() if k != "workdir"}
    export = workdir.with_name(workdir.name + "_hf")
    python(root, "mtp_jax.export", [f"--workdir={workdir}", f"--out={export}"])
    out["export"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(export.iterdir())}
    return out


def differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=pathlib.Path, help="the checkout whose code runs")
    p.add_argument("--workdir", type=pathlib.Path, help="a new training workdir")
    p.add_argument("--out", type=pathlib.Path, help="where the record is written (JSON)")
    p.add_argument("--compare", nargs=2, type=pathlib.Path, metavar=("A", "B"), help="two records to compare")
    args, train_flags = p.parse_known_args()
    if args.compare:
        a, b = (json.loads(f.read_text()) for f in args.compare)
        found = differences(a, b)
        print("\n".join(found) if found else f"identical: {len(json.dumps(a))} characters of record")
        raise SystemExit(1 if found else 0)
    if not (args.root and args.workdir and args.out):
        p.error("--root, --workdir and --out are required (or --compare A B)")
    flags = [f for f in train_flags if f != "--"] or TRAIN
    args.out.write_text(json.dumps(record(args.root.resolve(), args.workdir.resolve(), flags), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
