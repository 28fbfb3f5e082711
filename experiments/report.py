"""Tables, plots and raw numbers for one sweep: experiments/runs/NAME → experiments/results/NAME.

    python experiments/report.py NAME [--baseline KEY=VALUE[,KEY=VALUE…]] [--runs_dir=DIR] [--results_dir=DIR]
    python experiments/report.py --pool NAME NAME … [--pool_name=NAME]   (experiments/pool.py)

Runs are grouped into settings by the config fields that differ between them, seed excepted; a
setting's number is the mean ± sample standard deviation (ddof=1) over its seeds. The baseline is
the setting that predicts one token (mtp_n_tokens=1 or use_mtp=False) unless --baseline picks one.
Every other setting is compared with it on each final metric the runs logged (loss, bits per byte,
lowest loss over evaluations, induction accuracy, parse rate, task accuracy) as a difference of
means ± its standard error and, where the seeds pair (each seed's two runs read the same batches,
recomputed here with the trainer's sampler), as the mean ± standard error of the per-seed
differences, which the verdict then uses; a verdict only beyond two standard errors, with the
power of the comparison and the seeds that 80 % power needs (experiments/stats.py). Task accuracy
is also tabled per difficulty. Writes results.md, runs.json (final numbers per run, and the comparisons),
three PNG plots and COMMAND (the sweep, training and report commands). Runs that did not reach
their last step (num_train_steps, or num_epochs × the steps per epoch their training logged) are
left out and listed.
Needs matplotlib (the `plots` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import shlex
import statistics
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from experiments import pool, stats  # noqa: E402
from experiments.sweep import git_commit, last_logged, total_steps  # noqa: E402
from mtp_jax import data as data_lib  # noqa: E402
from mtp_jax.cli import fail  # noqa: E402
from mtp_jax.errors import UserError  # noqa: E402
from mtp_jax.metrics import read_metrics  # noqa: E402


@dataclasses.dataclass
class Run:
    """One training's config (flattened: 'model.d_model') and what it logged, reduced to curves."""

    name: str
    config: dict
    tokens_per_step: int
    eval_steps: list[int]  # steps with an evaluation, ascending
    evals: list[dict]  # the evaluation events, in that order
    step_times: list[float]  # train/step_time_s of every logged interval but the first
    tokens_per_sec: list[float]  # train/tokens_per_sec likewise
    eval_times: list[float]  # seconds of training (with evaluations and saves) before each evaluation
    param_count: int | None
    train_tokens: int | None  # the training set's size (runs from before it was logged: None)
    total_steps: int | None  # the last step (None: a run of epochs that logged no steps per epoch)

    @property
    def finished(self) -> bool:
        return bool(self.eval_steps) and self.eval_steps[-1] == self.total_steps

    @property
    def eval_tokens(self) -> list[int]:
        return [s * self.tokens_per_step for s in self.eval_steps]

    def curve(self, key: str) -> list[float]:
        return [e[key] for e in self.evals]

    @property
    def final(self) -> dict:
        """The last evaluation's numbers, with the lowest head-1 loss of any evaluation and its step
        (where a run that overfits turns up)."""
        final = {k: v for k, v in self.evals[-1].items() if k != "step"}
        losses = self.curve("eval/loss_1")
        best = int(np.argmin(losses))
        out = {**final, "min_eval/loss_1": losses[best], "min_eval/loss_1_step": self.eval_steps[best]}
        if self.train_tokens:
            out["min_eval/loss_1_epoch"] = self.eval_steps[best] * self.tokens_per_step / self.train_tokens
        return out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_run(workdir: pathlib.Path) -> Run:
    config = flatten(json.loads((workdir / "config.json").read_text()))
    events = read_metrics(workdir)
    # A resumed run may evaluate a step twice (the restored final step): the last one counts.
    evals = {e["step"]: e for e in events if "eval/loss_1" in e}
    train = sorted((e for e in events if "train/step_time_s" in e), key=lambda e: e["step"])
    # Wall time of each logged interval (step time × its steps); the time of an evaluation is
    # interpolated between the logged steps around it.
    logged = [0] + [e["step"] for e in train]
    elapsed = np.cumsum(
        [0.0] + [e["train/step_time_s"] * (s - prev) for e, s, prev in zip(train, logged[1:], logged[:-1])]
    )
    eval_steps = sorted(evals)
    return Run(
        name=workdir.name,
        config=config,
        tokens_per_step=config["batch_size"] * config["seq_len"],
        eval_steps=eval_steps,
        evals=[evals[s] for s in eval_steps],
        # The first interval after a start holds the first step's waits (and evaluation compiles).
        step_times=[e["train/step_time_s"] for e in train[1:] or train],
        tokens_per_sec=[e["train/tokens_per_sec"] for e in train[1:] or train],
        eval_times=[float(t) for t in np.interp(eval_steps, logged, elapsed)],
        param_count=last_logged(events, "model/param_count"),
        train_tokens=last_logged(events, "data/train_tokens"),
        total_steps=total_steps(events, config["num_train_steps"], config.get("num_epochs", 0)),
    )


