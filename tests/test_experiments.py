"""experiments/sweep.py and experiments/report.py: grids, resumable sweeps with the real trainer,
and report numbers checked against hand-computed answers on synthetic runs."""

import json
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import pool, report, stats, sweep, verdicts
from mtp_jax.errors import UserError
from mtp_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = f"{ROOT / 'configs' / 'mtp3.py'}:tiny"


def dry_run(capsys, *args) -> list[list[str]]:
    assert sweep.main([f"--config={CONFIG}", "--name=grid", "--dry_run", *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def flag_values(command: list[str], prefix: str) -> dict[str, str]:
    return dict(arg[len(prefix) :].split("=", 1) for arg in command if arg.startswith(prefix))


def test_dry_run_prints_one_command_per_grid_point_with_its_overrides(capsys, tmp_path):
    commands = dry_run(
        capsys,
        "--sweep",
        "mtp_n_tokens=1,2,3",
        "--sweep",
        "seed=0,1",
        "--set",
        "num_train_steps=7",
        "--set",
        "model.d_model=32",
        f"--runs_dir={tmp_path}",
    )
    assert len(commands) == 6
    points = set()
    for command in commands:
        assert command[1:3] == ["-m", "mtp_jax.main"] and command[3] == f"--config={CONFIG}"
        overrides = flag_values(command, "--config.")
        assert overrides.keys() == {"num_train_steps", "model.d_model", "mtp_n_tokens", "seed"}
        assert overrides["num_train_steps"] == "7" and overrides["model.d_model"] == "32"
        workdir = flag_values(command, "--")["workdir"]
        name = f"mtp_n_tokens={overrides['mtp_n_tokens']},seed={overrides['seed']}"
        assert workdir == str(tmp_path / "grid" / name)
        points.add((overrides["mtp_n_tokens"], overrides["seed"]))
    assert points == {(n, s) for n in "123" for s in "01"}
    assert not (tmp_path / "grid").exists()  # a dry run writes nothing


def test_launcher_replaces_the_python_command(capsys, tmp_path):
    (command,) = dry_run(capsys, "--launcher=./launch.sh local 2", "--sweep", "seed=3", f"--runs_dir={tmp_path}")
    assert command == [
        "./launch.sh",
        "local",
        "2",
        f"--config={CONFIG}",
        f"--workdir={tmp_path / 'grid' / 'seed=3'}",
        "--config.seed=3",
    ]


def test_dry_run_escapes_slashes_in_run_names(capsys, tmp_path):
    (command,) = dry_run(capsys, "--sweep", "data.source=/corpus/a.txt", f"--runs_dir={tmp_path}")
    assert flag_values(command, "--")["workdir"] == str(tmp_path / "grid" / "data.source=%2Fcorpus%2Fa.txt")
    assert flag_values(command, "--config.")["data.source"] == "/corpus/a.txt"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "mtp_n_tokenz=1,2"], "unknown config field 'mtp_n_tokenz'"),
        (["--sweep", "seed=0,1", "--set", "seed=2"], "seed is given more than once"),
        (["--sweep", "seed"], "must look like KEY=VALUE"),
        (["--sweep", "seed=0,,1"], "has an empty value"),
        (["--sweep", "num_epochs=1,all"], "num_epochs='all' must be a whole number of epochs"),
        (["--set", "num_train_steps=ten"], "must be a whole number"),
        (["--parallel", "0"], "--parallel=0 must be >= 1"),
    ],
)
def test_bad_sweep_arguments_raise_one_line(args, message):
    with pytest.raises(UserError, match=message):
        sweep.main([f"--config={CONFIG}", "--name=bad", "--dry_run", *args])


def test_each_planned_run_is_as_long_as_its_steps_or_epochs(tmp_path):
    args = ["--config", CONFIG, "--name=grid", f"--runs_dir={tmp_path}", "--sweep", "num_epochs=0,2"]
    planned = sweep.plan(sweep.parse_args([*args, "--set", "num_train_steps=7"]))
    assert [(p.name, p.steps, p.epochs) for p in planned] == [("num_epochs=0", 7, 0), ("num_epochs=2", 7, 2)]
    assert not any(p.finished() for p in planned)  # nothing trained yet


def sweep_command(tmp_path, *args) -> list[str]:
    """A real sweep of tiny trainings whose data cache lives in tmp_path."""
    return [
        sys.executable,
        str(ROOT / "experiments" / "sweep.py"),
        f"--config={CONFIG}",
        "--name=real",
        f"--runs_dir={tmp_path / 'runs'}",
        *args,
        *(
            f"--set={kv}"
            for kv in (
                "eval_every=50",
                "checkpoint_every=50",
                "log_every=1",
                "eval_batches=2",
                "sample_tokens=0",
                f"data.cache_dir={tmp_path / 'cache'}",
            )
        ),
    ]


