"""Decode a prompt with a trained workdir's model: plain, or self-speculative with its MTP heads.

    python -m mtp_jax.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=N] [--temperature=T]
        [--top_k=K] [--top_p=P] [--seed=S] [--speculative [--tree_size=K | --lookup=L]] [--json]

The decoding itself (the KV cache, the device loops, chains and trees) is decoding.py's.
"""

from __future__ import annotations

import argparse
import json
import sys

from mtp_jax import workdir
from mtp_jax.acceptance import build_tree
from mtp_jax.cli import ArgumentParser, fail
from mtp_jax.compilation_cache import use_compilation_cache
from mtp_jax.decoding import Generator
from mtp_jax.errors import UserError
from mtp_jax.metrics import log
from mtp_jax.speculative import check_drafting


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m mtp_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir (its newest checkpoint is used)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample within this probability mass (nucleus)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding with the MTP heads (greedy, or rejection-sampled at --temperature)",
    )
    p.add_argument(
        "--tree_size",
        type=int,
        default=0,
        help="greedy --speculative: verify a Medusa tree of this many drafts, built from the heads' "
        "per-rank acceptance on the validation windows the workdir keeps (0: a chain of one draft "
        "per head)",
    )
    p.add_argument(
        "--lookup",
        type=int,
        default=0,
        help="greedy --speculative: where the text's last tokens occurred before, verify the L tokens that "
        "followed them there (prompt lookup) instead of the heads' drafts; a copy verifies max(L, n - 1) "
        "drafts, and after copies accepted whole in a row, twice or four times the rows (0: the heads alone)",
    )
    p.add_argument(
        "--cache_len",
        type=int,
        default=0,
        help="KV-cache positions, prompt included (0: the seq_len the model was trained on)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for name in ("tree_size", "lookup"):
        if getattr(args, name) and not args.speculative:
            fail(f"--{name} is a way of --speculative decoding: add --speculative (or drop --{name})")
    try:
        check_drafting(args.tree_size > 0, args.lookup, args.temperature)
    except UserError as e:
        fail(str(e))
    if args.tree_size < 0:
        fail(f"--tree_size={args.tree_size} must be >= 0")
    if args.max_new_tokens < 1:
        fail(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
    if not 0 < args.top_p <= 1 or args.top_k < 0 or args.temperature < 0 or args.cache_len < 0:
        fail("need --temperature >= 0, --top_k >= 0, 0 < --top_p <= 1 and --cache_len >= 0")
    return args


def run(args: argparse.Namespace) -> dict:
    """Decodes the prompt as the flags say. A --max_new_tokens past the cache's end, or a
    --tree_size larger than the heads' candidates can fill, is cut to what fits, with a notice."""
    trained = workdir.load(args.workdir)
    model, tokenizer = trained.model, trained.tokenizer()
    prompt = tokenizer.encode(args.prompt)
    generator = Generator(model, args.cache_len or trained.config.seq_len)
    room = generator.capacity - len(prompt)
    if 0 < room < args.max_new_tokens:
        log(
            f"--max_new_tokens={args.max_new_tokens} does not fit: the cache's {generator.capacity} positions hold "
            f"the {len(prompt)}-token prompt and {room} new tokens, so at most {room} are generated "
            "(--cache_len sets the cache's size)"
        )
    tree = None
    if args.tree_size and model.n_predict > 1:
        tree = build_tree(model, trained.tree_windows(), args.tree_size)
        if len(tree.paths) < args.tree_size:
            log(
                f"--tree_size={args.tree_size} is more than the {model.n_predict - 1} draft heads' candidates can "
                f"fill: using the {len(tree.paths)}-node tree of all of them"
            )
    if args.speculative:
        result = generator.speculative(
            prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tree, args.lookup
        )
    else:
        result = generator.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    out = {
        "text": tokenizer.decode(result.tokens),
        "new_tokens": len(result.tokens),
        "compile_seconds": result.compile_seconds,
        "decode_seconds": result.decode_seconds,
        "tokens_per_sec": len(result.tokens) / result.decode_seconds,  # decoding only, compiling apart
        "forward_passes": result.forward_passes,
        "mean_accepted": result.mean_accepted,
        "acceptance": result.acceptance(model.n_predict) if args.speculative else [],
        "step": trained.step,
    }
    if tree is not None:
        out["tree"] = tree.to_json()
    if args.speculative and args.temperature > 0:
        out["alpha"], out["alpha_predicted_mean_accepted"] = result.alpha(), result.predicted_mean_accepted()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    use_compilation_cache()
    try:
        out = run(args)
    except UserError as e:
        fail(str(e))
    if args.json:
        print(json.dumps(out))
        return
    print(args.prompt + out["text"])
    print(
        f"step {out['step']}: {out['new_tokens']} tokens in {out['decode_seconds']:.2f} s "
        f"({out['tokens_per_sec']:.1f} tokens/s; compiling took {out['compile_seconds']:.2f} s more), "
        f"{out['forward_passes']} forward passes, {out['mean_accepted']:.2f} tokens per pass",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
