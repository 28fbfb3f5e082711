"""Pool sweeps that ran one command with different seeds: each set's comparison and the pooled one.

    python experiments/report.py --pool NAME NAME … [--pool_name=NAME]

Reads each sweep's experiments/results/NAME/runs.json and COMMAND (report.py writes both). The
sweeps must have run the same sweep command but for --name, the seed values and how they were run
(--parallel, --runs_dir, --launcher), and must not share a seed: then their seeds are draws from one
distribution and the pooled comparison is the comparison over all of them. It is paired where
every set's seeds paired (report.py checks each set's batches), unpaired otherwise. Writes
experiments/results/POOL_NAME/{pooled.md, runs.json} (runs.json as report.py's, with the sets).
"""

from __future__ import annotations

import json
import pathlib
import shlex
import statistics

from experiments import stats
from mtp_jax.errors import UserError

# Flags that say how a sweep ran, not what it trained.
HOW_IT_RAN = ("--name", "--parallel", "--runs_dir", "--launcher", "--dry_run")


def sweep_commands(command_file: pathlib.Path) -> list[str]:
    """The sweep command lines recorded in a results folder's COMMAND."""
    lines = command_file.read_text().splitlines()
    out, inside = [], False
    for line in lines:
        if line.startswith("# sweep command"):
            inside = True
        elif line.startswith("# report"):
            break
        elif inside and line.strip() and not line.startswith("#"):
            out.append(line)
    return out


