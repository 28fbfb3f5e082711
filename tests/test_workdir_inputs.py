"""Broken workdirs and out-of-range requests for the commands that load a trained model
(generate, evaluate, export): a damaged newest checkpoint is skipped for the previous good one
and left where it is, with its notices alone on stderr (for a resumed training too), no loadable
checkpoint is one `error:` line, limits that cut a request say so, and what they compile is kept
in a compilation cache across invocations. One tiny trained workdir (checkpoints at steps 2 and
4) is copied and damaged here."""

import asyncio
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx

from mtp_jax import checkpoint, evaluate, export, generate, sharding, train, train_step, workdir
from tests.util import ROOT, load_config, tiny_run, write_code

N = 3  # heads: two draft heads of 8 candidates each
PROMPT = "def "  # 4 byte tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    corpus = write_code(root / "corpus.txt", body=lambda i: f"x + {i}")
    config = load_config(
        "base",
        overrides={
            "use_mtp": True,
            "mtp_n_tokens": N,
            "mtp_head_type": "linear",
            "num_train_steps": 4,
            "log_every": 4,
            "eval_every": 4,
            "checkpoint_every": 2,
            "model.d_model": 32,
            "model.n_layers": 1,
            "model.n_heads": 2,
            "model.mlp_dim": 64,
            **tiny_run(corpus, root / "cache"),
        },
    )
    train.run(config, root / "run")
    return root / "run"


def saved_params(run: pathlib.Path, step: int):
    """A checkpoint's params as orbax reads them with no code of ours."""
    return ocp.StandardCheckpointer().restore(run / "checkpoints" / str(step) / "state")["params"]


