"""The multi-host path for real: `./launch.sh local 2 -d 2` trains as one process on 4 devices
does; a failing process ends the launch naming it; and a checkpoint written on 8 devices with
mesh fsdp=8 resumes on 4 devices (data=2, fsdp=2) and on 1 device with the same losses."""

import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mtp_jax import data as data_lib
from mtp_jax import train
from mtp_jax.metrics import read_metrics
from tests.util import ROOT, load_config

pytestmark = pytest.mark.slow

STEPS = 10
# Overrides of configs/mtp3.py:tiny (besides the data): losses every step, little else.
RUN = {
    "num_train_steps": STEPS,
    "log_every": 1,
    "eval_every": STEPS,
    "eval_batches": 1,
    "checkpoint_every": STEPS,
    "sample_tokens": 0,
    "mesh.data": 2,
    "mesh.fsdp": 2,
}


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    """A small real corpus (this package's source), tokenized once up front so that the
    processes of a launch only read the cache."""
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in sorted((ROOT / "mtp_jax").glob("*.py"))))
    overrides = {"data.source": str(corpus), "data.cache_dir": str(root / "cache")}
    data_lib.prepare(load_config(overrides=overrides).data, show_progress=False)
    return overrides


def losses(workdir) -> dict[int, float]:
    return {e["step"]: e["train/total_loss"] for e in read_metrics(workdir) if "train/total_loss" in e}


def launch(args, env=None, timeout=240):
    return subprocess.run(
        [str(ROOT / "launch.sh"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


def test_two_processes_of_two_devices_train_like_one_process_of_four(data_overrides, tmp_path):
    overrides = {**RUN, **data_overrides}
    result = launch(
        [
            "local",
            "2",
            "-d",
            "2",
            "--config=configs/mtp3.py:tiny",
            f"--workdir={tmp_path / 'multi'}",
            *(f"--config.{k}={v}" for k, v in overrides.items()),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh data=2, fsdp=2, tensor=1" in result.stderr
    assert "compiled train step needs" in result.stderr and "MiB per device" in result.stderr

    train.run(load_config(overrides=overrides), tmp_path / "single", devices=jax.devices()[:4])
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == list(range(1, STEPS + 1))  # only process 0 wrote, once per step
    np.testing.assert_allclose([multi[s] for s in sorted(multi)], [single[s] for s in sorted(single)], rtol=1e-5)
    # Both processes wrote their shards of the checkpoint: it restores on one process.
    assert (tmp_path / "multi" / "checkpoints" / str(STEPS)).is_dir()


def test_a_failing_process_ends_the_launch_naming_it(data_overrides, tmp_path):
    # The real trainer, with a fault only in process 1: a batch that does not divide over the mesh.
    wrapper = tmp_path / "python"
    wrapper.write_text(
        f"#!/usr/bin/env bash\n"
        f'[[ " $* " == *" --process_id=1 "* ]] && set -- "$@" --config.batch_size=6\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    start = time.monotonic()
    result = launch(
        [
            "local",
            "2",
            "-d",
            "2",
            "--config=configs/mtp3.py:tiny",
            f"--workdir={tmp_path / 'run'}",
            *(f"--config.{k}={v}" for k, v in {**RUN, **data_overrides}.items()),
        ],
        env={"PYTHON": str(wrapper), "LAUNCH_GRACE_S": "2"},
        timeout=120,
    )
    assert result.returncode == 2
    assert "[process 1] error: batch_size=6 does not divide over the mesh's data x fsdp = 4 shards" in result.stderr
    assert "launch.sh: process 1 exited with status 2; stopping the others" in result.stderr
    assert time.monotonic() - start < 120


def test_checkpoint_from_fsdp_8_resumes_on_4_and_1_devices_with_the_same_losses(data_overrides, tmp_path, capsys):
    half = STEPS // 2
    overrides = {**RUN, **data_overrides, "checkpoint_every": half, "mesh.data": 1, "mesh.fsdp": -1}
    train.run(load_config(overrides=overrides), tmp_path / "fsdp8")  # all 8 devices
    reference = losses(tmp_path / "fsdp8")

    for name, devices, mesh in [("data2_fsdp2", 4, {"mesh.data": 2, "mesh.fsdp": 2}), ("one_device", 1, {})]:
        workdir = tmp_path / name
        shutil.copytree(tmp_path / "fsdp8", workdir)
        shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if stopped after the checkpoint at `half`
        capsys.readouterr()
        train.run(load_config(overrides={**overrides, **mesh}), workdir, devices=jax.devices()[:devices])
        assert f"at step {half}" in capsys.readouterr().err  # restored, not started over
        resumed = losses(workdir)
        assert sorted(resumed) == list(range(1, STEPS + 1))
        np.testing.assert_allclose(
            [resumed[s] for s in range(half + 1, STEPS + 1)],
            [reference[s] for s in range(half + 1, STEPS + 1)],
            rtol=1e-5,
            err_msg=name,
        )
