"""End-to-end training on the tiny preset: metrics, resume, checkpoints, sharding, bad input."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mtp_jax import data as data_lib
from mtp_jax import train
from mtp_jax.checkpoint import Checkpointer, abstract_like
from mtp_jax.errors import UserError
from mtp_jax.metrics import read_metrics
from mtp_jax.sharding import make_mesh, param_shardings
from tests.util import ROOT, load_config


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def tiny(cache_dir, name="mtp3", **overrides):
    return load_config(
        name, overrides={"data.cache_dir": cache_dir, "eval_batches": 2, "sample_tokens": 0, **overrides}
    )


def train_losses(workdir, key="train/loss_1") -> dict[int, float]:
    return {e["step"]: e[key] for e in read_metrics(workdir) if key in e}


@pytest.fixture(scope="module")
def tiny_run(cache_dir, tmp_path_factory):
    """One 40-step MTP run that several tests read."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    final = train.run(tiny(cache_dir, log_every=1, checkpoint_every=20), workdir)
    return workdir, final


def test_tiny_run_logs_every_head_and_head1_loss_falls(tiny_run, cache_dir):
    workdir, final = tiny_run
    events = read_metrics(workdir)
    # The training set's size, logged once at step 0, is the prepared corpus's (report.py's epochs).
    corpus = data_lib.prepare(tiny(cache_dir).data, show_progress=False)
    assert [(e["step"], e["data/train_tokens"]) for e in events if "data/train_tokens" in e] == [(0, len(corpus.train))]
    keys = set().union(*events)
    for k in (1, 2, 3):
        assert {f"train/loss_{k}", f"train/accuracy_{k}", f"eval/loss_{k}", f"eval/accuracy_{k}"} <= keys
    assert {
        "eval/bits_per_byte",
        "model/param_count",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_sec",
    } <= keys
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, 41))
    assert np.mean([losses[s] for s in range(36, 41)]) < np.mean([losses[s] for s in range(1, 6)]) - 1.0
    # Bits per byte of the byte tokenizer: head-1 loss in bits.
    np.testing.assert_allclose(final["eval/bits_per_byte"], final["eval/loss_1"] / np.log(2), rtol=1e-6)
    assert (workdir / "tensorboard").is_dir() and any((workdir / "tensorboard").iterdir())
    assert json.loads((workdir / "config.json").read_text())["mtp_n_tokens"] == 3


def test_resume_reproduces_uninterrupted_losses(tiny_run, tmp_path, cache_dir):
    workdir, _ = tiny_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "40")  # as if killed after saving step 20
    train.run(tiny(cache_dir, log_every=1, checkpoint_every=20), resumed)
    original, again = train_losses(workdir), train_losses(resumed)
    assert sorted(again) == list(range(1, 41))  # steps 21..40 rewritten, not doubled
    np.testing.assert_allclose([again[s] for s in range(21, 41)], [original[s] for s in range(21, 41)], rtol=1e-6)


def test_restored_checkpoint_equals_saved_state(tmp_path):
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    params = {"w": np.arange(32, dtype=np.float32).reshape(8, 4), "blocks": {0: np.ones(4, np.float32)}}
    shardings = param_shardings(params, {"w": ("embed", "mlp"), "blocks": {0: ("norm",)}}, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"params": jax.device_put(params, shardings), "step": jax.device_put(np.int32(7), replicated)}
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    checkpointer.save(7, state)
    checkpointer.wait()
    restored = checkpointer.restore(7, abstract_like(state, jax.tree.map(lambda x: x.sharding, state)))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding


def test_sharded_run_matches_single_device(cache_dir, tmp_path):
    overrides = dict(num_train_steps=4, log_every=1, eval_every=4, checkpoint_every=4)
    train.run(tiny(cache_dir, **overrides, **{"mesh.data": 1}), tmp_path / "one", devices=jax.devices()[:1])
    train.run(tiny(cache_dir, **overrides, **{"mesh.data": 4, "mesh.fsdp": 2}), tmp_path / "eight")
    for key in ("train/loss_1", "train/loss_3", "train/grad_norm"):
        one, eight = train_losses(tmp_path / "one", key), train_losses(tmp_path / "eight", key)
        np.testing.assert_allclose(list(eight.values()), list(one.values()), rtol=1e-5)


def run_main(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "mtp_jax.main", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_bad_inputs_raise_one_clear_user_error(tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    tokens = tmp_path / "big_ids.bin"
    np.array([1, 2, 70000, 3], "<u4").tofile(tokens)
    cases = {
        "does not exist": {"data.source": str(tmp_path / "missing")},
        "empty": {"data.source": str(empty)},
        "fewer than one window": {"data.source": str(short)},
        ">= vocab": {"data.source": str(tokens), "data.vocab_size": 1000},
        "mtp_n_tokens=0": {"mtp_n_tokens": 0},
        "seq_len=2 must exceed": {"seq_len": 2, "mtp_n_tokens": 4},
        "mtp_head_type='foo'": {"mtp_head_type": "foo"},
    }
    for expected, overrides in cases.items():
        with pytest.raises(UserError) as error:
            train.run(tiny(cache_dir, **overrides), tmp_path / "w")
        assert expected in str(error.value) and "\n" not in str(error.value), expected


@pytest.mark.slow
def test_bad_command_lines_get_one_clear_line_exit_2_and_keep_the_workdir(tmp_path, cache_dir, tiny_run):
    """The flags main parses itself, and a UserError turned into one line (the workdir of another model)."""
    trained_workdir, _ = tiny_run
    base = ["--config=configs/mtp3.py:tiny", f"--config.data.cache_dir={cache_dir}"]
    cases = {
        "mtp_n_tokn": ["--config.mtp_n_tokn=3"],
        "No such file": ["--config=configs/nope.py"],
        "unknown preset 'huge'": ["--config=configs/mtp3.py:huge"],
        "different model": ["--config.model.d_model=128"],
    }
    before = sorted(p.name for p in (trained_workdir / "checkpoints").iterdir())
    for expected, flags in cases.items():
        workdir = trained_workdir if expected == "different model" else tmp_path / "w"
        result = run_main(*base, f"--workdir={workdir}", *flags)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2, (expected, result.stderr[-2000:])
        assert len(errors) == 1 and expected in errors[0], (expected, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (trained_workdir / "checkpoints").iterdir()) == before
