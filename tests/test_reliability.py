"""Never lose a run: real `python -m mtp_jax.main` processes on the tiny preset, interrupted by real
signals (SIGTERM, SIGINT, SIGKILL), with damaged checkpoints, an exploding learning rate and a
file-size limit standing in for a full disk. Each resumed run must log the same losses, step for
step, as one that was never interrupted.

The subprocesses share the session's persistent JAX compilation cache (conftest.py), so only the
first one compiles.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.util import default_sigint

# A failed orbax read of a damaged checkpoint leaves coroutines behind that Python reports
# (as unraisable exceptions) whenever it collects them, often during a later test.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 12, 4


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """100 stdlib files (~2 MB): building the data cache takes long enough to be killed midway."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(sorted(root.glob("*.py"))[:100]):
        shutil.copy(path, out / f"{i:03d}.py")
    return out


@pytest.fixture(scope="session")
def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def command(workdir, corpus, data_cache, *overrides):
    return [
        sys.executable,
        "-m",
        "mtp_jax.main",
        "--config=configs/mtp3.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.source={corpus}",
        f"--config.data.cache_dir={data_cache}",
        f"--config.num_train_steps={STEPS}",
        f"--config.checkpoint_every={CHECKPOINT_EVERY}",
        "--config.log_every=1",
        "--config.eval_every=100",
        "--config.eval_batches=1",
        "--config.sample_tokens=0",
        *overrides,
    ]


def start(cmd, env, log_path, **kwargs):
    log = open(log_path, "w")
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=default_sigint, **kwargs
    )


def run(cmd, env, **kwargs):
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def wait_until(predicate, process, timeout=120.0, poll=0.002):
    """Polls until predicate() is true; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before the moment to interrupt it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to interrupt the run"
        time.sleep(poll)


def logged_steps(workdir):
    """Steps of the train events in metrics.jsonl (every line must parse: no torn lines)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if "train/loss_1" in e]


