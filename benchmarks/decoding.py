"""Decoding speed of a trained MTP model: plain, chain, tree and context-draft decoding (greedy),
and plain and chain sampling, on held-out prompts; with --transformers, transformers' own plain and
prompt-lookup decoding of the model the heads were trained on, on the same prompts.

    python benchmarks/decoding.py --workdir=DIR [--prompts=10] [--prompt_len=128] [--max_new_tokens=128]
        [--tree_size=16] [--lookup=7] [--temperature=0.8] [--cache_len=0] [--dtype=float32] [--transformers]

Prompts come from the validation split (so the corpus or its data cache must be present). The
modes are timed in one process with their order rotating per prompt; speedups are medians over
prompts of each mode's tokens/s over plain's (greedy or sampled; `speedup_per_prompt` lists them
in prompt order). Greedy outputs must be
identical (`agrees_with_plain`, the fraction of prompts whose output is plain's: the script
exits with an error after its report if a speculative mode's is below 1); sampled ones are only
reported, and transformers' greedy outputs are compared with ours the same way. Also how
repetitive the outputs are (zlib ratio), the teacher-forced acceptance on the validation set,
the share of tokens a draft vocabulary covers, the CPU and the load average. Prints one JSON
object.

--dtype=bfloat16 decodes with bfloat16 parameters and compute (transformers' model too).
--transformers needs the workdir's init_from (a Hugging Face folder or a GGUF file) and the `hf`
extra (torch, transformers; a GGUF file also gguf).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import data as data_lib  # noqa: E402
from mtp_jax import workdir  # noqa: E402
from mtp_jax.acceptance import build_tree, teacher_forced_acceptance  # noqa: E402
from mtp_jax.cli import ArgumentParser, fail  # noqa: E402
from mtp_jax.decode_result import Result  # noqa: E402
from mtp_jax.decoding import Generator  # noqa: E402
from mtp_jax.errors import UserError  # noqa: E402
from mtp_jax.machine import cpu_model  # noqa: E402
from mtp_jax.mtp import build_model  # noqa: E402
from mtp_jax.probes import compression_ratio  # noqa: E402
from mtp_jax.speculative import Tree  # noqa: E402

MODES = ("plain", "chain", "tree", "lookup", "plain_sampled", "chain_sampled")
GREEDY_SPECULATIVE = ("chain", "tree", "lookup")
TRANSFORMERS_MODES = ("transformers_plain", "transformers_prompt_lookup")


def cast(trained: workdir.Trained, dtype: str) -> workdir.Trained:
    """The trained model with parameters and compute in `dtype` (integer arrays kept)."""
    if dtype == trained.config.model.dtype == trained.config.model.param_dtype:
        return trained
    config = ml_collections.ConfigDict(trained.config.to_dict())
    config.model.dtype = config.model.param_dtype = dtype
    vocab_size = trained.model.decoder.shape.vocab_size
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config, vocab_size, seed=0)))
    state = jax.tree.map(
        lambda x: x.astype(dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, nnx.state(trained.model)
    )
    return workdir.Trained(nnx.merge(graphdef, state), config, trained.step, trained.data_dir)


def transformers_modes(init_from: str, dtype: str, new_tokens: int, prompt_lookup: int) -> dict:
    """transformers' greedy `generate` and prompt-lookup decoding of the init_from model, as modes
    (prompt ids → Result), each exactly new_tokens long (end-of-text suppressed, as ours)."""
    import torch
    import transformers

    path = pathlib.Path(init_from).expanduser()
    where = (
        dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
        if path.suffix == ".gguf"
        else dict(pretrained_model_name_or_path=path)
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=getattr(torch, dtype)).eval()

    def run(prompt: list[int], **settings) -> Result:
        ids = torch.tensor([prompt])
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **settings,
            )
        seconds = time.perf_counter() - begin
        return Result(out[0, len(prompt) :].tolist(), new_tokens, [], decode_seconds=seconds)

    return {
        "transformers_plain": lambda prompt, seed: run(prompt),
        "transformers_prompt_lookup": lambda prompt, seed: run(prompt, prompt_lookup_num_tokens=prompt_lookup),
    }


def benchmark(
    trained: workdir.Trained,
    *,
    prompts: int,
    prompt_len: int,
    new_tokens: int,
    cache_len: int,
    tree: Tree,
    lookup: int,
    temperature: float,
    extra_modes: dict | None = None,
) -> dict:
    model, config = trained.model, trained.config
    val, tokenizer = trained.data().val, trained.tokenizer()
    generator = Generator(model, cache_len)
    starts = np.linspace(0, len(val) - prompt_len - new_tokens, prompts).astype(np.int64)
    val_ids = lambda s, n: np.asarray(val[s : s + n]).astype(int).tolist()  # noqa: E731
    modes = {
        "plain": lambda prompt, seed: generator.generate(prompt, new_tokens),
        "chain": lambda prompt, seed: generator.speculative(prompt, new_tokens),
        "tree": lambda prompt, seed: generator.speculative(prompt, new_tokens, tree=tree),
        "lookup": lambda prompt, seed: generator.speculative(prompt, new_tokens, lookup=lookup),
        "plain_sampled": lambda prompt, seed: generator.generate(prompt, new_tokens, temperature, seed=seed),
        "chain_sampled": lambda prompt, seed: generator.speculative(prompt, new_tokens, temperature, seed=seed),
        **(extra_modes or {}),
    }
    names = list(modes)
    for run_mode in modes.values():  # compile every mode (and warm transformers) before timing
        run_mode(val_ids(0, prompt_len), 0)

    rows = []
    for i, s in enumerate(starts):
        prompt, truth = val_ids(s, prompt_len), val_ids(s + prompt_len, new_tokens)
        row = {"truth_ratio": compression_ratio(tokenizer.decode(truth))}
        for mode in names[i % len(names) :] + names[: i % len(names)]:
            begin = time.perf_counter()
            result = modes[mode](prompt, i)
            row[mode] = dict(
                result=result,
                tps=len(result.tokens) / (time.perf_counter() - begin),
                ratio=compression_ratio(tokenizer.decode(result.tokens)),
            )
        rows.append(row)

    graphdef, params = nnx.split(model, nnx.Param)
    batches = data_lib.eval_windows(
        val, window_len=config.seq_len + model.n_predict, batch_size=config.batch_size, num_batches=config.eval_batches
    )
    forced = [teacher_forced_acceptance(graphdef, config.loss_chunk_size, params, b) for b in batches]
    forced = {k: float(np.mean([f[k] for f in forced])) for k in forced[0]}

    report = {}
    for mode in names:
        baseline = "plain_sampled" if mode.endswith("sampled") else "plain"
        results = Result(
            [],
            0,
            sum((r[mode]["result"].accepted for r in rows), []),
            overlaps=sum((r[mode]["result"].overlaps or [] for r in rows), []),
        )
        speedups = [r[mode]["tps"] / r[baseline]["tps"] for r in rows]
        report[mode] = {
            "tokens_per_sec": float(np.median([r[mode]["tps"] for r in rows])),
            "speedup": float(np.median(speedups)),
            "speedup_per_prompt": [round(float(x), 3) for x in speedups],
            "mean_accepted": results.mean_accepted,
            "output_compression_ratio": float(np.median([r[mode]["ratio"] for r in rows])),
        }
        if mode == "chain":
            report[mode]["acceptance"] = results.acceptance(model.n_predict)
        if mode == "chain_sampled":
            report[mode]["alpha"] = results.alpha()
            report[mode]["alpha_predicted_mean_accepted"] = results.predicted_mean_accepted()
        if mode in GREEDY_SPECULATIVE or mode in TRANSFORMERS_MODES:  # greedy: the same tokens as plain's?
            report[mode]["agrees_with_plain"] = float(
                np.mean([r[mode]["result"].tokens == r["plain"]["result"].tokens for r in rows])
            )
    if not model.drafts_all_tokens:  # the share of tokens the heads can draft at all
        ids = np.asarray(model.draft_vocab[...])
        plain = sum((r["plain"]["result"].tokens for r in rows), [])
        report["draft_vocab"] = {
            "size": len(ids),
            "validation_tokens_inside": float(np.isin(np.asarray(val), ids).mean()),
            "plain_output_tokens_inside": float(np.isin(plain, ids).mean()),
        }
    return {
        "prompts": prompts,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "cache_len": cache_len,
        "temperature": temperature,
        "tree_size": tree.size - 1,
        "tree_paths": tree.to_json(),
        "lookup": lookup,
        **report,
        "truth_compression_ratio": float(np.median([r["truth_ratio"] for r in rows])),
        "teacher_forced_mean_accepted": forced.pop("mean_accepted"),
        "teacher_forced_acceptance": forced,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python benchmarks/decoding.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir of an MTP model (n > 1)")
    p.add_argument("--prompts", type=int, default=10, help="validation prompts")
    p.add_argument("--prompt_len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens generated per prompt and mode")
    p.add_argument("--tree_size", type=int, default=16, help="drafts per verify pass of the tree mode")
    p.add_argument(
        "--lookup",
        type=int,
        default=7,
        help="drafts per pass of the lookup mode (copied from the context where it repeats, else the heads')",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="of the sampled modes")
    p.add_argument(
        "--cache_len",
        type=int,
        default=0,
        help="KV-cache positions, prompt included (0: the seq_len the model was trained on)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="parameters and compute while decoding (both sides)",
    )
    p.add_argument(
        "--transformers",
        action="store_true",
        help="also time transformers' plain and prompt-lookup decoding of the workdir's init_from model",
    )
    p.add_argument(
        "--prompt_lookup",
        type=int,
        default=10,
        help="transformers' prompt_lookup_num_tokens (tokens copied from the prompt per pass)",
    )
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "max_new_tokens", "tree_size", "lookup", "prompt_lookup"):
        if getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)} must be >= 1")
    if args.temperature <= 0 or args.cache_len < 0:
        fail("need --temperature > 0 and --cache_len >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    trained = cast(workdir.load(args.workdir), args.dtype)
    cache_len = args.cache_len or trained.config.seq_len
    if trained.model.n_predict == 1:
        raise UserError(
            "the model has no extra heads to draft with (it was trained with mtp_n_tokens=1): "
            "benchmark a model trained with --config.use_mtp=True --config.mtp_n_tokens=4"
        )
    if args.prompt_len >= cache_len:
        raise UserError(f"--prompt_len={args.prompt_len} must be below the cache of {cache_len} positions")
    if args.transformers and not trained.config.get("init_from"):
        raise UserError(
            f"--transformers compares with the model the heads were trained on, but {args.workdir} was "
            "not started from one (init_from is empty): drop --transformers"
        )
    new_tokens = min(args.max_new_tokens, cache_len - args.prompt_len)
    extra = (
        transformers_modes(trained.config.init_from, args.dtype, new_tokens, args.prompt_lookup)
        if args.transformers
        else None
    )
    tree = build_tree(trained.model, trained.tree_windows(), args.tree_size)
    load_before = os.getloadavg()
    out = benchmark(
        trained,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        new_tokens=new_tokens,
        cache_len=cache_len,
        tree=tree,
        lookup=args.lookup,
        temperature=args.temperature,
        extra_modes=extra,
    )
    return {
        "dtype": args.dtype,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        **out,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = run(args)
    except UserError as e:
        fail(str(e))
    print(json.dumps(out))
    diverged = [mode for mode in GREEDY_SPECULATIVE if out[mode]["agrees_with_plain"] < 1]
    if diverged:  # after the report, so that a failed check still shows what was measured
        fail(
            f"greedy {' and '.join(diverged)} decoding diverged from plain greedy decoding on some prompts "
            "(agrees_with_plain above): a verify pass computes head 1's logits for several tokens at once, and its "
            "dots may round a near-tie the other way than a one-token step (common in bfloat16; in float32 suspect a "
            "bug)"
        )


if __name__ == "__main__":
    main()
