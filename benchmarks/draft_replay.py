"""Tokens per verify pass of greedy drafting rules, replayed on plain greedy outputs (no timing).

    python benchmarks/draft_replay.py --workdir=DIR [--prompts=10] [--prompt_len=128]
        [--max_new_tokens=128] [--lookups=3,5,7]

Greedy speculative decoding commits exactly plain greedy decoding's tokens, so what a drafting
rule would accept is known once the plain output is: each prompt (the validation prompts
benchmarks/decoding.py uses) is decoded plainly once, every head's argmax at every position of
prompt + output comes from one teacher-forced forward pass, and each rule is replayed pass by
pass: from the last committed position, the drafts it would propose, accepted while they equal
the output. Rules: the heads' chain (`generate --speculative`), and for each L in --lookups the
chain of max(L, n - 1) drafts copied from the context where its last tokens occurred before
(speculative.lookup_draft, the engine's own function), two and four times as many rows after
copies accepted whole in a row (speculative.copy_chains, next_copy_level), else the heads' n - 1
(`--lookup=L`). A
rule's speedup is its tokens per pass over what its passes cost (benchmarks/pass_cost.py gives
each pass size's cost), so this predicts a change in drafting before anything is timed. Prints
one JSON object: tokens per pass pooled over prompts, the median over prompts, the rows a pass
verifies on average, and (lookup rules) the share of passes that copied.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import speculative, workdir  # noqa: E402
from mtp_jax.cli import ArgumentParser, fail  # noqa: E402
from mtp_jax.decoding import Generator  # noqa: E402
from mtp_jax.errors import UserError  # noqa: E402
from mtp_jax.machine import cpu_model  # noqa: E402

copy_draft = jax.jit(speculative.lookup_draft)


@functools.partial(jax.jit, static_argnums=0)
def head_drafts(graphdef, params, window: jax.Array) -> jax.Array:
    """[n, B, T]: head k's argmax at each position t of window [B, T + n] (its draft for t + k),
    teacher-forced."""
    model = nnx.merge(graphdef, params)
    t = window.shape[1] - model.n_predict
    return jnp.stack([model.greedy(k, h) for k, h in enumerate(model.hidden_states(window, t), 1)])


def replay(sequence: np.ndarray, heads: np.ndarray, start: int, lookup: int) -> tuple[int, int, int, int]:
    """(passes, tokens committed, passes that copied, rows verified) of greedy speculative
    decoding after sequence[:start] (the prompt), lookup = 0 for the heads' chain."""
    n, end = heads.shape[0], len(sequence) - 1
    context, chains = jnp.asarray(sequence), speculative.copy_chains(lookup, n)
    passes = committed = copied = rows = level = 0
    whole = False  # the last pass accepted all its drafts
    p = start - 1  # the last committed position; the certain token after it is the pass's root
    while p + 1 < end:
        root = p + 1
        drafts = [heads[k - 1, p] if p < heads.shape[1] else -1 for k in range(2, n + 1)]
        if lookup:  # the engine's block: the heads' chain lengthened, then copied over where it can be
            heads_block = chains[-1].block(jnp.int32(sequence[root]), jnp.asarray(drafts)[:, None])
            block, found = copy_draft(context, root, heads_block)
            level = int(speculative.next_copy_level(found, level, whole))
            if level:  # a pass of the copy chain of that level; else of the heads' n rows
                copied, drafts = copied + 1, np.asarray(block)[1 : chains[level - 1].size].tolist()
        accepted = 0
        for j, draft in enumerate(drafts):
            if root + 1 + j > end or draft != sequence[root + 1 + j]:
                break
            accepted += 1
        whole = accepted == len(drafts)
        passes, committed, rows, p = passes + 1, committed + accepted + 1, rows + 1 + len(drafts), root + accepted
    return passes, committed, copied, rows


def run(args) -> dict:
    trained = workdir.load(args.workdir)
    model, val = trained.model, trained.data().val
    if model.n_predict < 2:
        raise UserError("the model has no extra heads: replay needs a model trained with mtp_n_tokens >= 2")
    generator = Generator(model, args.prompt_len + args.max_new_tokens)
    graphdef, params = nnx.split(model)
    starts = np.linspace(0, len(val) - args.prompt_len - args.max_new_tokens, args.prompts).astype(np.int64)
    rules = {"chain": 0, **{f"lookup_{size}": size for size in args.lookups}}
    totals = {rule: np.zeros(4, np.int64) for rule in rules}
    per_prompt = {rule: [] for rule in rules}
    for s in starts:
        prompt = np.asarray(val[s : s + args.prompt_len]).astype(int).tolist()
        sequence = np.asarray(prompt + generator.generate(prompt, args.max_new_tokens).tokens)
        heads = np.asarray(head_drafts(graphdef, params, jnp.asarray(sequence[None])))[:, 0]
        for rule, size in rules.items():
            counts = np.asarray(replay(sequence, heads, len(prompt), size))
            totals[rule] += counts
            per_prompt[rule].append(counts[1] / counts[0])
    report = {
        rule: {
            "tokens_per_pass": float(totals[rule][1] / totals[rule][0]),
            "median_over_prompts": float(np.median(per_prompt[rule])),
            "rows_per_pass": float(totals[rule][3] / totals[rule][0]),
            **({"copied_share": float(totals[rule][2] / totals[rule][0])} if size else {}),
        }
        for rule, size in rules.items()
    }
    return {"cpu": cpu_model(), "prompts": args.prompts, "new_tokens": args.max_new_tokens, **report}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python benchmarks/draft_replay.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir of an MTP model (n > 1)")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--lookups", default="3,5,7", help="context-draft chain lengths to replay, comma-separated")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.lookups = [int(s) for s in args.lookups.split(",") if s]
        if min([args.prompts, args.prompt_len, args.max_new_tokens, *args.lookups]) < 1:
            raise ValueError
    except ValueError:
        fail("--prompts, --prompt_len, --max_new_tokens and each of --lookups must be positive whole numbers")
    try:
        print(json.dumps(run(args), indent=2))
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
