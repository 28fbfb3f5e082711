"""Run a grid of config overrides, one `python -m mtp_jax.main` per point, resumably.

    python experiments/sweep.py --config=configs/mtp3.py:nano --name=n_tokens \\
        --sweep mtp_n_tokens=1,2,3,4 --sweep seed=0,1,2 [--set num_train_steps=120 …] \\
        [--parallel K] [--dry_run] [--runs_dir=DIR] [--launcher='./launch.sh tpu NAME ZONE']

The grid is the Cartesian product of the --sweep axes (values split on commas); --set fields are
the same for every run. Run `k1=v1,k2=v2` trains in RUNS_DIR/NAME/k1=v1,k2=v2/ and logs to run.log
there. Calling the same command again skips the finished runs (their evaluation at the last step
is logged) and resumes the others from their checkpoints, so an interrupted sweep is continued by
rerunning it. A run's last step is num_train_steps or, when num_epochs > 0, num_epochs times the
steps per epoch that its training logged at step 0 (the data decide them; a run that has not
logged them is not finished).
Ctrl-C or SIGTERM is passed on to the running trainings, which save a checkpoint and stop.
RUNS_DIR/NAME/SWEEP keeps every sweep command (with the git commit) and COMMANDS every training
command, for experiments/report.py to copy beside the results.

--launcher replaces `python -m mtp_jax.main` in front of each run's flags: './launch.sh local 2' runs
every training as two processes here; './launch.sh tpu NAME ZONE' runs it on every worker of a TPU
VM, where the workdir is on worker 0's disk (under ~/mtp_jax): give --runs_dir a filesystem this
machine shares, or copy the runs back before report.py and before rerunning to resume.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
import urllib.parse

from mtp_jax.cli import fail
from mtp_jax.errors import UserError
from mtp_jax.machine import cpu_model
from mtp_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise UserError(f"{flag} {text!r} must look like KEY=VALUE, e.g. {flag} mtp_n_tokens=2")
    return key, value


def load_config(config_arg: str):
    """The config named by `file.py[:preset]`, as main would load it (before overrides)."""
    path, _, preset = config_arg.partition(":")
    if not pathlib.Path(path).is_file():
        raise UserError(f"--config={config_arg}: no file {path!r}; e.g. --config=configs/mtp3.py:nano")
    get_config = runpy.run_path(path)["get_config"]
    try:
        return get_config(preset) if preset else get_config()
    except ValueError as e:
        raise UserError(f"--config={config_arg}: {e}") from None


def config_value(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise UserError(f"unknown config field {key!r}: the fields are listed in configs/base.py")
        node = node[part]
    return node


def expand_grid(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the last axis varying fastest."""
    keys = [key for key, _ in axes]
    return [dict(zip(keys, values)) for values in itertools.product(*(values for _, values in axes))]


def run_name(point: dict[str, str]) -> str:
    """`k1=v1,k2=v2`, with anything a directory name cannot hold (a '/' in a path) escaped."""
    return ",".join(f"{k}={urllib.parse.quote(v, safe='=.:-_+')}" for k, v in point.items())


