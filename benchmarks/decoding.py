"""Decoding speed of a trained MTP model: plain, chain and tree decoding (greedy), and plain and
chain sampling, on held-out prompts.

    python benchmarks/decoding.py --workdir=DIR [--prompts=10] [--prompt_len=128] [--max_new_tokens=128]
        [--tree_size=16] [--temperature=0.8] [--cache_len=0]

Prompts come from the validation split (so the corpus or its data cache must be present). The
modes are timed in one process with their order rotating per prompt; speedups are medians over
prompts of each mode's tokens/s over plain's (greedy or sampled). Greedy outputs must be
identical (the script stops if a speculative mode diverges); sampled ones are only reported.
Also how repetitive the outputs are (zlib ratio) and the teacher-forced acceptance on the
validation set. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import data as data_lib  # noqa: E402
from mtp_jax import workdir  # noqa: E402
from mtp_jax.acceptance import build_tree, teacher_forced_acceptance  # noqa: E402
from mtp_jax.cli import ArgumentParser, fail  # noqa: E402
from mtp_jax.errors import UserError  # noqa: E402
from mtp_jax.generate import Generator, Result  # noqa: E402
from mtp_jax.probes import compression_ratio  # noqa: E402
from mtp_jax.speculative import Tree  # noqa: E402

MODES = ("plain", "chain", "tree", "plain_sampled", "chain_sampled")


def benchmark(trained: workdir.Trained, *, prompts: int, prompt_len: int, new_tokens: int, cache_len: int,
              tree: Tree, temperature: float) -> dict:
    model, config = trained.model, trained.config
    val, tokenizer = trained.data().val, trained.tokenizer()
    generator = Generator(model, cache_len)
    starts = np.linspace(0, len(val) - prompt_len - new_tokens, prompts).astype(np.int64)
    val_ids = lambda s, n: np.asarray(val[s:s + n]).astype(int).tolist()  # noqa: E731
    modes = {
        "plain": lambda prompt, seed: generator.generate(prompt, new_tokens),
        "chain": lambda prompt, seed: generator.speculative(prompt, new_tokens),
        "tree": lambda prompt, seed: generator.speculative(prompt, new_tokens, tree=tree),
        "plain_sampled": lambda prompt, seed: generator.generate(prompt, new_tokens, temperature, seed=seed),
        "chain_sampled": lambda prompt, seed: generator.speculative(prompt, new_tokens, temperature, seed=seed),
    }
    for run_mode in modes.values():  # compile every mode before timing
        run_mode(val_ids(0, prompt_len), 0)

    rows = []
    for i, s in enumerate(starts):
        prompt, truth = val_ids(s, prompt_len), val_ids(s + prompt_len, new_tokens)
        row = {"truth_ratio": compression_ratio(tokenizer.decode(truth))}
        for mode in MODES[i % len(modes):] + MODES[:i % len(modes)]:
            begin = time.perf_counter()
            result = modes[mode](prompt, i)
            row[mode] = dict(result=result, tps=len(result.tokens) / (time.perf_counter() - begin),
                             ratio=compression_ratio(tokenizer.decode(result.tokens)))
        for mode in ("chain", "tree"):
            if row[mode]["result"].tokens != row["plain"]["result"].tokens:
                raise AssertionError(f"{mode} speculative decoding diverged from greedy decoding on prompt {i}")
        rows.append(row)

    graphdef, params = nnx.split(model, nnx.Param)
    batches = data_lib.eval_windows(val, window_len=config.seq_len + model.n_predict, batch_size=config.batch_size,
                                    num_batches=config.eval_batches)
    forced = [teacher_forced_acceptance(graphdef, config.loss_chunk_size, params, b) for b in batches]
    forced = {k: float(np.mean([f[k] for f in forced])) for k in forced[0]}

    report = {}
    for mode in MODES:
        baseline = "plain_sampled" if mode.endswith("sampled") else "plain"
        results = Result([], 0, sum((r[mode]["result"].accepted for r in rows), []),
                         overlaps=sum((r[mode]["result"].overlaps or [] for r in rows), []))
        report[mode] = {
            "tokens_per_sec": float(np.median([r[mode]["tps"] for r in rows])),
            "speedup": float(np.median([r[mode]["tps"] / r[baseline]["tps"] for r in rows])),
            "mean_accepted": results.mean_accepted,
            "output_compression_ratio": float(np.median([r[mode]["ratio"] for r in rows])),
        }
        if mode == "chain":
            report[mode]["acceptance"] = results.acceptance(model.n_predict)
        if mode == "chain_sampled":
            report[mode]["alpha"] = results.alpha()
            report[mode]["alpha_predicted_mean_accepted"] = results.predicted_mean_accepted()
    return {
        "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache_len": cache_len,
        "temperature": temperature, "tree_size": tree.size - 1, "tree_paths": tree.to_json(), **report,
        "truth_compression_ratio": float(np.median([r["truth_ratio"] for r in rows])),
        "teacher_forced_mean_accepted": forced.pop("mean_accepted"), "teacher_forced_acceptance": forced,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python benchmarks/decoding.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir of an MTP model (n > 1)")
    p.add_argument("--prompts", type=int, default=10, help="validation prompts")
    p.add_argument("--prompt_len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens generated per prompt and mode")
    p.add_argument("--tree_size", type=int, default=16, help="drafts per verify pass of the tree mode")
    p.add_argument("--temperature", type=float, default=0.8, help="of the sampled modes")
    p.add_argument("--cache_len", type=int, default=0,
                   help="KV-cache positions, prompt included (0: the seq_len the model was trained on)")
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "max_new_tokens", "tree_size"):
        if getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)} must be >= 1")
    if args.temperature <= 0 or args.cache_len < 0:
        fail("need --temperature > 0 and --cache_len >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    trained = workdir.load(args.workdir)
    cache_len = args.cache_len or trained.config.seq_len
    if trained.model.n_predict == 1:
        raise UserError("the model has no extra heads to draft with (it was trained with mtp_n_tokens=1): "
                        "benchmark a model trained with --config.use_mtp=True --config.mtp_n_tokens=4")
    if args.prompt_len >= cache_len:
        raise UserError(f"--prompt_len={args.prompt_len} must be below the cache of {cache_len} positions")
    tree = build_tree(trained.model, trained.tree_windows(), args.tree_size)
    return benchmark(trained, prompts=args.prompts, prompt_len=args.prompt_len,
                     new_tokens=min(args.max_new_tokens, cache_len - args.prompt_len), cache_len=cache_len,
                     tree=tree, temperature=args.temperature)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = run(args)
    except UserError as e:
        fail(str(e))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
