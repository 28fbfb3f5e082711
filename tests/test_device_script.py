"""benchmarks/device.sh, the one-shot accelerator benchmark, runs end to end on CPU with the tiny
preset (so it never rots before a GPU is there) and writes a consistent JSON and table."""

import json
import os
import subprocess
import sys

import pytest

from mtp_jax import attention
from tests.util import ROOT


def test_device_script_writes_every_section_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    # float32: XLA-CPU's bfloat16 is slow; one head type and one attention keep the compilations few.
    flags = [
        "--preset=tiny",
        "--dtype=float32",
        "--steps=2",
        "--warmup=1",
        "--head_types=sequential",
        "--attention=blockwise",
        "--prompts=2",
        "--prompt_len=8",
        "--new_tokens=16",
    ]
    proc = subprocess.run(
        ["bash", "benchmarks/device.sh", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "device.json").read_text())
    assert report["platform"] == "cpu" and report["peak_source"].startswith("measured")
    names = [r["name"] for r in report["train"]]
    assert names == ["tiny baseline", "tiny sequential n=4"]
    for r in report["train"] + report["attention"]:
        # MFU against the peak measured in the same run (on a busy CPU it can exceed 1: no bound here).
        assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["step_time_s"] / report["peak_flops"])
        assert r["tokens_per_sec"] > 0 and r["temp_bytes"] > 0
    assert report["train"][0]["time_ratio"] == 1.0
    assert [r["attention"] for r in report["attention"]] == [f"auto = {attention.resolve('auto')}", "blockwise"]
    decoding = report["decoding"]
    assert decoding["plain_tokens_per_sec"] > 0 and decoding["speculative_tokens_per_sec"] > 0
    assert 1.0 <= decoding["tokens_per_pass"] <= 4.0
    table = (tmp_path / "device.md").read_text()
    assert "| tiny sequential n=4 |" in table and "| blockwise |" in table and "speculative" in table