def n_predicted(config: dict) -> int:
    return config["mtp_n_tokens"] if config["use_mtp"] else 1


def tokens_to_reach(tokens: list[float], losses: list[float], target: float) -> float | None:
    """Tokens at which the loss curve first reaches `target`, interpolated linearly between the
    evaluations around the crossing; None if it never does."""
    for i, (t, loss) in enumerate(zip(tokens, losses)):
        if loss <= target:
            if i == 0:
                return float(t)
            t0, l0 = tokens[i - 1], losses[i - 1]
            return float(t0 + (t - t0) * (l0 - target) / (l0 - loss))
    return None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 4, scale: float = 1.0) -> str:
    if not values:
        return "—"
    mean, std = mean_std([v / scale for v in values])
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def fmt_tokens(values: list[float]) -> str:
    """Token counts, mean ± std over seeds, in M or k."""
    mean = statistics.fmean(values)
    scale, suffix = (1e6, " M") if mean >= 1e6 else (1e3, " k") if mean >= 1e3 else (1, "")
    return fmt(values, 2, scale) + suffix


@dataclasses.dataclass
class Setting:
    label: str
    runs: list[Run]

    def finals(self, key: str) -> list[float]:
        return [r.final[key] for r in self.runs if r.final.get(key) is not None]

    def by_seed(self, key: str) -> dict[int, float]:
        return {r.config["seed"]: r.final[key] for r in self.runs if r.final.get(key) is not None}

    def at_tokens(self, key: str, tokens: float) -> list[float]:
        """Each run's `key` at `tokens`, interpolated between its evaluations (runs not spanning it omitted)."""
        return [
            float(np.interp(tokens, r.eval_tokens, r.curve(key)))
            for r in self.runs
            if r.eval_tokens[0] <= tokens <= r.eval_tokens[-1]
        ]

    def mean_curve(self, key: str, x: str = "tokens") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x (tokens, or seconds averaged over seeds), mean and std over seeds of `key` at the
        evaluations all runs share."""
        steps = sorted(set.intersection(*(set(r.eval_steps) for r in self.runs)))
        values = np.array([[r.evals[r.eval_steps.index(s)][key] for s in steps] for r in self.runs])
        if x == "tokens":
            xs = np.array(steps, dtype=float) * self.runs[0].tokens_per_step
        else:
            xs = np.mean([[r.eval_times[r.eval_steps.index(s)] for s in steps] for r in self.runs], axis=0)
        std = values.std(axis=0, ddof=1) if len(self.runs) > 1 else np.zeros(len(steps))
        return xs, values.mean(axis=0), std


def group(runs: list[Run]) -> list[Setting]:
    """Settings: runs that agree on every config field but the seed, ordered by the fields that
    differ (numbers by value)."""
    keys = [k for k in runs[0].config if k != "seed" and len({json.dumps(r.config.get(k)) for r in runs}) > 1]

    def order(run: Run) -> list:
        values = [run.config.get(k) for k in keys]
        return [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values]

    settings: dict[str, Setting] = {}
    for run in sorted(runs, key=order):
        label = ",".join(f"{k}={run.config.get(k)}" for k in keys) or "all runs"
        settings.setdefault(label, Setting(label, [])).runs.append(run)
    return list(settings.values())


def pick_baseline(settings: list[Setting], choice: str | None) -> Setting | None:
    if choice is None:
        matches = [s for s in settings if n_predicted(s.runs[0].config) == 1]
        if len(matches) > 1:
            raise UserError(
                f"{len(matches)} settings predict one token ({', '.join(s.label for s in matches)}): "
                "pick the baseline with --baseline KEY=VALUE"
            )
        return matches[0] if matches else None
    wanted = [part.partition("=") for part in choice.split(",")]
    if not all(sep and key for key, sep, _ in wanted):
        raise UserError(
            f"--baseline {choice!r} must look like KEY=VALUE[,KEY=VALUE…], "
            "e.g. --baseline mtp_n_tokens=1,data.task.teacherless=False"
        )
    matches = [
        s for s in settings if all(str(s.runs[0].config.get(key)).lower() == value.lower() for key, _, value in wanted)
    ]
    if len(matches) != 1:
        raise UserError(
            f"--baseline {choice} matches {len(matches)} settings of {[s.label for s in settings]}: "
            "give a field and value that pick exactly one"
        )
    return matches[0]


def summarize(settings: list[Setting], baseline: Setting | None) -> dict:
    """runs.json: the target loss and, per run, its final numbers."""
    target = statistics.fmean(baseline.finals("eval/loss_1")) if baseline else None
    runs = []
    for setting in settings:
        for r in setting.runs:
            to_target = tokens_to_reach(r.eval_tokens, r.curve("eval/loss_1"), target) if target is not None else None
            step_time = statistics.median(r.step_times)
            runs.append(
                {
                    "run": r.name,
                    "setting": setting.label,
                    "seed": r.config["seed"],
                    "steps": r.eval_steps[-1],
                    "tokens": r.eval_tokens[-1],
                    "param_count": r.param_count,
                    "final": r.final,
                    "tokens_to_target": to_target,
                    # Below the target at the first evaluation: it was crossed earlier, by an unknown amount.
                    "target_before_first_eval": target is not None and r.curve("eval/loss_1")[0] < target,
                    # Steps to the target at the median step time: compute, without evaluations and saves.
                    "seconds_to_target": to_target / r.tokens_per_step * step_time if to_target is not None else None,
                    "median_step_time_s": step_time,
                    "median_tokens_per_sec": statistics.median(r.tokens_per_sec),
                    "train_time_s": r.eval_times[-1],
                }
            )
    return {
        "baseline": baseline.label if baseline else None,
        "target_loss": target,
        "comparisons": comparisons(settings, baseline) if baseline else [],
        "runs": runs,
    }


# Final metrics compared with the baseline: key, what it is, whether higher is better.
COMPARED = (
    ("eval/loss_1", "head-1 validation loss (final)", False),
    ("min_eval/loss_1", "head-1 validation loss (lowest evaluation)", False),
    # Later is better: the run overfits later (a data-constrained run's turn-up).
    ("min_eval/loss_1_epoch", "epoch of the lowest head-1 validation loss", True),
    ("eval/bits_per_byte", "validation bits per byte", False),
    ("eval/induction_accuracy", "induction accuracy", True),
    ("eval/parse_rate", "parse rate of samples", True),
    ("eval/task_accuracy", "task accuracy (all difficulties)", True),
    ("generate/mean_accepted", "tokens per verify pass (teacher-forced)", True),
)


def loss_turned_up(runs: list[Run]) -> bool:
    """Whether any run's lowest head-1 loss came before its last evaluation."""
    return any(r.final["min_eval/loss_1_step"] != r.eval_steps[-1] for r in runs)