def normalise(command: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(what the command trains, as sorted flag=value items, its seeds): the name, the seeds and
    how it ran taken out."""
    words = shlex.split(command)
    words = words[words.index("experiments/sweep.py") + 1 :] if "experiments/sweep.py" in words else words
    items, seeds, i = [], (), 0
    while i < len(words):
        flag, _, value = words[i].partition("=")
        if (
            not value
            and flag in ("--sweep", "--set", "--parallel", "--runs_dir", "--launcher", "--name", "--config")
            and i + 1 < len(words)
        ):
            value, i = words[i + 1], i + 1
        i += 1
        if flag in HOW_IT_RAN:
            continue
        if flag == "--sweep" and value.startswith("seed="):
            seeds = tuple(int(v) for v in value.partition("=")[2].split(","))
            continue
        items.append(f"{flag}={value}")
    return tuple(sorted(items)), seeds


def load_sets(results_dir: pathlib.Path, names: list[str]) -> list[dict]:
    """Each sweep's runs.json, checked to be the same command on disjoint seeds."""
    if len(names) < 2:
        raise UserError(
            f"--pool needs two or more sweeps, got {names}: e.g. --pool data_constrained data_constrained_replication"
        )
    sets, reference = [], None
    for name in names:
        folder = results_dir / name
        if not (folder / "runs.json").exists() or not (folder / "COMMAND").exists():
            raise UserError(
                f"--pool {name}: no runs.json and COMMAND in {folder}: run experiments/report.py {name} first"
            )
        commands = [normalise(c) for c in sweep_commands(folder / "COMMAND")]
        if not commands:
            raise UserError(f"--pool {name}: {folder / 'COMMAND'} records no sweep command")
        trained = sorted(c for c, _ in commands)
        if reference is None:
            reference = (name, trained)
        elif trained != reference[1]:
            differs = sorted(set(trained[0]) ^ set(reference[1][0]))
            raise UserError(
                f"--pool: sweeps {reference[0]} and {name} ran different commands (they differ in "
                f"{', '.join(differs) or 'their number of sweep commands'}): pool only reruns of one "
                "command with other seeds"
            )
        sets.append({"name": name, **json.loads((folder / "runs.json").read_text())})
    seen: dict[int, str] = {}
    for s in sets:
        for seed in sorted({r["seed"] for r in s["runs"]}):
            if seed in seen:
                raise UserError(
                    f"--pool: sweeps {seen[seed]} and {s['name']} both ran seed {seed}: pooled seeds "
                    "must be distinct draws"
                )
            seen[seed] = s["name"]
    baselines = {s["baseline"] for s in sets}
    if len(baselines) != 1:
        raise UserError(f"--pool: the sweeps' baselines differ ({', '.join(sorted(map(str, baselines)))})")
    return sets


def values_by_seed(runs: list[dict], setting: str, metric: str) -> dict[int, float]:
    return {
        r["seed"]: r["final"][metric] for r in runs if r["setting"] == setting and r["final"].get(metric) is not None
    }


def pool(sets: list[dict]) -> dict:
    """runs.json for the pooled sets: every comparison that all sets made, over all their seeds."""
    baseline = sets[0]["baseline"]
    runs = [r for s in sets for r in s["runs"]]
    keyed = [{(c["setting"], c["metric"]): c for c in s["comparisons"]} for s in sets]
    comparisons = []
    for key, first in keyed[0].items():
        if not all(key in k for k in keyed[1:]):
            continue
        setting, metric = key
        values, base = values_by_seed(runs, setting, metric), values_by_seed(runs, baseline, metric)
        apart = stats.unpaired(list(values.values()), list(base.values()))
        together = stats.paired(values, base) if all(k[key].get("paired") for k in keyed) else None
        used = together or apart
        subject = "setting" if first["verdict"].startswith("setting") else "MTP"
        comparisons.append(
            {
                "setting": setting,
                "metric": metric,
                "label": first["label"],
                "higher_is_better": first["higher_is_better"],
                "baseline": statistics.fmean(base.values()),
                "value": statistics.fmean(values.values()),
                "difference": used.difference,
                "standard_error": used.standard_error,
                "verdict": stats.verdict(used.difference, used.standard_error, first["higher_is_better"], subject),
                "pairing": "paired by seed in every set" if together else "unpaired (some set's seeds do not pair)",
                "unpaired": apart.as_dict(),
                "paired": together.as_dict() if together else None,
                "sets": [
                    {
                        "name": s["name"],
                        "seeds": sorted({r["seed"] for r in s["runs"]}),
                        "difference": k[key]["difference"],
                        "standard_error": k[key]["standard_error"],
                        "verdict": k[key]["verdict"],
                    }
                    for s, k in zip(sets, keyed)
                ],
            }
        )
    return {
        "baseline": baseline,
        "target_loss": None,
        "pooled_from": [s["name"] for s in sets],
        "comparisons": comparisons,
        "runs": runs,
    }


def budget(runs: list[dict]) -> str:
    """The training budget the pooled runs share (one command: the same steps and tokens for all)."""
    budgets = sorted({(r["steps"], r["tokens"]) for r in runs})
    return "; ".join(f"{steps} steps, {tokens / 1e6:.2f} M tokens" for steps, tokens in budgets)


def pooled_markdown(name: str, summary: dict) -> str:
    out = [
        f"# {name}",
        "",
        f"The sweeps {', '.join(f'[{n}](../{n}/results.md)' for n in summary['pooled_from'])} ran one command "
        f"with disjoint seeds (every training {budget(summary['runs'])}; each set's results.md gives the model, "
        "data and wall time); here each set's comparison with the baseline "
        f"(`{summary['baseline']}`) and the comparison over all their seeds. Paired where every set's seeds pair "
        "(the same trunk initialisation and batches per seed), unpaired otherwise; a verdict needs the difference "
        "beyond two standard errors. Power: the probability that as many fresh seeds reach a verdict if the "
        "pooled difference is the true one; seeds for 80 %: the seeds a side (pairs) that would give 80 % "
        "(normal approximation, experiments/stats.py).",
        "",
    ]
    for c in summary["comparisons"]:
        used = c["paired"] or c["unpaired"]
        out += [
            f"## `{c['setting']}`: {c['label']}",
            "",
            "| set | seeds | difference ± s.e. | verdict |",
            "|---|---|---|---|",
        ]
        for s in c["sets"]:
            se = f" ± {s['standard_error']:.4f}" if s["standard_error"] is not None else ""
            out.append(
                f"| {s['name']} | {', '.join(map(str, s['seeds']))} | {s['difference']:+.4f}{se} | {s['verdict']} |"
            )
        se = f" ± {used['standard_error']:.4f}" if used["standard_error"] is not None else ""
        out += [
            f"| **pooled** ({'paired' if used['paired'] else 'unpaired'}) | {used['seeds']} a side "
            f"| **{used['difference']:+.4f}{se}** | **{c['verdict']}** |",
            "",
        ]
        if used["power"] is not None:
            out += [
                f"Power at the pooled difference and spread with {used['seeds']} seeds a side: "
                f"{used['power']:.0%}; 80 % needs {used['seeds_for_power']} seeds a side.",
                "",
            ]
    out += [
        "## Command",
        "",
        "```bash",
        f"python experiments/report.py --pool {' '.join(summary['pooled_from'])} --pool_name={name}",
        "```",
        "",
    ]
    return "\n".join(out)


def main(results_dir: pathlib.Path, names: list[str], pool_name: str) -> pathlib.Path:
    summary = pool(load_sets(results_dir, names))
    out = results_dir / pool_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.json").write_text(json.dumps({"name": pool_name, **summary}, indent=2) + "\n")
    (out / "pooled.md").write_text(pooled_markdown(pool_name, summary))
    return out
