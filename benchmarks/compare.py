"""Train-step throughput of mtp_jax against the same model in PyTorch (eager and torch.compile).

    python benchmarks/compare.py [--preset=nano] [--rounds=5] [--steps=5] [--dtype=float32] [--json]

For the baseline and for n = 4 linear heads, each implementation takes the same train step
(forward, backward, gradient clipping, AdamW) on the same shape, in this one process with the same
thread count. Parameters and optimiser state are float32; `--dtype=bfloat16` computes in bfloat16 as
each framework's users would ask for it: `model.dtype` in our config, `torch.autocast` in PyTorch.
Timing is interleaved — a round is `steps` steps of JAX, then of eager,
then of compiled PyTorch — so that load from other users of the machine falls on all three alike;
the figure is the median step time over all rounds. Needs the `bench` extra (torch).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks import torch_reference  # noqa: E402
from mtp_jax import bench, flops, sharding  # noqa: E402
from mtp_jax.train_step import make_train_step  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def torch_stepper(config, compiled: bool):
    """One PyTorch train step on a fresh random window per call; returns its wall time."""
    model = torch_reference.from_config(config, flops.vocab_size(config))
    torch_reference.init_like_jax(model, config.seed)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    rest = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(config.adam_b1, config.adam_b2),
    )
    forward = torch.compile(model) if compiled else model
    gen = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, config.seq_len + model.n)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.model.dtype == "bfloat16")

    def step() -> float:
        window = torch.randint(0, flops.vocab_size(config), shape, generator=gen)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = forward(window)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        return time.perf_counter() - start

    return step


def jax_stepper(config, n_steps: int):
    mesh = sharding.make_mesh(config.mesh)
    return bench.make_stepper(
        config, make_train_step(config, flops.vocab_size(config), mesh, config.num_train_steps), mesh, n_steps
    )


def compare(config, rounds: int, steps: int) -> dict:
    steppers = {
        "jax": jax_stepper(config, rounds * steps + 2),
        "torch_eager": torch_stepper(config, False),
        "torch_compile": torch_stepper(config, True),
    }
    for step in steppers.values():  # warm-up: compilation and first-touch allocation
        step(), step()
    times = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            times[name] += [step() for _ in range(steps)]
    tokens = config.batch_size * config.seq_len
    return {
        "name": flops.config_name(config),
        "dtype": config.model.dtype,
        **{f"{name}_tokens_per_sec": tokens / statistics.median(t) for name, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per implementation per round")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())  # XLA's CPU client also uses every core
    results = []
    for name in ("baseline", "mtp4"):
        config = runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"](args.preset)
        config.mtp_head_type = "linear"
        config.model.dtype = args.dtype
        results.append(compare(config, args.rounds, args.steps))
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    if not args.json:
        print(f"{'config':<20} {'JAX tok/s':>10} {'eager':>10} {'compile':>10} {'JAX/eager':>10} {'JAX/compile':>12}")
        for r in results:
            jax_tps, eager, compiled = (r[f"{k}_tokens_per_sec"] for k in ("jax", "torch_eager", "torch_compile"))
            print(
                f"{r['name']:<20} {jax_tps:>10.0f} {eager:>10.0f} {compiled:>10.0f} {jax_tps / eager:>9.2f}x "
                f"{jax_tps / compiled:>11.2f}x"
            )
        print(
            f"{args.dtype}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; median step of "
            f"{args.rounds} interleaved rounds x {args.steps} steps"
        )


if __name__ == "__main__":
    main()