def main_command(launcher: list[str], config_arg: str, workdir: str, overrides: dict[str, str]) -> list[str]:
    return [
        *launcher,
        f"--config={config_arg}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]


def last_logged(events: list[dict], key: str):
    """The newest value of a once-logged metric (a resumed run may log it again), else None."""
    return next((e[key] for e in reversed(events) if key in e), None)


def total_steps(events: list[dict], num_train_steps: int, num_epochs: int) -> int | None:
    """A run's last step: num_train_steps, or num_epochs × the steps per epoch that the trainer
    logged at step 0 (None before the run got there: only the data say how many there are)."""
    if num_epochs == 0:
        return num_train_steps
    per_epoch = last_logged(events, "data/steps_per_epoch")
    return None if per_epoch is None else num_epochs * per_epoch


def finished(workdir: pathlib.Path, num_train_steps: int, num_epochs: int) -> bool:
    """Whether the run logged its final evaluation (which main writes only after the last step)."""
    events = read_metrics(workdir)
    total = total_steps(events, num_train_steps, num_epochs)
    return total is not None and any(e.get("step") == total and "eval/loss_1" in e for e in events)


def default_launcher() -> list[str]:
    # Plain `python` when that is this interpreter, so that the recorded commands read as typed.
    python = shutil.which("python")
    same = python is not None and os.path.realpath(python) == os.path.realpath(sys.executable)
    return ["python" if same else sys.executable, "-m", "mtp_jax.main"]


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def host() -> str:
    """This machine's CPU model and core count: every timing in a sweep's results depends on them."""
    return f"{cpu_model()}, {os.cpu_count()} cores"


def append_new_lines(path: pathlib.Path, lines: list[str]) -> None:
    """Add the lines `path` does not hold yet, so that rerunning a sweep records nothing twice."""
    old = path.read_text().splitlines() if path.exists() else []
    new = [line for line in lines if line not in old]
    if new:
        with path.open("a") as f:
            f.write("".join(line + "\n" for line in new))


def last_line(path: pathlib.Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


class Planned(typing.NamedTuple):
    """One training of the grid."""

    name: str  # k1=v1,k2=v2: its folder under RUNS_DIR/NAME
    command: list[str]
    workdir: pathlib.Path
    steps: int  # num_train_steps
    epochs: int  # num_epochs: when > 0 the run's length in epochs of its data, and steps is ignored

    def finished(self) -> bool:
        return finished(self.workdir, self.steps, self.epochs)


class Running(typing.NamedTuple):
    label: str  # [i/N] name, as printed
    planned: Planned
    log: typing.TextIO
    started: float  # time.monotonic()


class Runner:
    """At most `parallel` trainings at a time; signals to this process are passed on to them.

    Each training gets its own session, so a Ctrl-C in the terminal reaches only this process,
    which sends it on exactly once (a second SIGINT would kill a training before it saves)."""

    def __init__(self, parallel: int):
        self.parallel = parallel
        self.running: dict[subprocess.Popen, Running] = {}
        self.signal: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._forward)

    def _forward(self, signum, frame) -> None:
        self.signal = signum
        for proc in self.running:
            proc.send_signal(signal.SIGTERM)

    def run_all(self, jobs: list[tuple[str, Planned]]) -> int:
        """Run (label, planned run) jobs; print a line as each starts and ends; return how many did
        not finish."""
        failures, queue = 0, list(jobs)
        while queue or self.running:
            while queue and len(self.running) < self.parallel and self.signal is None:
                self.start(*queue.pop(0))
            if self.signal is not None:
                queue = []
            for proc in [p for p in self.running if p.poll() is not None]:
                run = self.running.pop(proc)
                run.log.close()
                workdir = run.planned.workdir
                if proc.returncode == 0 and run.planned.finished():
                    print(f"{run.label} done in {time.monotonic() - run.started:.0f} s", flush=True)
                    continue
                failures += 1
                if proc.returncode == 0:  # a training that was asked to stop saves and exits 0
                    total = total_steps(read_metrics(workdir), run.planned.steps, run.planned.epochs)
                    end = f"step {total}" if total is not None else "its last step"
                    print(f"{run.label} stopped before {end}: rerun the sweep to resume it", flush=True)
                else:
                    print(f"{run.label} FAILED (exit {proc.returncode}): {last_line(workdir / 'run.log')}", flush=True)
            time.sleep(0.1)
        return failures

    def start(self, label: str, planned: Planned) -> None:
        workdir = planned.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        resuming = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
        log = (workdir / "run.log").open("a")
        log.write(f"--- sweep.py {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(planned.command)}\n")
        log.flush()
        proc = subprocess.Popen(
            planned.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        self.running[proc] = Running(label, planned, log, time.monotonic())
        print(f"{label} {'resuming' if resuming else 'started'} (log: {workdir / 'run.log'})", flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file and preset, e.g. configs/mtp3.py:nano")
    parser.add_argument("--name", required=True, help="sweep name: runs go to RUNS_DIR/NAME/")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,…",
        help="a config field and its values (repeatable; the grid is their product)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run (repeatable)"
    )
    parser.add_argument("--parallel", type=int, default=1, help="trainings at a time (default 1)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--runs_dir",
        default=os.path.relpath(ROOT / "experiments" / "runs"),
        help="where sweeps keep their runs (default: experiments/runs)",
    )
    parser.add_argument(
        "--launcher",
        default=None,
        help="command that takes main's flags, e.g. './launch.sh local 2' (default: this Python's -m mtp_jax.main)",
    )
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[Planned]:
    """Every point of the grid, in grid order."""
    if args.parallel < 1:
        raise UserError(f"--parallel={args.parallel} must be >= 1")
    if not args.name or "/" in args.name or args.name.startswith("."):
        raise UserError(f"--name={args.name!r} must be a plain directory name, e.g. --name=n_tokens")
    fixed = dict(parse_assignment(text, "--set") for text in args.set)
    axes = [(key, value.split(",")) for key, value in (parse_assignment(t, "--sweep") for t in args.sweep)]
    swept = [key for key, _ in axes]
    for key in set(swept):
        if swept.count(key) > 1 or key in fixed:
            raise UserError(f"{key} is given more than once in --sweep/--set: give each field once")
    for key, values in axes:
        if "" in values:
            raise UserError(f"--sweep {key}={','.join(values)} has an empty value: list values like 1,2,3")
    config = load_config(args.config)
    for key in [*fixed, *swept]:
        config_value(config, key)

    def count(point: dict[str, str], key: str, unit: str) -> int:
        value = str(point.get(key, fixed.get(key, config[key])))
        if not value.isdigit():
            raise UserError(f"{key}={value!r} must be a whole number of {unit}")
        return int(value)

    launcher = shlex.split(args.launcher) if args.launcher else default_launcher()
    runs = []
    for point in expand_grid(axes):
        name = run_name(point)
        workdir = pathlib.Path(args.runs_dir) / args.name / name
        command = main_command(launcher, args.config, str(workdir), {**fixed, **point})
        steps, epochs = count(point, "num_train_steps", "steps"), count(point, "num_epochs", "epochs")
        runs.append(Planned(name, command, workdir, steps, epochs))
    return runs


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    runs = plan(args)
    commands = [shlex.join(run.command) for run in runs]
    if args.dry_run:
        print("\n".join(commands))
        return 0
    sweep_dir = pathlib.Path(args.runs_dir) / args.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    append_new_lines(
        sweep_dir / "SWEEP",
        [f"# at commit {git_commit()} on {host()}", shlex.join(["python", "experiments/sweep.py", *argv])],
    )
    append_new_lines(sweep_dir / "COMMANDS", commands)

    jobs = []
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.name}"
        if run.finished():
            print(f"{label} skipped (finished)", flush=True)
        else:
            jobs.append((label, run))
    runner = Runner(args.parallel)
    failures = runner.run_all(jobs)
    if runner.signal is not None:
        print(f"interrupted by {signal.Signals(runner.signal).name}: rerun the same command to continue", flush=True)
        return 128 + runner.signal
    if failures:
        print(f"{failures} of {len(runs)} runs did not finish; see run.log in their workdirs", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        fail(str(e))