# Seeds pair two settings when their runs read the same text at (nearly) every training row.
PAIRED_OVERLAP = 0.99


def batch_overlap(a: Run, b: Run) -> float | None:
    """Share of training rows (every step's global batch, recomputed with the trainer's sampler)
    at which runs a and b read the same text: windows that start within the difference of their
    lookaheads. A window is seq_len + n tokens, so the sampler's range moves with n by a token or
    two, and now and then one of its draws. None where it cannot be recomputed: a task's data, or
    runs that did not log their training-set size."""
    ca, cb = a.config, b.config
    if a.train_tokens is None or b.train_tokens is None or str(ca.get("data.source")).startswith("task:"):
        return None
    shared = (
        "seed",
        "batch_size",
        "seq_len",
        "num_epochs",
        "data.source",
        "data.tokenizer",
        "data.val_fraction",
        "data.split_seed",
    )
    if a.train_tokens != b.train_tokens or any(ca.get(k) != cb.get(k) for k in shared):
        return 0.0
    tolerance = abs(n_predicted(ca) - n_predicted(cb))
    steps = min(a.eval_steps[-1], b.eval_steps[-1])
    same = 0
    try:
        for step in range(steps):
            starts = [
                data_lib.global_batch_starts(
                    r.train_tokens,
                    window_len=r.config["seq_len"] + n_predicted(r.config),
                    batch_size=r.config["batch_size"],
                    seed=r.config["seed"],
                    step=step,
                    num_epochs=r.config.get("num_epochs", 0),
                )
                for r in (a, b)
            ]
            same += int(np.sum(np.abs(starts[0] - starts[1]) <= tolerance))
    except UserError:  # the logged size does not fit the window: not a run the sampler could have fed
        return None
    return same / (steps * ca["batch_size"])