def flat(tree) -> dict:
    """{'decoder/blocks/0/…': array}: orbax gives a list's items string keys, nnx integer ones."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def digest(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: pathlib.Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def data_files(state: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in (state / "ocdbt.process_0").rglob("*") if p.is_file()]


DAMAGE = {  # what is cut in a checkpoint's state/ folder
    "_METADATA truncated": lambda state: truncate(state / "_METADATA"),
    "manifest.ocdbt truncated": lambda state: truncate(state / "manifest.ocdbt"),
    # Every data file emptied: which one holds the parameters, and where in it, differs between runs
    # and orbax versions (a file cut to half its size may still hold all of them).
    "data files emptied": lambda state: [truncate(p, keep=0) for p in data_files(state)],
}


def damaged_copy(trained, tmp_path, how: str, steps=(4,)) -> pathlib.Path:
    run = shutil.copytree(trained, tmp_path / "run")
    for step in steps:
        DAMAGE[how](run / "checkpoints" / str(step) / "state")
    return run


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("how", list(DAMAGE))
def test_loading_skips_a_damaged_newest_checkpoint_for_the_previous_one_and_leaves_it(trained, tmp_path, capsys, how):
    run = damaged_copy(trained, tmp_path, how)
    before = digest(run)
    loaded = workdir.load(run)
    assert loaded.step == 2
    params = jax.device_get(nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
    expected = flat(saved_params(trained, 2))
    assert flat(params).keys() == expected.keys()
    for name, array in flat(params).items():
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    assert not all(np.array_equal(a, b) for a, b in zip(flat(params).values(), flat(saved_params(trained, 4)).values()))
    err = capsys.readouterr().err
    unusable = [line for line in err.splitlines() if "is unusable" in line]
    assert len(unusable) == 1 and f"checkpoint {run / 'checkpoints' / '4'} is unusable (" in unusable[0], err
    assert f"using step 2 of {run / 'checkpoints'}, the newest checkpoint that loads" in err
    assert "<bound method" not in err
    assert digest(run) == before  # a command that reads a workdir moves and deletes nothing


# A restore that fails leaves tensorstore reads pending; whether they finish before or after orbax
# closes its event loop is timing, and each left to finish after it would print a traceback: so
# each restore is repeated, and one test forces the timing.
REPEATS = 5


@pytest.fixture
def stderr(capsys, caplog, monkeypatch):
    """What a user would see on stderr, once whatever the last restore left pending has ended (or
    been collected): exceptions raised where nothing can catch them (a callback in a tensorstore
    thread, a coroutine collected unfinished) are printed there, not collected by pytest, and the
    log records a console shows (warnings and errors, such as asyncio's) are added to its lines."""
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)

    def lines() -> list[str]:
        time.sleep(0.2)
        gc.collect()
        logged = [f"{r.levelname}:{r.name}:{r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
        return capsys.readouterr().err.splitlines() + logged

    return lines


def assert_only(notices: list[str], lines: list[str]) -> None:
    """stderr is these lines (each given by how it starts) and no other: no traceback, no asyncio
    error."""
    assert len(lines) == len(notices) and all(map(str.startswith, lines, notices)), "\n".join(lines)[-3000:]


@pytest.mark.parametrize("how", list(DAMAGE))
def test_loading_past_a_damaged_checkpoint_prints_its_two_notices_and_nothing_else(trained, tmp_path, stderr, how):
    run = damaged_copy(trained, tmp_path, how)
    for _ in range(REPEATS):
        assert workdir.load(run).step == 2
    checkpoints = run / "checkpoints"
    assert_only(
        [
            f"checkpoint {checkpoints / '4'} is unusable (",
            f"using step 2 of {checkpoints}, the newest checkpoint that loads",
        ]
        * REPEATS,
        stderr(),
    )


def test_a_read_still_pending_when_a_restore_fails_is_cancelled_and_prints_nothing_when_it_ends(
    trained, tmp_path, monkeypatch, stderr
):
    """The timing forced: step 4's restore fails as orbax's do (tensorstore reads gathered in a
    fresh event loop, closed as soon as one of them fails) with the other read ending only after
    the loop closed."""
    promise, late_read = ts.Promise.new()
    real_restore = checkpoint.Checkpointer.restore

    def failing_with_a_read_pending(self, step, abstract_state=None):
        if step != 4:
            return real_restore(self, step, abstract_state)

        async def damaged():
            raise ValueError("DATA_LOSS: a damaged file")

        async def reads():
            return await asyncio.gather(damaged(), late_read)

        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(reads())
        finally:
            loop.close()

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", failing_with_a_read_pending)
    run = shutil.copytree(trained, tmp_path / "run")
    assert workdir.load(run).step == 2
    promise.set_result(None)
    unusable = f"checkpoint {run / 'checkpoints' / '4'} is unusable (ValueError: DATA_LOSS: a damaged file)"
    assert_only([f"{unusable}; trying the previous one", f"using step 2 of {run / 'checkpoints'}"], stderr())
    assert late_read.cancelled()


@pytest.fixture(scope="module")
def abstract_state(trained):
    """What training restores onto: the train state's shapes and shardings on this process's devices."""
    config = ml_collections.ConfigDict(json.loads((trained / "config.json").read_text()))
    mesh = sharding.make_mesh(config.mesh, jax.devices())
    return train_step.make_train_step(config, config.vocab_size, mesh, config.num_train_steps).abstract_state


@pytest.mark.parametrize("how", list(DAMAGE))
def test_resuming_past_a_damaged_checkpoint_prints_its_notice_and_nothing_else(
    trained, tmp_path, stderr, abstract_state, how
):
    notices = []
    for attempt in range(REPEATS):  # training moves the damaged checkpoint aside: a fresh copy each time
        checkpoints = damaged_copy(trained, tmp_path / str(attempt), how) / "checkpoints"
        checkpointer = checkpoint.Checkpointer(checkpoints, keep=None)
        assert checkpointer.restore_newest_good(abstract_state)[0] == 2
        checkpointer.close()
        notices.append(f"checkpoint {checkpoints / '4'} is unusable (")
    assert_only(notices, stderr())


@pytest.mark.slow
def test_generate_past_a_damaged_checkpoint_prints_no_traceback(trained, tmp_path):
    """As a user runs it: whatever the failed restore left behind would also print at exit."""
    run = damaged_copy(trained, tmp_path, "manifest.ocdbt truncated")
    result = subprocess.run(
        [sys.executable, "-m", "mtp_jax.generate", f"--workdir={run}", f"--prompt={PROMPT}", "--max_new_tokens=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"using step 2 of {run / 'checkpoints'}" in result.stderr
    assert not re.search(r"Traceback|Exception ignored|Event loop is closed|Task was destroyed", result.stderr), (
        result.stderr[-3000:]
    )


def test_a_save_in_progress_is_left_alone_by_a_reader(trained, tmp_path):
    """Training may be writing its next checkpoint (a temporary folder) while generate loads."""
    run = shutil.copytree(trained, tmp_path / "run")
    saving = run / "checkpoints" / "6.orbax-checkpoint-tmp-1234567890"
    (saving / "state").mkdir(parents=True)
    (saving / "state" / "_METADATA").write_text("{}")
    assert workdir.load(run).step == 4
    assert (saving / "state" / "_METADATA").read_text() == "{}"


@pytest.mark.parametrize("command", ["generate", "evaluate", "export"])
def test_no_loadable_checkpoint_is_one_line_and_exit_2(trained, tmp_path, capsys, command):
    run = damaged_copy(trained, tmp_path, "data files emptied", steps=(4, 2))
    out = tmp_path / "exported"
    argv = {"generate": ["--prompt", PROMPT], "evaluate": ["--probe=induction"], "export": [f"--out={out}"]}[command]
    main = {"generate": generate.main, "evaluate": evaluate.main, "export": export.main}[command]
    with pytest.raises(SystemExit) as exit_:
        main([f"--workdir={run}", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(error_lines(err)) == 1, err
    assert error_lines(err)[0] == (
        f"error: no usable checkpoint in {run / 'checkpoints'}: steps 4, 2 are damaged "
        "(see above); train the model again, in a new --workdir"
    )
    assert len([line for line in err.splitlines() if "is unusable" in line]) == 2 and "<bound method" not in err
    assert not out.exists() and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]


def run_generate(capsys, *flags) -> tuple[dict, str]:
    generate.main([*flags, "--json"])
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_max_new_tokens_past_the_cache_is_cut_with_a_notice(trained, capsys):
    out, err = run_generate(capsys, f"--workdir={trained}", f"--prompt={PROMPT}", "--max_new_tokens=100000")
    room = 32 - len(PROMPT)  # the cache holds seq_len = 32 positions
    assert out["new_tokens"] == room and out["step"] == 4
    assert (
        f"--max_new_tokens=100000 does not fit: the cache's 32 positions hold the 4-token prompt and {room} new "
        f"tokens, so at most {room} are generated"
    ) in err
    assert out["compile_seconds"] > 0 and out["decode_seconds"] > 0
    assert out["tokens_per_sec"] == room / out["decode_seconds"]  # decoding alone, compiling apart


def test_tree_size_past_the_heads_candidates_uses_all_of_them_with_a_notice(trained, capsys):
    out, err = run_generate(
        capsys,
        f"--workdir={trained}",
        f"--prompt={PROMPT}",
        "--max_new_tokens=8",
        "--speculative",
        "--tree_size=1000000",
    )
    every = sum(8**depth for depth in range(1, N))  # 8 candidates per head, one head per depth
    assert every == 72 and len(out["tree"]) == every and out["new_tokens"] == 8
    assert (
        f"--tree_size=1000000 is more than the {N - 1} draft heads' candidates can fill: using the {every}-node "
        "tree of all of them" in err
    )


def test_task_probe_on_a_model_trained_on_text_is_refused_in_one_line(trained, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([f"--workdir={trained}", "--probe=task"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and error_lines(err) == [
        f"error: --probe=task measures a model trained on a task (data.source='task:polyarith' or 'task:pathstar'), "
        f"and this one was trained on data.source={str(trained.parent / 'corpus.txt')!r}: use --probe=induction or "
        "--probe=parse_rate"
    ]


def test_the_commands_keep_the_test_sessions_compilation_cache(trained, capsys):
    """tests/conftest.py sets JAX's cache through its environment variables: the commands use them."""
    run_generate(capsys, f"--workdir={trained}", f"--prompt={PROMPT}", "--max_new_tokens=2")
    assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0


# The cache as a user gets it: no JAX_* variables, HOME a fresh folder. The child reports how many
# programs asked the cache and how many it found there.
COUNTING = """
import atexit, collections, sys
import jax
from mtp_jax import generate
events = collections.Counter()
jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
atexit.register(lambda: print("CACHE", events["/jax/compilation_cache/compile_requests_use_cache"],
                              events["/jax/compilation_cache/cache_hits"], file=sys.stderr))
generate.main(sys.argv[1:])
"""


def user_env(home: pathlib.Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "HOME": str(home), **extra}


@pytest.mark.slow
def test_a_second_generate_loads_every_program_from_the_default_cache(trained, tmp_path):
    counts = []
    for _ in range(2):
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                COUNTING,
                f"--workdir={trained}",
                f"--prompt={PROMPT}",
                "--max_new_tokens=4",
                "--speculative",
                "--json",
            ],
            cwd=ROOT,
            env=user_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        counts.append([int(x) for x in result.stderr.split("CACHE ")[1].split()])
    (asked, found), (asked_again, found_again) = counts
    assert asked > 0 and found == 0 and asked_again == found_again == asked, counts
    assert any((tmp_path / ".cache" / "mtp_jax" / "jax_compilation").iterdir())


def cache_settings(env: dict) -> list[str]:
    code = (
        "import jax; from mtp_jax import compilation_cache; compilation_cache.use_compilation_cache(); "
        "print(jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.slow
def test_the_cache_moves_with_its_variable_and_turns_off(tmp_path):
    assert cache_settings(user_env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "here"))) == [
        "True",
        str(tmp_path / "here"),
    ]
    assert cache_settings(user_env(tmp_path, JAX_ENABLE_COMPILATION_CACHE="false")) == ["False", "None"]
    assert not (tmp_path / ".cache").exists()


def test_the_host_fingerprint_equals_the_device_fingerprint_for_every_dtype():
    """Loading a model checks its parameters with NumPy, training checks the whole state on device:
    both must give the same rows, or every load would be refused."""
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(3, 1000)).astype(np.float32),
        "bf16": rng.normal(size=(77,)).astype(jax.numpy.bfloat16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(5, 7), dtype=np.int32),
        "u8": rng.integers(0, 255, size=(9,), dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "step": np.int32(12),
    }
    rows, finite = checkpoint.host_fingerprint(tree)
    device_rows, device_finite = checkpoint.fingerprint(tree)
    assert rows == [tuple(r) for r in np.asarray(device_rows).tolist()] and finite == bool(device_finite) is True
    tree["f32"][1, 2] = np.inf
    assert checkpoint.host_fingerprint(tree)[1] is False


def test_loading_a_model_reads_only_its_parameters_and_still_catches_a_changed_one(trained, tmp_path, monkeypatch):
    """generate, evaluate and export restore the parameters and step counter only; a parameter
    that differs from the fingerprint saved with it (here: changed after reading) is refused."""
    loaded = workdir.load(trained)
    state_keys = set(ocp.StandardCheckpointer().metadata(trained / "checkpoints" / "4" / "state").item_metadata.tree)
    assert {"opt_state", "params", "step"} <= state_keys
    real_restore, skipped = ocp.CheckpointManager.restore, []

    def one_word_changed(self, step, args=None):
        restored = real_restore(self, step, args=args)
        skipped.append("opt_state" not in restored["state"])
        if step == 4:
            bias = restored["state"]["params"]["decoder"]["final_norm"]["scale"]
            restored["state"]["params"]["decoder"]["final_norm"]["scale"] = bias.at[0].add(1.0)
        return restored

    monkeypatch.setattr(ocp.CheckpointManager, "restore", one_word_changed)
    assert workdir.load(trained).step == 2  # step 4's changed word is caught; step 2 loads
    assert loaded.step == 4 and skipped == [True, True]  # the optimizer state never read


def test_has_checkpoints_sees_finished_step_directories_only(tmp_path):
    """Read without a CheckpointManager, so a refused training command starts no orbax thread."""
    directory = tmp_path / "checkpoints"
    assert not checkpoint.has_checkpoints(directory)  # absent
    directory.mkdir()
    (directory / "40.orbax-checkpoint-tmp-7").mkdir()  # a save cut short
    assert not checkpoint.has_checkpoints(directory)
    (directory / "40").mkdir()
    assert checkpoint.has_checkpoints(directory)
