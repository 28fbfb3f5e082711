"""What one verify pass costs against one plain decoding step, per tree size, on a trained workdir.

    python benchmarks/pass_cost.py --workdir=DIR [--tree_sizes=3,8,16,32] [--prompt_len=128]
        [--lookups=5,7] [--max_new_tokens=128] [--repeats=5] [--cache_len=512]

Self-speculative decoding pays when the tokens a pass commits exceed what the pass costs in plain
steps: speedup = tokens per pass / pass cost. This measures the cost side alone. Each mode decodes
the same prompt (validation tokens) twice per repeat, once for max_new_tokens and once for a single
token (the prefill alone); the difference in seconds over the difference in forward passes is the
time of one step (plain) or one verify pass (speculative), the prefill left out. A size of
n - 1 is the chain of drafts (3 for n = 4 heads); other sizes are Medusa trees fitted on the
workdir's validation windows, as `generate --tree_size` fits them; --lookups adds context-draft decoding
(`generate --lookup`), whose mean pass mixes the heads' chains and the copied ones (so it depends
on how much of the prompt's continuation repeats); the prompt is the first
window's first prompt_len tokens. Modes run interleaved, medians over repeats; `prefill_ms` is each
mode's one-token decode (the prompt's pass alone). Prints one JSON object (with the CPU and
the load average).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import workdir  # noqa: E402
from mtp_jax.acceptance import build_tree  # noqa: E402
from mtp_jax.cli import ArgumentParser, fail  # noqa: E402
from mtp_jax.decoding import Generator  # noqa: E402
from mtp_jax.errors import UserError  # noqa: E402
from mtp_jax.machine import cpu_model  # noqa: E402
from mtp_jax.speculative import Tree  # noqa: E402


def per_pass_seconds(decode, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Seconds of one forward pass after the prefill, and of the prefill alone (a one-token
    decode): decode(prompt, k) returns a Result."""
    long, short = decode(prompt, new_tokens), decode(prompt, 1)
    per_pass = (long.decode_seconds - short.decode_seconds) / (long.forward_passes - short.forward_passes)
    return per_pass, short.decode_seconds


def measure(
    trained: workdir.Trained,
    tree_sizes: list[int],
    lookups: list[int],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    cache_len: int,
) -> dict:
    model = trained.model
    if model.n_predict < 2:
        raise UserError("the model has no extra heads: train with mtp_n_tokens >= 2 to measure verify passes")
    generator = Generator(model, cache_len)
    windows = trained.tree_windows()  # the validation windows trees are fitted on
    prompt = windows.reshape(-1, windows.shape[-1])[0, :prompt_len].astype(int).tolist()
    modes = {"plain": lambda p, k: generator.generate(p, k)}
    for size in tree_sizes:
        chain = size == model.n_predict - 1
        tree = Tree.chain(size) if chain else build_tree(model, windows, size)
        modes["chain" if chain else f"tree_{size}"] = lambda p, k, tree=tree: generator.speculative(p, k, tree=tree)
    for size in lookups:
        modes[f"lookup_{size}"] = lambda p, k, size=size: generator.speculative(p, k, lookup=size)
    for decode in modes.values():  # compile before timing
        per_pass_seconds(decode, prompt, new_tokens)
    seconds, prefill = {mode: [] for mode in modes}, {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, decode in modes.items():
            per_pass, alone = per_pass_seconds(decode, prompt, new_tokens)
            seconds[mode].append(per_pass)
            prefill[mode].append(alone)
    plain = float(np.median(seconds["plain"]))
    return {
        "cpu": cpu_model(),
        "load_average": os.getloadavg(),
        "prompt_len": len(prompt),
        "new_tokens": new_tokens,
        "ms_per_pass": {mode: 1e3 * float(np.median(s)) for mode, s in seconds.items()},
        "cost_in_plain_steps": {mode: float(np.median(s)) / plain for mode, s in seconds.items()},
        "prefill_ms": {mode: 1e3 * float(np.median(s)) for mode, s in prefill.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python benchmarks/pass_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--tree_sizes", default="3,8,16,32", help="drafts per pass, comma-separated")
    p.add_argument(
        "--lookups", default="", help="chain lengths with drafts copied from the context (generate --lookup)"
    )
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache_len", type=int, default=512)
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.tree_sizes.split(",")]
        lookups = [int(s) for s in args.lookups.split(",") if s]
        if min(sizes + lookups) < 1 or args.repeats < 1 or args.max_new_tokens < 2:
            raise ValueError
    except ValueError:
        fail(
            "--tree_sizes and --lookups must be positive whole numbers (e.g. 3,8,16), --repeats >= 1, --max_new_tokens >= 2"
        )
    try:
        trained = workdir.load(args.workdir)
        report = measure(trained, sizes, lookups, args.prompt_len, args.max_new_tokens, args.repeats, args.cache_len)
    except UserError as e:
        fail(str(e))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