def pairing(setting: Setting, baseline: Setting) -> tuple[bool, str]:
    """Whether a setting's seeds pair with the baseline's (the same seeds, each pair's runs reading
    the same batches), and why (or why not) in words."""
    mine, theirs = ({r.config["seed"]: r for r in s.runs} for s in (setting, baseline))
    if set(mine) != set(theirs):
        return False, "unpaired: the settings ran different seeds"
    if len(mine) < 2:
        return False, "unpaired: one seed"
    overlaps = [batch_overlap(mine[s], theirs[s]) for s in sorted(mine)]
    if any(o is None for o in overlaps):
        return False, "unpaired: the batches cannot be recomputed (a task, or no logged training-set size)"
    if min(overlaps) < PAIRED_OVERLAP:
        return False, f"unpaired: same seeds but different batches ({min(overlaps):.1%} of rows shared)"
    return True, f"paired by seed: the same batches at {min(overlaps):.1%} or more of the rows"


def comparisons(settings: list[Setting], baseline: Setting) -> list[dict]:
    """Every setting against the baseline on every COMPARED metric all their runs logged, unpaired
    and, where the seeds pair, paired; the verdict uses the paired difference where it exists."""
    turned_up = loss_turned_up([r for s in settings for r in s.runs])
    # Accuracy per difficulty too: MTP's claimed gains on the tasks are at the harder levels.
    metrics = [*COMPARED, *((f"eval/task_accuracy_{k}", f"task accuracy, {k}", True) for k in difficulties(settings))]
    # MTP's verdict only where MTP is all that differs in kind: more tokens predicted than the
    # baseline's one; otherwise (a schedule against constant weights, teacherless) the setting's.
    one_token = n_predicted(baseline.runs[0].config) == 1
    out = []
    for s in settings:
        if s is baseline:
            continue
        subject = "MTP" if one_token and n_predicted(s.runs[0].config) > 1 else "setting"
        is_paired, why = pairing(s, baseline)
        for key, label, higher in metrics:
            if key.startswith("min_eval/") and not turned_up:  # the final loss (and step) again
                continue
            values, base = s.finals(key), baseline.finals(key)
            if len(values) != len(s.runs) or len(base) != len(baseline.runs) or not values:
                continue
            apart = stats.unpaired(values, base)
            together = stats.paired(s.by_seed(key), baseline.by_seed(key)) if is_paired else None
            used = together or apart
            out.append(
                {
                    "setting": s.label,
                    "metric": key,
                    "label": label,
                    "higher_is_better": higher,
                    "baseline": statistics.fmean(base),
                    "value": statistics.fmean(values),
                    "difference": used.difference,
                    "standard_error": used.standard_error,
                    "verdict": stats.verdict(used.difference, used.standard_error, higher, subject),
                    "pairing": why,
                    "unpaired": apart.as_dict(),
                    "paired": together.as_dict() if together else None,
                }
            )
    return out


