"""The README's "Where MTP helps here" table, from the experiments' runs.json files.

    python experiments/verdicts.py [--results_dir=experiments/results]

One row per (experiment, metric) in ROWS: the baseline's mean over seeds (next-token training, or
constant weights where the row is about a schedule), the MTP setting with the best mean on that
metric, their difference ± its standard error (paired by seed where the seeds pair), the seeds a
side (over all pooled sets, for a pooled experiment), the power at the difference found and the
verdict, all as experiments/report.py (report.comparisons, or --pool) computed them. A "better" or
"worse" verdict with less than 80 % power is marked underpowered: as many fresh seeds would miss it
more often than one time in five; one from a single sweep is marked "one set of seeds": it has not
been seen again on fresh seeds (`report.py --pool` joins a rerun to it). Picking the best of several MTP settings on the metric it is
judged by favours MTP a little; with one MTP setting per experiment (as in every experiment so far)
there is nothing to pick.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from experiments import stats  # noqa: E402

# (experiment, metric key in runs.json's comparisons, what the row is about[, a part of the
# compared setting's label, where the experiment compares settings of more than one kind])
ROWS = (
    ("text_micro", "eval/induction_accuracy", "induction (renamed identifiers in held-out code)"),
    ("text_micro", "eval/bits_per_byte", "real text: held-out bits per byte"),
    ("text_micro", "eval/parse_rate", "sample quality: share of samples that parse"),
    ("polyarith_small", "eval/task_accuracy_m1", "polynomial arithmetic, one operation: exact answers"),
    ("polyarith_small", "eval/task_accuracy_m2", "the same, two operations (beyond training)"),
    ("pathstar_small", "eval/task_accuracy", "path-star graph G(2, 3, 10): exact paths", "teacherless=False"),
    ("pathstar_small", "eval/loss_1", "the same: head-1 validation loss on answers", "teacherless=False"),
    (
        "pathstar_small",
        "eval/task_accuracy",
        "the same, teacherless training (not MTP): exact paths",
        "teacherless=True",
    ),
    ("data_constrained_pooled", "eval/loss_1", "6 epochs of `stdlib/email`, 1.1 M parameters: head-1 validation loss"),
    (
        "reproduction_pooled",
        "eval/loss_1",
        "4.2 epochs of `stdlib/email`, 3.5 M parameters (the reproduction command): head-1 validation loss",
    ),
    (
        "overfitting_pooled",
        "min_eval/loss_1",
        "10 epochs of `stdlib/email`, 3.5 M parameters: lowest head-1 validation loss",
    ),
    ("overfitting_pooled", "min_eval/loss_1_epoch", "the same: epoch of the lowest loss (later: overfits later)"),
    (
        "schedules",
        "eval/bits_per_byte",
        "forward curriculum vs constant weights, n = 4: bits per byte",
        "curriculum=forward",
    ),
    (
        "schedules",
        "eval/bits_per_byte",
        "stepped weight (1 → 0.1 at 70 %) vs constant, n = 4: bits per byte",
        "weight_schedule=stepped",
    ),
)


def best_comparison(comparisons: list[dict], metric: str, only: str = "") -> dict | None:
    """The comparison on `metric` whose setting (if `only`, among those whose label contains it)
    does best on it (highest or lowest mean)."""
    rows = [c for c in comparisons if c["metric"] == metric and only in c["setting"]]
    if not rows:
        return None
    return (max if rows[0]["higher_is_better"] else min)(rows, key=lambda c: c["value"])


def power(c: dict) -> float | None:
    """The comparison's power at its own difference (runs.json from before power was recorded: from
    its difference and standard error)."""
    used = c.get("paired") or c.get("unpaired")
    if used:
        return used["power"]
    return stats.Difference(c["difference"], c["standard_error"], None, 0, paired=False).power


def table(results_dir: pathlib.Path, rows=ROWS) -> str:
    lines = [
        "| setting | baseline | best MTP setting | difference ± s.e. | seeds a side | power | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, metric, about, *only in rows:
        path = results_dir / name / "runs.json"
        if not path.exists():
            lines.append(f"| {about} ({name}) | not run | | | | | |")
            continue
        summary = json.loads(path.read_text())
        page = "pooled.md" if summary.get("pooled_from") else "results.md"
        link = f"[{name}](experiments/results/{name}/{page})"
        c = best_comparison(summary["comparisons"], metric, *only)
        if c is None:
            missing = "not logged" if summary["comparisons"] else "no MTP setting run"
            lines.append(f"| {about} ({link}) | {missing} | | | | | |")
            continue
        seeds = len({r["seed"] for r in summary["runs"]})
        sets = f" in {len(summary['pooled_from'])} sets" if summary.get("pooled_from") else ""
        paired = ", paired" if c.get("paired") else ""
        se = f" ± {c['standard_error']:.4f}" if c["standard_error"] is not None else ""
        p = power(c)
        marks = []
        if not c["verdict"].startswith(("no ", "equal", "one seed")):
            if p is not None and p < 0.8:  # as many fresh seeds would miss it more often than one time in five
                marks.append("underpowered")
            if not summary.get("pooled_from"):  # never seen again on fresh seeds
                marks.append("one set of seeds")
        weak = f" ({'; '.join(marks)})" if marks else ""
        lines.append(
            f"| {about} ({link}) | `{summary['baseline']}`: {c['baseline']:.4f} "
            f"| `{c['setting']}`: {c['value']:.4f} "
            f"| {c['difference']:+.4f}{se}{paired} | {seeds}{sets} "
            f"| {'—' if p is None else f'{p:.0%}'} | {c['verdict']}{weak} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results_dir", default=str(ROOT / "experiments" / "results"))
    print(table(pathlib.Path(parser.parse_args(argv).results_dir)))


if __name__ == "__main__":
    main(sys.argv[1:])