def losses(workdir):
    """{step: (loss_1, total_loss)} of a run; fails on a duplicated step or a torn line."""
    events = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "train/loss_1" in e]
    steps = [e["step"] for e in train]
    assert steps == sorted(set(steps)), f"duplicated or out-of-order steps in metrics.jsonl: {steps}"
    assert [e["step"] for e in events if "model/param_count" in e] == [0]
    return {e["step"]: (e["train/loss_1"], e["train/total_loss"]) for e in train}


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def tree_digest(directory):
    """sha256 of every file under `directory`, by relative path: to prove nothing changed."""
    directory = pathlib.Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def reference(tmp_path_factory, corpus, data_cache, env):
    """An uninterrupted run: the losses every interrupted run must reproduce."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = run(command(workdir, corpus, data_cache), env)
    assert result.returncode == 0, result.stderr
    ref = losses(workdir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert checkpoint_steps(workdir) == [4, 8, 12]
    return workdir, ref


def test_sigterm_and_sigint_save_a_checkpoint_exit_0_and_resume_exactly(tmp_path, corpus, data_cache, env, reference):
    workdir = tmp_path / "run"
    cmd = command(workdir, corpus, data_cache)
    stopped_at = []
    for sig, after in ((signal.SIGTERM, 2), (signal.SIGINT, 7)):
        process = start(cmd, env, tmp_path / f"{sig.name}.log")
        wait_until(lambda: len(logged_steps(workdir)) >= after, process)  # noqa: B023
        sent = time.monotonic()
        process.send_signal(sig)
        assert process.wait(timeout=60) == 0
        took = time.monotonic() - sent
        lines = (tmp_path / f"{sig.name}.log").read_text().splitlines()
        stop_line = next(line for line in lines if line.startswith(f"stopped by {sig.name} after step "))
        step = int(stop_line.split("after step ")[1].split(":")[0])
        assert step in checkpoint_steps(workdir), "the stop did not leave a checkpoint at its step"
        assert logged_steps(workdir)[-1] == step and "== summary" not in "\n".join(lines)
        assert took < 30, f"{sig.name} took {took:.1f} s to stop"
        stopped_at.append(step)
    assert stopped_at[0] < stopped_at[1] < STEPS  # the second run resumed rather than starting over
    # Running to the end after a stop is the kill -9 test's job; here the steps so far must match.
    assert losses(workdir) == {s: v for s, v in reference[1].items() if s <= stopped_at[1]}


def test_kill9_anywhere_resumes_from_newest_complete_checkpoint_exactly(tmp_path, corpus, env, reference):
    """One workdir killed four times: while building the data cache, mid-step, while an async
    checkpoint is being written, and at a seeded random moment; then run to the end."""
    workdir, data_cache = tmp_path / "run", tmp_path / "data_cache"
    cmd = command(workdir, corpus, data_cache)
    launched = []

    def kill_when(predicate, name, delay=0.0):
        process = start(cmd, env, tmp_path / f"{name}.log")
        launched.append(time.time())
        wait_until(predicate, process)
        time.sleep(delay)
        process.kill()
        process.wait()

    # 1. During the data-cache build: a half-written temporary directory is left behind.
    kill_when(lambda: any(data_cache.glob(".tmp-*/train.bin")), "cache")
    half_built = [p for p in data_cache.iterdir()]
    assert half_built and all(p.name.startswith(".tmp-") and not (p / "meta.json").exists() for p in half_built)

    # 2. Mid-step, after step 6 was logged (the save of step 4 may still be in flight).
    kill_when(lambda: 6 in logged_steps(workdir), "step")
    built = list(data_cache.iterdir())
    assert len(built) == 1 and not built[0].name.startswith(".tmp-"), "the half-built cache was not replaced"

    # 3. While the async save of a checkpoint is in flight: orbax's temporary directory remains.
    def in_flight():  # made by this run: an earlier kill may have left one behind
        return any("tmp" in p.name and p.stat().st_ctime > launched[-1] for p in (workdir / "checkpoints").iterdir())

    kill_when(in_flight, "save")
    assert in_flight(), "the kill did not land during a checkpoint write"

    # 4. At a random moment of training (seeded, so a failure can be replayed).
    delay = np.random.default_rng(7).uniform(0.0, 0.3)
    resumed_from = (checkpoint_steps(workdir) or [0])[-1]
    kill_when(lambda: any(s > resumed_from for s in logged_steps(workdir)), "random", delay)

    result = run(cmd, env)
    assert result.returncode == 0, result.stderr
    assert losses(workdir) == reference[1]
    assert not any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def abstract_state(reference):
    """The train state's shapes on this process's 8 fake devices (the run saved from 1)."""
    import ml_collections

    from mtp_jax import sharding, train_step

    config = ml_collections.ConfigDict(json.loads((reference[0] / "config.json").read_text()))
    mesh = sharding.make_mesh(config.mesh, jax.devices())
    return train_step.make_train_step(config, config.vocab_size, mesh, STEPS).abstract_state


def _truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def _scribble(path):  # same size, different bytes in the middle: orbax reads it back without error
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


DAMAGE = {
    "largest file truncated": lambda files: _truncate(files[0]),
    "largest file deleted": lambda files: files[0].unlink(),
    "bytes changed inside the data": lambda files: _scribble(files[0]),
    "every file garbage": lambda files: [f.write_bytes(os.urandom(f.stat().st_size)) for f in files],
    "metadata deleted": lambda files: [f.unlink() for f in files if f.name.startswith("_")],
}


def damage(step_dir, how):
    files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    DAMAGE[how](files)


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_previous_one_restored(
    how, tmp_path, reference, abstract_state, capsys
):
    from mtp_jax.checkpoint import Checkpointer

    directory = tmp_path / "checkpoints"
    shutil.copytree(reference[0] / "checkpoints", directory)
    intact = Checkpointer(reference[0] / "checkpoints", 3)
    expected = intact.restore(8, abstract_state)
    intact.close()
    damage(directory / "12", how)
    before = tree_digest(directory / "12")

    checkpointer = Checkpointer(directory, 3)
    step, state = checkpointer.restore_newest_good(abstract_state)
    checkpointer.close()

    assert step == 8
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state)))
    report = [line for line in capsys.readouterr().err.splitlines() if "is unusable" in line]
    assert len(report) == 1 and "checkpoints/12" in report[0]
    assert tree_digest(tmp_path / "unusable_checkpoints" / "12") == before  # kept as it was, not deleted
    assert checkpoint_steps(tmp_path) == [4, 8]


def test_no_usable_checkpoint_is_an_error_and_never_a_fresh_start(tmp_path, reference, abstract_state):
    from mtp_jax.checkpoint import Checkpointer
    from mtp_jax.errors import UserError

    directory = tmp_path / "checkpoints"
    shutil.copytree(reference[0] / "checkpoints", directory)
    for step in (4, 8, 12):
        damage(directory / str(step), "largest file truncated")
    for _attempt in range(2):  # the second attempt finds no checkpoints at all, only the set-aside ones
        checkpointer = Checkpointer(directory, 3)
        with pytest.raises(UserError, match="no usable checkpoint .* use a new --workdir"):
            checkpointer.restore_newest_good(abstract_state)
        checkpointer.close()
    assert sorted(p.name for p in (tmp_path / "unusable_checkpoints").iterdir()) == ["12", "4", "8"]


def test_main_resumes_past_a_damaged_checkpoint_reporting_one_line(tmp_path, corpus, data_cache, env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    damage(workdir / "checkpoints" / "12", "bytes changed inside the data")
    (workdir / "metrics.jsonl").write_text(  # as if killed after logging step 12: a torn last line
        (reference[0] / "metrics.jsonl").read_text().rsplit("\n", 2)[0] + '\n{"step": 12, "train/lo'
    )

    result = run(command(workdir, corpus, data_cache), env)

    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stderr.splitlines() if "is unusable" in line]) == 1
    assert "resumed from" in result.stderr and "at step 8" in result.stderr
    assert losses(workdir) == reference[1]
    assert checkpoint_steps(workdir) == [4, 8, 12]


def test_nan_policy_stop_names_the_step_and_the_last_good_checkpoint(tmp_path, corpus, data_cache, env):
    workdir = tmp_path / "run"
    # A learning rate of 1e30 overflows the parameters' products within a few steps.
    result = run(
        command(workdir, corpus, data_cache, "--config.learning_rate=1e30", "--config.checkpoint_every=2"), env
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    first_bad = int(error.split("non-finite at step ")[1].split(";")[0])
    good = checkpoint_steps(workdir)
    assert good and good[-1] < first_bad
    assert f"the last good checkpoint is step {good[-1]}" in error
    _assert_checkpoints_finite(workdir)


def test_nan_policy_skip_counts_skipped_steps_and_keeps_checkpoints_finite(tmp_path, corpus, data_cache, env):
    workdir = tmp_path / "run"
    result = run(command(workdir, corpus, data_cache, "--config.learning_rate=1e30", "--config.nan_policy=skip"), env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "train/nonfinite_steps" in e]
    skipped = [e["train/nonfinite_steps"] for e in train]
    nonfinite = sum(e["train/total_loss"] is None or e["train/grad_norm"] is None for e in train)
    assert skipped == sorted(skipped) and skipped[-1] == nonfinite > 0
    assert checkpoint_steps(workdir) == [4, 8, 12]
    _assert_checkpoints_finite(workdir)


def _assert_checkpoints_finite(workdir):
    """Reads every saved array back with orbax directly (not through our Checkpointer's checks)."""
    for step in checkpoint_steps(workdir):
        state = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f"), f"checkpoint {step} holds NaN/inf"


def test_unwritable_workdir_fails_at_start_with_one_line(tmp_path, corpus, data_cache, env):
    workdir = tmp_path / "not_a_dir"
    workdir.write_text("a file where the workdir should be")  # root ignores permissions; this it cannot ignore
    result = run(command(workdir, corpus, data_cache), env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.startswith(f"error: cannot write to --workdir={workdir}")
    assert workdir.read_text() == "a file where the workdir should be"


def test_disk_full_during_a_save_is_one_error_and_keeps_earlier_checkpoints(
    tmp_path, corpus, data_cache, env, reference
):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "12")  # resume at 8; the save at 12 meets the full disk
    before = tree_digest(workdir / "checkpoints")

    # Every file the run writes stops at 256 KiB (EFBIG, as SIGXFSZ is ignored), like a full disk;
    # the checkpoint's array file is ~1.5 MB. (A tmpfs would need root; a file-size limit does not.)
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 256; exec "$@"', "bash", *command(workdir, corpus, data_cache)]
    result = run(limited, env)

    assert result.returncode == 2
    # orbax's writer threads may still print their own tracebacks while ours is written, so our line
    # can begin after a fragment of theirs (seen once on Python 3.12): find it wherever it starts.
    errors = [line[line.index("error: ") :] for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    error = errors[0]
    assert error.startswith(f"error: could not write a checkpoint to {workdir / 'checkpoints'}")
    assert error.endswith("the newest complete checkpoint is step 8")
    after = tree_digest(workdir / "checkpoints")
    assert {k: v for k, v in after.items() if not k.startswith("12")} == before


def test_sigterm_to_launch_sh_stops_every_process_at_the_same_step(tmp_path, corpus, data_cache, env, reference):
    """Two processes (launch.sh forwards TERM to both) agree on the step to stop after at the next
    multiple of log_every, so the collective save completes instead of deadlocking."""
    workdir = tmp_path / "run"
    cmd = ["./launch.sh", "local", "2", *command(workdir, corpus, data_cache, "--config.log_every=3")[3:]]
    process = start(cmd, {**env, "PYTHON": sys.executable, "LAUNCH_GRACE_S": "60"}, tmp_path / "launch.log")
    wait_until(lambda: len(logged_steps(workdir)) >= 1, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stops = [
        line.split("after step ")[1].split(":")[0]
        for line in (tmp_path / "launch.log").read_text().splitlines()
        if "stopped by SIGTERM" in line
    ]
    assert len(stops) == 2 and stops[0] == stops[1], stops
    assert int(stops[0]) % 3 == 0 and int(stops[0]) in checkpoint_steps(workdir)