def logged_steps(workdir: pathlib.Path, key: str) -> list[int]:
    path = workdir / "metrics.jsonl"
    return [e["step"] for e in read_metrics(path.parent) if key in e] if path.exists() else []


@pytest.mark.slow
def test_sweep_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
    command = sweep_command(tmp_path, "--sweep", "num_train_steps=6,300")
    short, long = tmp_path / "runs" / "real" / "num_train_steps=6", tmp_path / "runs" / "real" / "num_train_steps=300"
    first = subprocess.Popen(
        [*command, "--parallel=2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    # Ctrl-C once the short run has finished and the long one is under way.
    deadline = time.monotonic() + 240
    while not (6 in logged_steps(short, "eval/loss_1") and logged_steps(long, "train/loss_1")[-1:] >= [10]):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 130, out
    assert "[1/2] num_train_steps=6 done in" in out
    assert "[2/2] num_train_steps=300 stopped before step 300" in out and "interrupted by SIGINT" in out
    stopped_at = logged_steps(long, "train/loss_1")[-1]
    assert 10 <= stopped_at < 300
    short_metrics = (short / "metrics.jsonl").read_text()

    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stdout + second.stderr
    lines = second.stdout.splitlines()
    assert lines[0] == "[1/2] num_train_steps=6 skipped (finished)"
    assert lines[1].startswith("[2/2] num_train_steps=300 resuming")
    assert lines[2].startswith("[2/2] num_train_steps=300 done in")
    attempts = (long / "run.log").read_text().split("--- sweep.py ")[1:]
    assert len(attempts) == 2 and f"at step {stopped_at}" in attempts[1]  # resumed where it stopped
    assert logged_steps(long, "train/loss_1") == list(range(1, 301))  # each step once
    assert logged_steps(long, "eval/loss_1") == [50, 100, 150, 200, 250, 300]
    assert (short / "metrics.jsonl").read_text() == short_metrics
    sweep_dir = tmp_path / "runs" / "real"
    assert len((sweep_dir / "COMMANDS").read_text().splitlines()) == 2  # recorded once, not per invocation
    invocations = [line for line in (sweep_dir / "SWEEP").read_text().splitlines() if "experiments/sweep.py" in line]
    assert len(invocations) == 2 and invocations[0].endswith("--parallel=2")  # each distinct one, once
    assert (sweep_dir / "SWEEP").read_text().startswith("# at commit ") and f" on {sweep.host()}\n" in (
        sweep_dir / "SWEEP"
    ).read_text()

    # The report reads what the real trainer wrote.
    summary = report.report(sweep_dir, tmp_path / "results")
    final = {r["run"]: r["final"]["eval/loss_1"] for r in summary["runs"]}
    assert final == {w.name: read_metrics(w)[-1]["eval/loss_1"] for w in (short, long)}
    assert summary["baseline"] is None and (tmp_path / "results" / "loss_vs_time.png").stat().st_size > 1024


@pytest.mark.slow
def test_sweep_of_epochs_runs_them_to_the_end_then_skips_them(tmp_path, code_corpus):
    corpus = [f"--set=data.source={code_corpus / 'corpus.txt'}", "--set=data.val_fraction=0.1"]
    command = sweep_command(tmp_path, "--sweep", "num_epochs=1,2", *corpus)
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    sweep_dir = tmp_path / "runs" / "real"
    train_tokens = read_metrics(sweep_dir / "num_epochs=1")[0]["data/train_tokens"]
    # Non-overlapping windows of seq_len 32 + 3 heads' lookahead, 8 to a step, the last partial batch dropped.
    per_epoch = ((train_tokens - 35) // 35 + 1) // 8
    assert per_epoch > 10
    for epochs in (1, 2):
        workdir = sweep_dir / f"num_epochs={epochs}"
        assert logged_steps(workdir, "eval/loss_1")[-1] == epochs * per_epoch
        assert logged_steps(workdir, "train/loss_1") == list(range(1, epochs * per_epoch + 1))

    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.splitlines() == [
        "[1/2] num_epochs=1 skipped (finished)",
        "[2/2] num_epochs=2 skipped (finished)",
    ]
    summary = report.report(sweep_dir, tmp_path / "results")
    assert {r["run"]: r["steps"] for r in summary["runs"]} == {"num_epochs=1": per_epoch, "num_epochs=2": 2 * per_epoch}


@pytest.mark.slow
def test_sweep_reports_a_failed_run_and_exits_nonzero(tmp_path):
    result = subprocess.run(sweep_command(tmp_path, "--sweep", "seq_len=3"), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert (
        "[1/1] seq_len=3 FAILED (exit 2): error: seq_len=3 must exceed mtp_n_tokens=3" in result.stdout.splitlines()[-2]
    )


# ------------------------------------------------------------------------------------------ report
# Synthetic runs: 10 tokens per step, 4 steps, evaluations at steps 2 and 4, a log every step.
# Baseline final head-1 losses 2.0 and 2.2 → target 2.1.
# n=2, seed 0: 2.5 → 1.5, crosses 2.1 at 20 + 20 × 0.4 / 1.0 = 28 tokens;
#      seed 1: 2.3 → 1.9, crosses at 20 + 20 × 0.2 / 0.4 = 30 tokens.
# n=3: 3.5 → 2.5, never reaches 2.1.
STEP_TIMES = [10.0, 1.0, 3.0, 2.0]  # the first interval holds the compile
HEAD1 = {
    (1, 0): (3.0, 2.0),
    (1, 1): (3.2, 2.2),
    (2, 0): (2.5, 1.5),
    (2, 1): (2.3, 1.9),
    (3, 0): (3.5, 2.5),
    (3, 1): (3.4, 2.4),
}


def write_run(
    sweep_dir: pathlib.Path,
    n: int,
    seed: int,
    head1: tuple[float, float],
    steps: int = 4,
    final: dict | None = None,
    teacherless: bool = False,
    train_tokens: int | None = None,
    num_epochs: int = 0,
    steps_per_epoch: int | None = None,
) -> None:
    """A run of the synthetic sweep; `final` adds metrics to its last evaluation; `train_tokens` is
    the training set's size the trainer logs (omitted: a run from before it did), `steps_per_epoch`
    what it logs for a run of `num_epochs` (omitted: a run stopped before step 0's log)."""
    workdir = sweep_dir / f"mtp_n_tokens={n},seed={seed}{',teacherless' * teacherless}"
    workdir.mkdir(parents=True)
    config = {
        "preset": "tiny",
        "use_mtp": True,
        "mtp_n_tokens": n,
        "seed": seed,
        "num_train_steps": 4,
        "num_epochs": num_epochs,
        "batch_size": 2,
        "seq_len": 5,
        "model": {"d_model": 8},
        "vocab_size": 256,
        "data": {"task": {"teacherless": teacherless}},
    }
    (workdir / "config.json").write_text(json.dumps(config))
    first = {"model/param_count": 1000 * n, "data/train_tokens": train_tokens, "data/steps_per_epoch": steps_per_epoch}
    events = [{"step": 0, **{k: v for k, v in first.items() if v is not None}}]
    for step in range(1, steps + 1):
        events.append(
            {
                "step": step,
                "train/loss_1": 5.0 - step,
                "train/step_time_s": STEP_TIMES[step - 1],
                "train/tokens_per_sec": 10 / STEP_TIMES[step - 1],
                "train/tokens_seen": 10 * step,
            }
        )
        if step % 2 == 0:
            loss = head1[step // 2 - 1]
            events.append(
                {
                    "step": step,
                    "eval/loss_1": loss,
                    "eval/bits_per_byte": loss / np.log(2),
                    **{f"eval/loss_{k}": loss + 0.5 * (k - 1) for k in range(2, n + 1)},
                    **{f"generate/acceptance_{k}": 0.5 / k for k in range(2, n + 1)},
                    **(final or {} if step == steps else {}),
                }
            )
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


@pytest.fixture
def synthetic(tmp_path):
    sweep_dir = tmp_path / "runs" / "synthetic"
    for (n, seed), head1 in HEAD1.items():
        write_run(sweep_dir, n, seed, head1)
    write_run(sweep_dir, 2, 2, (1.0, 0.5), steps=3)  # interrupted: left out
    (sweep_dir / "SWEEP").write_text(
        "# at commit abc on Some CPU, 2 cores\npython experiments/sweep.py --name=synthetic\n"
    )
    (sweep_dir / "COMMANDS").write_text("python -m mtp_jax.main --workdir=x\n")
    return sweep_dir, tmp_path / "results" / "synthetic"


def test_runs_of_epochs_end_at_num_epochs_times_the_logged_steps_per_epoch(tmp_path):
    sweep_dir = tmp_path / "runs" / "epochs"
    for (n, seed), head1 in HEAD1.items():
        write_run(sweep_dir, n, seed, head1, num_epochs=2, steps_per_epoch=2)  # the last step: 2 × 2 = 4
    write_run(sweep_dir, 2, 2, (1.0, 0.5), num_epochs=4, steps_per_epoch=2)  # step 4 of 8
    write_run(sweep_dir, 3, 2, (1.0, 0.5), num_epochs=2)  # no steps per epoch logged: its length is unknown
    for path in sweep_dir.glob("*/config.json"):  # ignored when num_epochs > 0, as the trainer ignores it
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_steps": 40}))
    workdirs = {p.name: p for p in sweep_dir.iterdir()}
    assert sweep.finished(workdirs["mtp_n_tokens=2,seed=0"], 40, 2)
    assert not sweep.finished(workdirs["mtp_n_tokens=2,seed=0"], 40, 3)  # 3 epochs end at step 6
    assert sweep.finished(workdirs["mtp_n_tokens=2,seed=0"], 4, 0)  # a run of steps, as before
    assert not sweep.finished(workdirs["mtp_n_tokens=2,seed=2"], 40, 4)
    assert not sweep.finished(workdirs["mtp_n_tokens=3,seed=2"], 40, 2)

    summary = report.report(sweep_dir, tmp_path / "results")
    # The six finished runs, compared as the synthetic runs of 4 steps are.
    runs = {r["run"]: r for r in summary["runs"]}
    assert len(runs) == 6 and runs["mtp_n_tokens=2,seed=0"]["tokens_to_target"] == pytest.approx(28.0)
    c = next(c for c in summary["comparisons"] if (c["setting"], c["metric"]) == ("mtp_n_tokens=2", "eval/loss_1"))
    assert c["difference"] == pytest.approx(-0.4) and c["standard_error"] == pytest.approx(0.05**0.5)
    left_out = (tmp_path / "results" / "results.md").read_text().split("## Left out")[1].split("## ")[0]
    assert "`mtp_n_tokens=2,seed=2` (step 4)" in left_out and "`mtp_n_tokens=3,seed=2` (step 4)" in left_out


def test_tokens_to_reach_interpolates_between_evaluations():
    assert report.tokens_to_reach([20, 40], [2.5, 1.5], 2.1) == pytest.approx(28.0)
    assert report.tokens_to_reach([20, 40, 60], [3.0, 2.0, 1.0], 2.0) == pytest.approx(40.0)
    assert report.tokens_to_reach([20, 40], [2.0, 1.0], 2.5) == 20.0  # already below at the first evaluation
    assert report.tokens_to_reach([20, 40], [3.5, 2.5], 2.1) is None


def test_report_numbers_match_hand_computed_answers(synthetic):
    sweep_dir, out_dir = synthetic
    summary = report.report(sweep_dir, out_dir, report_argv=["synthetic"])
    saved = json.loads((out_dir / "runs.json").read_text())
    assert saved == {"name": "synthetic", **summary}
    assert saved["baseline"] == "mtp_n_tokens=1" and saved["target_loss"] == pytest.approx(2.1)
    runs = {r["run"]: r for r in saved["runs"]}
    assert len(runs) == 6  # the interrupted run is left out
    assert runs["mtp_n_tokens=2,seed=0"]["tokens_to_target"] == pytest.approx(28.0)
    assert runs["mtp_n_tokens=2,seed=1"]["tokens_to_target"] == pytest.approx(30.0)
    assert runs["mtp_n_tokens=3,seed=0"]["tokens_to_target"] is None
    r = runs["mtp_n_tokens=2,seed=0"]
    assert r["median_step_time_s"] == 2.0  # median of 1, 3, 2: the first interval is left out
    assert r["median_tokens_per_sec"] == 5.0
    assert r["train_time_s"] == 16.0 and r["tokens"] == 40 and r["steps"] == 4
    assert r["final"]["eval/loss_2"] == 2.0 and r["param_count"] == 2000

    md = (out_dir / "results.md").read_text()
    summary_table = md.split("## Summary")[1].split("## ")[0]
    rows = {line.split(" | ")[0]: line for line in summary_table.splitlines() if line.startswith("| `")}
    # n=2 final head-1 loss: mean of 1.5 and 1.9 = 1.7, sample std = 0.2·√2 = 0.2828.
    assert "| 1.7000 ± 0.2828 |" in rows["| `mtp_n_tokens=2`"]
    # Tokens to target: mean of 28 and 30 = 29, std √2; data efficiency 40 / 29 = 1.38×.
    assert "| 29.00 ± 1.41 | 1.38× |" in rows["| `mtp_n_tokens=2`"]
    # Training time to it: 2.8 and 3.0 steps at 2 s = 5.6 and 6.0 s, against the baseline's 4 × 2 s.
    assert runs["mtp_n_tokens=2,seed=0"]["seconds_to_target"] == pytest.approx(5.6)
    assert "| 5.8 ± 0.3 s (0.72×) |" in rows["| `mtp_n_tokens=2`"]
    assert "| 8.0 s (reference) |" in rows["| `mtp_n_tokens=1`"]
    assert "not reached by 2 of 2 seeds" in rows["| `mtp_n_tokens=3`"]
    assert "mtp_n_tokens=2,seed=2` (step 2)" in md  # listed as left out
    assert "start-up excluded) on Some CPU, 2 cores." in md  # the machine the sweep recorded
    assert "python experiments/sweep.py --name=synthetic" in (out_dir / "COMMAND").read_text()
    assert "python experiments/report.py synthetic" in (out_dir / "COMMAND").read_text()
    command = md.split("## Command")[1]
    assert "python experiments/sweep.py --name=synthetic\npython experiments/report.py synthetic\n" in command


def test_settings_mean_curve_is_mean_and_sample_std_over_seeds(synthetic):
    sweep_dir, _ = synthetic
    runs = [report.load_run(p) for p in sorted(sweep_dir.glob("mtp_n_tokens=*"))]
    settings = report.group([r for r in runs if r.finished])
    assert [s.label for s in settings] == ["mtp_n_tokens=1", "mtp_n_tokens=2", "mtp_n_tokens=3"]
    tokens, mean, std = settings[0].mean_curve("eval/loss_1")
    np.testing.assert_allclose(tokens, [20, 40])
    np.testing.assert_allclose(mean, [3.1, 2.1])
    np.testing.assert_allclose(std, [np.std([3.0, 3.2], ddof=1), np.std([2.0, 2.2], ddof=1)])
    seconds, _, _ = settings[0].mean_curve("eval/loss_1", x="seconds")
    np.testing.assert_allclose(seconds, [11.0, 16.0])  # 10 + 1, then + 3 + 2
    assert settings[1].at_tokens("eval/loss_1", 30) == pytest.approx([2.0, 2.1])


def test_baseline_flag_picks_one_setting_or_fails(synthetic):
    sweep_dir, out_dir = synthetic
    assert report.report(sweep_dir, out_dir, baseline="mtp_n_tokens=3")["target_loss"] == pytest.approx(2.45)
    summary_table = (out_dir / "results.md").read_text().split("## Summary")[1]
    assert summary_table.split("| `")[1].startswith("mtp_n_tokens=3` |")  # the baseline's row comes first
    assert report.report(sweep_dir, out_dir, baseline="mtp_n_tokens=2,use_mtp=True")["baseline"] == "mtp_n_tokens=2"
    with pytest.raises(UserError, match="matches 0 settings"):
        report.report(sweep_dir, out_dir, baseline="mtp_n_tokens=5")
    with pytest.raises(UserError, match="matches 0 settings"):
        report.report(sweep_dir, out_dir, baseline="mtp_n_tokens=2,use_mtp=False")


def test_a_target_reached_by_the_first_evaluation_is_reported_as_a_bound(synthetic):
    sweep_dir, out_dir = synthetic
    summary = report.report(sweep_dir, out_dir, baseline="mtp_n_tokens=3")  # target 2.45
    runs = {r["run"]: r for r in summary["runs"]}
    # n=2 seed 1 is at 2.3 at its first evaluation (20 tokens): crossed at 20 or before.
    assert runs["mtp_n_tokens=2,seed=1"]["target_before_first_eval"]
    assert runs["mtp_n_tokens=2,seed=1"]["tokens_to_target"] == 20.0
    assert not runs["mtp_n_tokens=2,seed=0"]["target_before_first_eval"]  # 2.5 -> 1.5: crossed at 21
    table = (out_dir / "results.md").read_text().split("## Summary")[1].split("## ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| `mtp_n_tokens=2`"))
    assert "| ≤ 20.50 ± 0.71 | ≥ 1.95× | ≤ " in row  # 40 tokens / 20.5
    row = next(line for line in table.splitlines() if line.startswith("| `mtp_n_tokens=1`"))
    assert "| 33.00 ± 2.83 | 1.21× |" in row  # crossed at 31 and 35: estimates, no bound


def test_plots_are_written_as_png(synthetic):
    sweep_dir, out_dir = synthetic
    report.report(sweep_dir, out_dir)
    for name in ("loss_vs_tokens.png", "per_head_loss.png", "loss_vs_time.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024, name


def test_differences_carry_standard_errors_and_a_two_se_verdict(synthetic):
    sweep_dir, out_dir = synthetic
    comparisons = {(c["setting"], c["metric"]): c for c in report.report(sweep_dir, out_dir)["comparisons"]}
    # n=2: finals 1.5, 1.9 against 2.0, 2.2: -0.4 ± sqrt(0.08/2 + 0.02/2) = 0.2236, inside 2 s.e.
    c = comparisons[("mtp_n_tokens=2", "eval/loss_1")]
    assert c["difference"] == pytest.approx(-0.4) and c["standard_error"] == pytest.approx(0.05**0.5)
    assert c["verdict"] == "no difference (< 2 s.e.)"
    # n=3: 2.5, 2.4: +0.35 ± sqrt(0.005/2 + 0.02/2) = 0.1118, beyond 2 s.e., and a loss: worse.
    c = comparisons[("mtp_n_tokens=3", "eval/loss_1")]
    assert c["difference"] == pytest.approx(0.35) and c["standard_error"] == pytest.approx(0.0125**0.5)
    assert c["verdict"] == "MTP worse"
    assert ("mtp_n_tokens=2", "eval/induction_accuracy") not in comparisons  # never logged
    # Unpaired (the runs logged no training-set size, so their batches cannot be checked): in bold.
    assert c["paired"] is None and c["pairing"].startswith("unpaired: the batches cannot be recomputed")
    assert "| **+0.3500 ± 0.1118** | — |" in (out_dir / "results.md").read_text()
    assert stats.verdict(0.3, 0.1, higher_is_better=True) == "MTP better"
    assert stats.verdict(0.3, None, higher_is_better=True) == "one seed: no verdict"
    # Against an MTP baseline (n=2 here) n=3's +0.75 ± 0.2062 is the setting's, not MTP's, verdict.
    against_n2 = report.report(sweep_dir, out_dir, baseline="mtp_n_tokens=2")["comparisons"]
    c = next(c for c in against_n2 if c["setting"] == "mtp_n_tokens=3" and c["metric"] == "eval/loss_1")
    assert c["difference"] == pytest.approx(0.75) and c["standard_error"] == pytest.approx(0.0425**0.5)
    assert c["verdict"] == "setting worse"


def test_accuracy_per_difficulty_and_the_turning_point_of_the_loss(tmp_path):
    sweep_dir = tmp_path / "runs" / "tasks"
    for n, teacherless in ((1, False), (2, False), (1, True)):
        for seed in (0, 1):
            accuracy = {
                f"eval/task_accuracy_m{m}": 0.1 * n + 0.01 * m + 0.02 * seed + 0.3 * teacherless for m in (1, 2, 10)
            }
            # The baseline's loss turns up: lowest at step 2, as an overfitting run's does. A training
            # set of 4 tokens at 2 x 5 tokens a step: step 2 is epoch 5, step 4 epoch 10.
            write_run(
                sweep_dir,
                n,
                seed,
                (1.0, 1.2) if n == 1 else (2.0, 1.5),
                final={**accuracy, "eval/task_accuracy": 0.5 * n},
                teacherless=teacherless,
                train_tokens=4,
            )
    out_dir = tmp_path / "results"
    mtp_setting = "mtp_n_tokens=2,data.task.teacherless=False"
    summary = report.report(sweep_dir, out_dir, baseline="mtp_n_tokens=1,data.task.teacherless=False")
    md = (out_dir / "results.md").read_text()
    table = md.split("## Task accuracy per difficulty")[1].split("## ")[0]
    assert "| setting | m1 | m2 | m10 | all |" in table  # difficulties in numeric order
    assert (
        "| `mtp_n_tokens=2,data.task.teacherless=False` | 0.220 ± 0.014 | 0.230 ± 0.014 | 0.310 ± 0.014 | 1.000 ± 0.000 |"
        in table
    )
    turn = md.split("## Where the validation loss turns up")[1].split("## ")[0]
    assert (
        "| `mtp_n_tokens=1,data.task.teacherless=False` | 1.0000 ± 0.0000 | 2 ± 0 | 5.0 ± 0.0 | 1.2000 ± 0.0000 |"
        in turn
    )
    lowest = {c["setting"]: c for c in summary["comparisons"] if c["metric"] == "min_eval/loss_1"}
    assert lowest[mtp_setting]["difference"] == pytest.approx(0.5)
    # MTP's lowest loss comes 5 epochs later (the last evaluation): it overfits later, "better".
    turn_up = {c["setting"]: c for c in summary["comparisons"] if c["metric"] == "min_eval/loss_1_epoch"}
    assert turn_up[mtp_setting]["difference"] == pytest.approx(5.0) and turn_up[mtp_setting]["verdict"] == "MTP better"
    accuracy = {c["setting"]: c for c in summary["comparisons"] if c["metric"] == "eval/task_accuracy"}
    assert accuracy[mtp_setting]["verdict"] == "MTP better"  # 1.0 vs 0.5 with no spread at all
    # Per difficulty, with its standard error: m10 0.30, 0.32 against 0.20, 0.22.
    hardest = {c["setting"]: c for c in summary["comparisons"] if c["metric"] == "eval/task_accuracy_m10"}
    assert hardest[mtp_setting]["difference"] == pytest.approx(0.1)
    assert hardest[mtp_setting]["standard_error"] == pytest.approx(0.0002**0.5)
    # Teacherless predicts one token too: its +0.3 is the setting's verdict, not MTP's.
    assert hardest["mtp_n_tokens=1,data.task.teacherless=True"]["verdict"] == "setting better"
    assert stats.verdict(0.0, 0.0, higher_is_better=True) == "equal"  # e.g. every run at accuracy 0


def test_paired_difference_power_and_seeds_match_a_hand_computation():
    # Per-seed differences -0.02, -0.03, -0.01: mean -0.02, s.d. 0.01, s.e. 0.01 / √3.
    d = stats.paired({0: 1.28, 1: 1.27, 2: 1.29, 9: 5.0}, {0: 1.30, 1: 1.30, 2: 1.30})
    assert d.paired and d.seeds == 3  # seed 9 has no partner
    assert d.difference == pytest.approx(-0.02) and d.standard_error == pytest.approx(0.01 / 3**0.5)
    # Power: Φ(0.02 / (0.01/√3) - 2) = Φ(1.4641) = 0.9284; 80 %: (2.8416 · 0.01 / 0.02)² = 2.02 → 3 pairs.
    assert d.power == pytest.approx(0.92842, abs=1e-4) and d.seeds_for_power == 3
    # Unpaired, the same numbers: s.d.s 0.01 and 0 → s.e. √(0.0001/3), spread 0.01.
    u = stats.unpaired([1.28, 1.27, 1.29], [1.30, 1.30, 1.30])
    assert u.standard_error == pytest.approx((0.0001 / 3) ** 0.5) and u.spread == pytest.approx(0.01)
    # Spread 0.03 at a difference of 0.01: (2.8416 · 3)² = 72.67 → 73 seeds a side.
    assert stats.Difference(0.01, 0.01, 0.03, 9, paired=False).seeds_for_power == 73


def paired_sweep(sweep_dir: pathlib.Path, num_epochs: int, seeds=(0, 1, 2)) -> None:
    """Baseline and n = 3 at the same seeds, where each seed's MTP run is 0.1 better than its
    baseline while the seeds' levels spread by 1.0 — pairing sees the 0.1, the unpaired test not."""
    for seed in seeds:
        for n in (1, 3):
            level = 3.0 + seed - 0.1 * (n == 3) + 0.01 * seed * seed * (n == 3)
            # An epochs run's last step is num_epochs × 4 / num_epochs steps per epoch: the same 4.
            per_epoch = 4 // num_epochs if num_epochs else None
            write_run(
                sweep_dir,
                n,
                seed,
                (level + 1, level),
                train_tokens=10_000,
                num_epochs=num_epochs,
                steps_per_epoch=per_epoch,
            )
            path = sweep_dir / f"mtp_n_tokens={n},seed={seed}" / "config.json"
            config = json.loads(path.read_text())
            config.update(data={"source": "stdlib/email", "task": {"teacherless": False}})
            path.write_text(json.dumps(config))


def test_seeds_pair_only_where_the_runs_read_the_same_batches(tmp_path):
    # Random windows: n = 1 and n = 3 draw their starts from ranges two tokens apart, so each
    # seed's two runs read the same text (starts within the 2-token lookahead difference).
    paired_sweep(tmp_path / "runs" / "random", num_epochs=0)
    c = next(
        c
        for c in report.report(tmp_path / "runs" / "random", tmp_path / "out" / "random")["comparisons"]
        if c["metric"] == "eval/loss_1"
    )
    assert c["pairing"].startswith("paired by seed")
    # Differences -0.1, -0.09, -0.06: mean -0.0833, s.d. 0.0208; the unpaired s.e. sees the seeds' spread.
    assert c["paired"]["difference"] == pytest.approx(-0.25 / 3)
    assert c["paired"]["standard_error"] == pytest.approx(np.std([-0.1, -0.09, -0.06], ddof=1) / 3**0.5)
    assert c["difference"] == c["paired"]["difference"] and c["verdict"] == "MTP better"
    assert c["unpaired"]["standard_error"] > 0.8 and c["unpaired"]["power"] < 0.1
    # Epochs: each run permutes its own number of windows (seq_len + n tokens long), so the same
    # seed reads other batches: pairing is refused and the verdict is the unpaired one.
    paired_sweep(tmp_path / "runs" / "epochs", num_epochs=2)
    c = next(
        c
        for c in report.report(tmp_path / "runs" / "epochs", tmp_path / "out" / "epochs")["comparisons"]
        if c["metric"] == "eval/loss_1"
    )
    assert c["paired"] is None and c["pairing"].startswith("unpaired: same seeds but different batches")
    assert c["verdict"] == "no difference (< 2 s.e.)"


def reported_sweep(tmp_path, name: str, seeds, extra: str = "") -> None:
    paired_sweep(tmp_path / "runs" / name, num_epochs=0, seeds=seeds)
    (tmp_path / "runs" / name / "SWEEP").write_text(
        f"python experiments/sweep.py --config=configs/mtp3.py:micro --name={name} --sweep seed="
        f"{','.join(map(str, seeds))} --sweep mtp_n_tokens=1,3 --set num_train_steps=4{extra}\n"
    )
    report.report(tmp_path / "runs" / name, tmp_path / "results" / name, report_argv=[name])


def test_pooled_comparison_is_the_comparison_over_all_seeds_of_the_sets(tmp_path):
    reported_sweep(tmp_path, "first", (0, 1, 2))
    reported_sweep(tmp_path, "second", (5, 6), extra=" --parallel 2")  # how it ran does not matter
    out = pool.main(tmp_path / "results", ["first", "second"], "both")
    pooled = json.loads((out / "runs.json").read_text())
    c = next(c for c in pooled["comparisons"] if c["metric"] == "eval/loss_1")
    diffs = [-0.1 + 0.01 * s * s for s in (0, 1, 2, 5, 6)]
    assert c["paired"]["seeds"] == 5 and c["paired"]["difference"] == pytest.approx(np.mean(diffs))
    assert c["standard_error"] == pytest.approx(np.std(diffs, ddof=1) / 5**0.5)
    assert [s["seeds"] for s in c["sets"]] == [[0, 1, 2], [5, 6]] and len(pooled["runs"]) == 10
    assert "| **pooled** (paired) | 5 a side |" in (out / "pooled.md").read_text()


@pytest.mark.parametrize(
    "second, extra, message",
    [
        ((3, 4), " --set learning_rate=0.1", "ran different commands .* --set=learning_rate=0.1"),
        ((2, 3), "", "both ran seed 2"),
    ],
)
def test_pool_refuses_other_commands_and_shared_seeds(tmp_path, second, extra, message):
    reported_sweep(tmp_path, "first", (0, 1, 2))
    reported_sweep(tmp_path, "second", second, extra=extra)
    with pytest.raises(UserError, match=message):
        pool.main(tmp_path / "results", ["first", "second"], "both")


def test_verdicts_table_takes_the_best_mtp_setting_and_says_what_was_not_run(synthetic):
    sweep_dir, out_dir = synthetic
    report.report(sweep_dir, out_dir)
    rows = (
        ("synthetic", "eval/loss_1", "loss"),
        ("synthetic", "eval/parse_rate", "parse rate"),
        ("missing", "eval/loss_1", "never run"),
        ("synthetic", "eval/loss_1", "n = 3 only", "n_tokens=3"),
    )
    lines = verdicts.table(out_dir.parent, rows).splitlines()
    # Lowest loss of n=2 (1.7) and n=3 (2.45) is n=2's: -0.4 ± 0.2236 against the baseline's 2.1;
    # power Φ(0.4 / 0.2236 - 2) = Φ(-0.211) = 42 %.
    assert lines[2] == (
        "| loss ([synthetic](experiments/results/synthetic/results.md)) | `mtp_n_tokens=1`: 2.1000 | "
        "`mtp_n_tokens=2`: 1.7000 | -0.4000 ± 0.2236 | 2 | 42% | no difference (< 2 s.e.) |"
    )
    assert "| not logged |" in lines[3] and lines[4] == "| never run (missing) | not run | | | | | |"
    # n=3's +0.35 ± 0.1118 is beyond 2 s.e. but with Φ(3.13 - 2) = 87 % power: not underpowered.
    assert "| `mtp_n_tokens=3`: 2.4500 | +0.3500 ± 0.1118 | 2 | 87% | MTP worse (one set of seeds) |" in lines[5]


def test_verdicts_table_marks_underpowered_and_unreplicated_verdicts_and_names_pooled_sets(tmp_path):
    reported_sweep(tmp_path, "first", (0, 1, 2))
    reported_sweep(tmp_path, "second", (5, 6))
    pool.main(tmp_path / "results", ["first", "second"], "both")
    rows = (("first", "eval/loss_1", "one set"), ("both", "eval/loss_1", "pooled"))
    one_set, pooled = verdicts.table(tmp_path / "results", rows).splitlines()[2:]
    # Paired -0.0833 ± 0.0120 (3 pairs): power Φ(6.93 - 2) ≈ 100 %.
    assert "| -0.0833 ± 0.0120, paired | 3 | 100% | MTP better (one set of seeds) |" in one_set
    assert "[both](experiments/results/both/pooled.md)" in pooled and "| 5 in 2 sets |" in pooled
    assert "one set of seeds" not in pooled
    # A verdict just past 2 s.e. has barely more than 50 % power: marked.
    weak = {
        "name": "weak",
        "baseline": "b",
        "pooled_from": None,
        "runs": [{"seed": 0}, {"seed": 1}],
        "comparisons": [
            {
                "setting": "s",
                "metric": "m",
                "higher_is_better": False,
                "baseline": 1.0,
                "value": 0.9,
                "difference": -0.1,
                "standard_error": 0.045,
                "verdict": "MTP better",
            }
        ],
    }
    (tmp_path / "results" / "weak").mkdir()
    (tmp_path / "results" / "weak" / "runs.json").write_text(json.dumps(weak))
    (line,) = verdicts.table(tmp_path / "results", (("weak", "m", "weak"),)).splitlines()[2:]
    assert line.endswith("| 2 | 59% | MTP better (underpowered; one set of seeds) |")  # Φ(2.222 - 2) = 0.588