def difficulties(settings: list[Setting]) -> list[str]:
    """The task difficulties every run logged an accuracy for (e.g. m1 … m8), in order."""
    prefix = "eval/task_accuracy_"
    keys = set.intersection(
        *({k[len(prefix) :] for k in r.final if k.startswith(prefix)} for s in settings for r in s.runs)
    )
    return sorted(keys, key=lambda k: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


DIFFERENCES_TEXT = (
    "Setting minus baseline, means over seeds. Unpaired: ± is sqrt(s²_setting/n + s²_baseline/n), s the sample "
    "standard deviation over seeds. Paired (where each seed's two runs start from the same trunk and read "
    "the same batches): ± is the standard deviation of the per-seed differences over √n. A verdict needs "
    "the difference to exceed two standard errors, of the paired difference where the seeds pair. Power: "
    "the probability that as many fresh seeds reach a verdict if the true difference is this one; seeds "
    "for 80 %: the seeds a side (pairs) that would give 80 % power (normal approximation, "
    "experiments/stats.py)."
)


def plus_minus(d: dict | None) -> str:
    if d is None:
        return "—"
    se = d["standard_error"]
    return f"{d['difference']:+.4f}" + (f" ± {se:.4f}" if se is not None else "")


def comparison_row(c: dict) -> list[str]:
    """A comparison's row: both differences (the one the verdict uses in bold), its power and seeds."""
    used = c["paired"] or c["unpaired"]
    cells = [plus_minus(c["unpaired"]), plus_minus(c["paired"])]
    cells[used is c["paired"]] = f"**{cells[used is c['paired']]}**"
    power = "—" if used["power"] is None else f"{used['power']:.0%}"
    needed = "—" if used["seeds_for_power"] is None else str(used["seeds_for_power"])
    return [
        f"`{c['setting']}`",
        c["label"],
        f"{c['baseline']:.4f}",
        f"{c['value']:.4f}",
        *cells,
        power,
        needed,
        c["verdict"],
    ]


def results_markdown(
    name: str,
    settings: list[Setting],
    baseline: Setting | None,
    summary: dict,
    incomplete: list[Run],
    commands: list[str] = (),
    hosts: list[str] = (),
) -> str:
    all_runs = [r for s in settings for r in s.runs]
    heads = max(n_predicted(s.runs[0].config) for s in settings)
    out = [
        *overview_section(name, settings, baseline, summary, hosts),
        *summary_section(settings, baseline, summary),
        *differences_section(summary),
        *turned_up_section(settings, all_runs),
        *task_section(settings),
        *equal_tokens_section(settings, all_runs),
        *per_head_section(settings, heads),
        *acceptance_section(settings, heads),
        "## Plots",
        "",
        "![head-1 validation loss vs tokens](loss_vs_tokens.png)",
        "",
        "![validation loss per head](per_head_loss.png)",
        "",
        "![head-1 validation loss vs wall-clock time](loss_vs_time.png)",
        "",
    ]
    if incomplete:
        out += [
            "## Left out",
            "",
            "These runs did not reach their last step: "
            + ", ".join(f"`{r.name}` (step {r.eval_steps[-1] if r.eval_steps else 0})" for r in incomplete),
            "",
        ]
    out += [
        "## Command",
        "",
        "The sweep(s), then the report; every training's own command is in COMMAND.",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(out)


def overview_section(
    name: str, settings: list[Setting], baseline: Setting | None, summary: dict, hosts: list[str]
) -> list[str]:
    all_runs = [r for s in settings for r in s.runs]
    seeds = sorted({r.config["seed"] for r in all_runs})
    times = [r.eval_times[-1] for r in all_runs]
    lengths = " or ".join(
        sorted(
            {
                f"{r.eval_steps[-1]} steps of {r.config['batch_size']}×{r.config['seq_len']} tokens "
                f"({fmt_tokens([r.eval_tokens[-1]])} tokens)"
                for r in all_runs
            }
        )
    )
    presets = ", ".join(sorted({f"`{r.config['preset']}`" for r in all_runs}))
    out = [
        f"# {name}",
        "",
        f"{len(all_runs)} runs: {len(settings)} settings × seeds {seeds}, preset {presets}, "
        f"{lengths} each; training wall time per run "
        f"{statistics.median(times):.0f} s median, {sum(times) / 60:.1f} min in all (logged step times, "
        "evaluations and saves included; start-up excluded) on "
        f"{' and '.join(hosts) if hosts else 'a machine the sweep did not record'}. These are small-scale "
        "CPU runs: they say what MTP does for a model and a budget this small, not at scale.",
        "",
    ]
    if baseline:
        out += [
            f"Baseline: `{baseline.label}`; its final head-1 validation loss "
            f"{summary['target_loss']:.4f} (mean over seeds) is the target below. ± is the sample standard "
            "deviation over seeds; times are medians over logged intervals (the first excluded).",
            "",
        ]
    else:
        out += ["No setting predicts a single token: pass `--baseline KEY=VALUE` for targets and ratios.", ""]
    return out


def _mean_of(runs: list[dict], key: str) -> float:
    return statistics.fmean([r[key] for r in runs])


def _ratio(value: float, base: float | None) -> str:
    return f" ({value / base:.2f}×)" if base else ""


def summary_section(settings: list[Setting], baseline: Setting | None, summary: dict) -> list[str]:
    by_setting = {s.label: [r for r in summary["runs"] if r["setting"] == s.label] for s in settings}
    base_runs = by_setting[baseline.label] if baseline else []
    base_time = _mean_of(base_runs, "median_step_time_s") if baseline else None
    base_tok_s = _mean_of(base_runs, "median_tokens_per_sec") if baseline else None
    base_seconds = statistics.fmean([r["steps"] * r["median_step_time_s"] for r in base_runs]) if baseline else None
    rows = []
    for s in settings:
        runs = by_setting[s.label]
        reached = [r for r in runs if r["tokens_to_target"] is not None]
        step_time, tok_s = _mean_of(runs, "median_step_time_s"), _mean_of(runs, "median_tokens_per_sec")
        if s is baseline:
            to_target, efficiency, time_to = "reference", "1.00×", f"{base_seconds:.1f} s (reference)"
        elif baseline and len(reached) == len(runs):
            # Bounds, not estimates, when a seed was below the target at its first evaluation.
            at_most, at_least = ("≤ ", "≥ ") if any(r["target_before_first_eval"] for r in runs) else ("", "")
            to_target = at_most + fmt_tokens([r["tokens_to_target"] for r in runs])
            efficiency = f"{at_least}{base_runs[0]['tokens'] / _mean_of(runs, 'tokens_to_target'):.2f}×"
            seconds = [r["seconds_to_target"] for r in runs]
            time_to = f"{at_most}{fmt(seconds, 1)} s{_ratio(statistics.fmean(seconds), base_seconds)}"
        elif baseline:
            to_target = f"not reached by {len(runs) - len(reached)} of {len(runs)} seeds"
            efficiency = time_to = "—"
        else:
            to_target = efficiency = time_to = "—"
        rows.append(
            [
                f"`{s.label}`",
                f"{s.runs[0].param_count / 1e6:.2f} M" if s.runs[0].param_count else "—",
                str(len(runs)),
                fmt(s.finals("eval/loss_1")),
                fmt(s.finals("eval/bits_per_byte")),
                to_target,
                efficiency,
                time_to,
                f"{step_time * 1e3:.0f} ms{_ratio(step_time, base_time)}",
                f"{tok_s:.0f}{_ratio(tok_s, base_tok_s)}",
            ]
        )
    return [
        "## Summary",
        "",
        markdown_table(
            [
                "setting",
                "params",
                "seeds",
                "final head-1 eval loss",
                "bits per byte",
                "tokens to baseline's final loss",
                "data efficiency",
                "training time to it (× baseline's)",
                "step time (× baseline)",
                "tokens/s (× baseline)",
            ],
            rows,
        ),
        "",
        "Tokens to the baseline's final loss: linear interpolation between evaluations. Data efficiency: "
        "the baseline's tokens divided by those. Training time to it: those tokens' steps at the median "
        "step time (evaluations and saves not counted), against the baseline's whole run. ≤ and ≥: some "
        "seed was below the target already at its first evaluation, so the tokens (and time) are at most, "
        "the efficiency at least, these.",
        "",
    ]


def differences_section(summary: dict) -> list[str]:
    if not summary["comparisons"]:
        return []
    return [
        "## Differences from the baseline",
        "",
        DIFFERENCES_TEXT,
        "",
        *sorted({f"- `{c['setting']}`: {c['pairing']}." for c in summary["comparisons"]}),
        "",
        markdown_table(
            [
                "setting",
                "metric",
                "baseline",
                "setting's",
                "unpaired: difference ± s.e.",
                "paired: difference ± s.e.",
                "power",
                "seeds for 80 %",
                "verdict",
            ],
            [comparison_row(c) for c in summary["comparisons"]],
        ),
        "",
    ]


def turned_up_section(settings: list[Setting], all_runs: list[Run]) -> list[str]:
    if not loss_turned_up(all_runs):
        return []
    return [
        "## Where the validation loss turns up",
        "",
        markdown_table(
            ["setting", "lowest head-1 eval loss", "at step", "at epoch", "final head-1 eval loss"],
            [
                [
                    f"`{s.label}`",
                    fmt(s.finals("min_eval/loss_1")),
                    fmt(s.finals("min_eval/loss_1_step"), 0),
                    fmt(s.finals("min_eval/loss_1_epoch"), 1),
                    fmt(s.finals("eval/loss_1")),
                ]
                for s in settings
            ],
        ),
        "",
    ]


def task_section(settings: list[Setting]) -> list[str]:
    levels = difficulties(settings)
    if not levels:
        return []
    return [
        "## Task accuracy per difficulty (final step)",
        "",
        "Greedy answers to held-out problems, exact match; mean ± s.d. over seeds.",
        "",
        markdown_table(
            ["setting", *levels, "all"],
            [
                [
                    f"`{s.label}`",
                    *(fmt(s.finals(f"eval/task_accuracy_{k}"), 3) for k in levels),
                    fmt(s.finals("eval/task_accuracy"), 3),
                ]
                for s in settings
            ],
        ),
        "",
    ]


def equal_tokens_section(settings: list[Setting], all_runs: list[Run]) -> list[str]:
    token_points = sorted(set().union(*(r.eval_tokens for r in all_runs)))
    out = []
    for key, title in (("eval/loss_1", "Head-1 validation loss"), ("eval/bits_per_byte", "Validation bits per byte")):
        if not any(key in e for r in all_runs for e in r.evals):
            continue
        out += [
            f"## {title} at equal tokens",
            "",
            markdown_table(
                ["setting", *(fmt_tokens([t]) for t in token_points)],
                [[f"`{s.label}`", *(fmt(s.at_tokens(key, t)) for t in token_points)] for s in settings],
            ),
            "",
        ]
    return out


def per_head_section(settings: list[Setting], heads: int) -> list[str]:
    return [
        "## Final validation loss per head",
        "",
        "Head k predicts token t+k.",
        "",
        markdown_table(
            ["setting", *(f"head {k}" for k in range(1, heads + 1))],
            [[f"`{s.label}`", *(fmt(s.finals(f"eval/loss_{k}")) for k in range(1, heads + 1))] for s in settings],
        ),
        "",
    ]


def acceptance_section(settings: list[Setting], heads: int) -> list[str]:
    if heads == 1:
        return []
    return [
        "## Draft acceptance (teacher-forced, final step)",
        "",
        "With the true text as context, the share of positions where head k's greedy token equals "
        "head 1's greedy token at the position it drafts for (the self-speculative decoding check); "
        "tokens per verify pass = 1 + the expected run of accepted drafts.",
        "",
        markdown_table(
            ["setting", *(f"head {k}" for k in range(2, heads + 1)), "tokens per verify pass"],
            [
                [
                    f"`{s.label}`",
                    *(fmt(s.finals(f"generate/acceptance_{k}"), 3) for k in range(2, heads + 1)),
                    fmt(s.finals("generate/mean_accepted"), 2),
                ]
                for s in settings
            ],
        ),
        "",
    ]


def plot(settings: list[Setting], out_dir: pathlib.Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("report.py needs matplotlib: pip install -e '.[plots]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    for x, name, xlabel in (
        ("tokens", "loss_vs_tokens.png", "tokens seen"),
        ("seconds", "loss_vs_time.png", "wall-clock time of training, evaluations and saves (s)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in settings:
            xs, mean, std = s.mean_curve("eval/loss_1", x)
            ax.plot(xs, mean, marker="o", label=f"{s.label} ({len(s.runs)} seeds)")
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
        ax.set(xlabel=xlabel, ylabel="head-1 validation loss (nats)", title="mean over seeds, band ±1 s.d.")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings) + 1, 3.8), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], settings):
        for k in range(1, n_predicted(s.runs[0].config) + 1):
            xs, mean, std = s.mean_curve(f"eval/loss_{k}")
            ax.plot(xs, mean, marker="o", label=f"head {k} (t+{k})")
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
        ax.set(title=s.label, xlabel="tokens seen")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation loss (nats)")
    fig.tight_layout()
    fig.savefig(out_dir / "per_head_loss.png", dpi=120)
    plt.close(fig)


def command_record(sweep_dir: pathlib.Path, report_argv: list[str]) -> str:
    def read(name: str) -> str:
        path = sweep_dir / name
        return path.read_text() if path.exists() else f"(no {name} file in {sweep_dir})\n"

    return (
        "# sweep command(s), as recorded by experiments/sweep.py\n"
        + read("SWEEP")
        + f"# report, at commit {git_commit()}\n"
        + shlex.join(["python", "experiments/report.py", *report_argv])
        + "\n"
        + "# the trainings the sweep ran\n"
        + read("COMMANDS")
    )


def report(
    sweep_dir: pathlib.Path, out_dir: pathlib.Path, baseline: str | None = None, report_argv: list[str] = ()
) -> dict:
    """Write results.md, runs.json, the plots and COMMAND for the runs in `sweep_dir`; return runs.json's content."""
    workdirs = [p.parent for p in sorted(sweep_dir.glob("*/metrics.jsonl")) if (p.parent / "config.json").exists()]
    if not workdirs:
        raise UserError(f"no runs in {sweep_dir}: run experiments/sweep.py --name={sweep_dir.name} first")
    loaded = [load_run(w) for w in workdirs]
    runs = [r for r in loaded if r.finished]
    incomplete = [r for r in loaded if not r.finished]
    if not runs:
        raise UserError(f"none of the {len(loaded)} runs in {sweep_dir} has finished: rerun the sweep to complete them")
    settings = group(runs)
    base = pick_baseline(settings, baseline)
    settings.sort(key=lambda s: s is not base)  # the baseline first
    summary = summarize(settings, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "runs.json").write_text(json.dumps({"name": sweep_dir.name, **summary}, indent=2) + "\n")
    recorded = (sweep_dir / "SWEEP").read_text().splitlines() if (sweep_dir / "SWEEP").exists() else []
    sweeps = [line for line in recorded if line and not line.startswith("#")]
    hosts = sorted({m.group(1) for line in recorded if (m := re.match(r"# at commit .* on (.+)$", line))})
    commands = [*sweeps, shlex.join(["python", "experiments/report.py", *report_argv])]
    (out_dir / "results.md").write_text(
        results_markdown(sweep_dir.name, settings, base, summary, incomplete, commands, hosts)
    )
    (out_dir / "COMMAND").write_text(command_record(sweep_dir, list(report_argv)))
    plot(settings, out_dir)
    return summary


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="the sweep's --name")
    parser.add_argument(
        "--baseline", help="KEY=VALUE[,KEY=VALUE…] picking the reference setting (default: the one with mtp_n_tokens=1)"
    )
    parser.add_argument("--runs_dir", default=str(ROOT / "experiments" / "runs"))
    parser.add_argument("--results_dir", default=str(ROOT / "experiments" / "results"))
    parser.add_argument(
        "--pool",
        nargs="+",
        metavar="NAME",
        help="pool these reported sweeps (one command, disjoint seeds) instead of reporting one",
    )
    parser.add_argument("--pool_name", help="where the pooled report goes (default: FIRST_pooled)")
    args = parser.parse_args(argv)
    if args.pool:
        out = pool.main(pathlib.Path(args.results_dir), args.pool, args.pool_name or f"{args.pool[0]}_pooled")
        print(f"wrote {out}/: pooled.md, runs.json ({len(args.pool)} sweeps)")
        return
    if not args.name:
        raise UserError("name the sweep to report (experiments/report.py NAME) or pool sweeps with --pool NAME NAME …")
    out_dir = pathlib.Path(args.results_dir) / args.name
    summary = report(pathlib.Path(args.runs_dir) / args.name, out_dir, args.baseline, argv)
    print(f"wrote {out_dir}/: results.md, runs.json, COMMAND, 3 plots ({len(summary['runs'])} runs)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        fail(str(e))
