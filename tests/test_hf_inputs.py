"""Hostile Hugging Face folders and unwritable exports: every damaged file is refused in one line
naming it before anything is allocated from its claims, a refused command line exits 2 and leaves
no folder it made, and exported files are as readable as the umask says. The folders are written
by hf.write_folder from a tiny model and then damaged here (no transformers needed)."""

import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import SafetensorError

from mtp_jax import hf, hf_files
from mtp_jax.errors import UserError
from mtp_jax.mtp import build_model
from tests.util import ROOT, load_config, write_code

VOCAB = 256
SHAPE = {"model.d_model": 16, "model.n_heads": 2, "model.n_layers": 1, "model.mlp_dim": 32}


def tiny_config(**overrides):
    return load_config(
        "base", overrides={"use_mtp": True, "mtp_n_tokens": 2, "mtp_head_type": "linear", **SHAPE, **overrides}
    )


@pytest.fixture(scope="module")
def model():
    model = build_model(tiny_config(), VOCAB, seed=0)
    return model, jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def good(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "folder"
    hf.write_folder(out, model[1], model[0].decoder.shape, tiny_config(), data_dir=None, tokenizer="byte")
    return out


def read(folder, like) -> dict:
    return hf.read_params(hf.open_folder(folder), like, 2, "linear")


def test_an_undamaged_folder_reads_back_exactly(good, model):
    jax.tree.map(np.testing.assert_array_equal, read(good, model[1]), model[1])


def edit_json(file, edit):
    value = json.loads(file.read_text())
    file.write_text(json.dumps(edit(value)))


def edit_header(file, edit):
    """Rewrites a safetensors file's header (its length field too), keeping its data."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def damage(folder, case: str) -> None:
    weights, config, mtp = folder / hf_files.WEIGHTS, folder / "config.json", folder / hf_files.MTP_FILE
    norm = "model.norm.weight"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "header length 2^62":
        weights.write_bytes((2**62).to_bytes(8, "little") + weights.read_bytes()[8:])
    elif case == "offsets beyond the file":
        edit_header(weights, lambda h: h[norm].update(shape=[2**28, 2**30], data_offsets=[0, 2**60]))
    elif case == "shape larger than its bytes":
        edit_header(weights, lambda h: h[norm].update(shape=[16, 16]))
    elif case == "empty":
        weights.write_bytes(b"")
    elif case == "header not JSON":
        weights.write_bytes((4).to_bytes(8, "little") + b"{{{{" + b"\0" * 64)
    elif case == "integer tensor":
        edit_header(weights, lambda h: h[norm].update(dtype="I32"))
    elif case == "NaN weights":
        header_len = int.from_bytes(weights.read_bytes()[:8], "little")
        begin = json.loads(weights.read_bytes()[8 : 8 + header_len])[norm]["data_offsets"][0]
        with weights.open("r+b") as f:
            f.seek(8 + header_len + begin)
            f.write(np.float32(np.nan).tobytes())
    elif case == "config not JSON":
        config.write_text('{"hidden_size": 16,')
    elif case == "config a list":
        config.write_text("[1, 2]")
    elif case == "no hidden_size":
        edit_json(config, lambda c: {k: v for k, v in c.items() if k != "hidden_size"})
    elif case == "zero attention heads":
        edit_json(config, lambda c: {**c, "num_attention_heads": 0})
    elif case == "kv heads not dividing":
        edit_json(config, lambda c: {**c, "num_key_value_heads": 3, "num_attention_heads": 2})
    elif case == "a billion layers":
        edit_json(config, lambda c: {**c, "num_hidden_layers": 10**9})
    elif case == "architectures not a list":
        edit_json(config, lambda c: {**c, "architectures": 7})
    elif case == "mtp_jax.json not JSON":
        mtp.write_bytes(b"\xff\xfe not json")
    elif case == "unknown head type":
        edit_json(mtp, lambda m: {**m, "mtp_head_type": "diagonal"})
    elif case == "newer format":
        edit_json(mtp, lambda m: {**m, "format": hf.FORMAT + 1})
    elif case == "index not JSON":
        (folder / hf_files.INDEX).write_text("weight_map: model.safetensors")
    elif case == "index without weight_map":
        (folder / hf_files.INDEX).write_text(json.dumps({"metadata": {}}))
    elif case == "index outside the folder":
        (folder / hf_files.INDEX).write_text(json.dumps({"weight_map": {norm: "../" + hf_files.WEIGHTS}}))
    else:
        raise AssertionError(case)


# Each damaged file, and what its one line says (the file it names is checked too).
HOSTILE = {
    "truncated": (hf_files.WEIGHTS, "of its data, which holds"),
    "header length 2^62": (hf_files.WEIGHTS, f"claims a header of {2**62} bytes but holds"),
    "offsets beyond the file": (hf_files.WEIGHTS, f"puts tensor 'model.norm.weight' at bytes 0 to {2**60} of its data"),
    "shape larger than its bytes": (
        hf_files.WEIGHTS,
        "gives tensor 'model.norm.weight' (F32, shape [16, 16]) 64 bytes",
    ),
    "empty": (hf_files.WEIGHTS, "has 0 bytes, fewer than the 8 that give its header's length"),
    "header not JSON": (hf_files.WEIGHTS, "has a header that is not JSON"),
    "integer tensor": (hf_files.WEIGHTS, "is I32: only float tensors (F16, BF16, F32, F64) import"),
    "NaN weights": (hf_files.WEIGHTS, "holds NaN or infinite values"),
    "config not JSON": ("config.json", "is not JSON (Expecting property name enclosed in double quotes"),
    "config a list": ("config.json", "holds an array, not a JSON object"),
    "no hidden_size": ("config.json", "lacks hidden_size"),
    "zero attention heads": ("config.json", "sets num_attention_heads=0, which is not a positive integer"),
    "kv heads not dividing": ("config.json", "sets num_key_value_heads=3, which does not divide"),
    "a billion layers": ("", f"has no tensor model.layers.{10**9 - 1}.mlp.gate_proj.weight, which its config.json"),
    "architectures not a list": ("config.json", "sets architectures=7, which is not a list of class names"),
    "mtp_jax.json not JSON": (hf_files.MTP_FILE, "is not JSON"),
    "unknown head type": (hf_files.MTP_FILE, "sets mtp_head_type='diagonal', which is not one of"),
    "newer format": (hf_files.MTP_FILE, f"has format {hf.FORMAT + 1} and this mtp_jax reads format {hf.FORMAT}"),
    "index not JSON": (hf_files.INDEX, "is not JSON (Expecting value: line 1 column 1"),
    "index without weight_map": (hf_files.INDEX, "has no weight_map from tensor names to file names"),
    "index outside the folder": (hf_files.INDEX, "names weight files outside the folder ('../model.safetensors')"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_each_hostile_file_is_refused_in_one_line_naming_it(good, model, tmp_path, case):
    folder = shutil.copytree(good, tmp_path / "folder")
    damage(folder, case)
    name, expected = HOSTILE[case]
    with pytest.raises(UserError, match=re.escape(expected)) as error:
        read(folder, model[1])
    message = str(error.value)
    assert "\n" not in message and str(folder / name) in message, message


def test_a_truncated_file_is_refused_with_the_bytes_it_holds(good, tmp_path):
    """The data a header claims is set against the file's real size, before any tensor is read:
    the line names the first tensor past the end, where the header puts it and the bytes there are."""
    folder = shutil.copytree(good, tmp_path / "folder")
    damage(folder, "truncated")
    raw = (folder / hf_files.WEIGHTS).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    offsets = {
        name: info["data_offsets"]
        for name, info in json.loads(raw[8 : 8 + header_len]).items()
        if name != "__metadata__"
    }
    holds = len(raw) - 8 - header_len
    past = [name for name, (begin, end) in offsets.items() if end > holds]
    with pytest.raises(UserError) as error:
        hf.open_folder(folder)
    begin, end = offsets[past[0]]
    assert f"puts tensor {past[0]!r} at bytes {begin} to {end} of its data, which holds {holds} bytes" in str(
        error.value
    ), (str(error.value), past)


def test_a_tokenizer_json_that_is_not_a_tokenizer_is_one_line(good, tmp_path):
    folder = shutil.copytree(good, tmp_path / "folder")
    (folder / "tokenizer.json").write_text('{"model": 1}')
    data = types.SimpleNamespace(meta={"tokenizer": "bpe"}, directory=tmp_path, vocab_size=VOCAB)
    with pytest.raises(UserError, match="is not a tokenizer the tokenizers library reads") as error:
        hf_files.tokenizer_problem(hf.open_folder(folder), data)
    assert "\n" not in str(error.value) and str(folder / "tokenizer.json") in str(error.value)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write(model, out):
    hf.write_folder(out, model[1], model[0].decoder.shape, tiny_config(), data_dir=None, tokenizer="byte")


def test_out_under_a_file_is_refused_and_makes_nothing(model, tmp_path):
    (tmp_path / "a_file").write_text("mine")
    for out in (tmp_path / "a_file" / "out", tmp_path / "a_file" / "deeper" / "out"):
        with pytest.raises(
            UserError, match=re.escape(f"cannot write {out}: {tmp_path / 'a_file'} is a file, not a folder")
        ):
            write(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and (tmp_path / "a_file").read_text() == "mine"


def test_out_in_an_unwritable_folder_is_refused_and_makes_nothing(model, tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root writes into a 0555 folder; sysfs refuses everyone
        parent = pathlib.Path("/sys")
        if not parent.is_dir():
            pytest.skip("running as root without /sys: no folder is unwritable")
    out = parent / "new" / "out"
    with pytest.raises(UserError, match=re.escape(f"cannot write {out}: ")) as error:
        write(model, out)
    assert re.search(
        r"(Permission denied|Operation not permitted); choose a folder you can write to", str(error.value)
    ), str(error.value)
    assert not (parent / "new").exists()


def test_a_full_disk_is_refused_before_writing_and_while_writing(model, tmp_path, monkeypatch):
    out = tmp_path / "new" / "out"
    need = sum(np.asarray(x).size * 4 for x in jax.tree.leaves(model[1]))
    monkeypatch.setattr(hf_files.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=need - 1))
    with pytest.raises(UserError, match=re.escape(f"its weights need {need / 2**20:.1f} MiB and the disk has")):
        write(model, out)
    monkeypatch.undo()

    def full(tensors, path, metadata):  # safetensors' own report of ENOSPC
        raise SafetensorError(
            f"Error while serializing: I/O error: No space left on device (os error 28) at path "
            f'"{path.parent / ".tmpX"}"'
        )

    monkeypatch.setattr(hf_files.safetensors.numpy, "save_file", full)
    with pytest.raises(UserError, match=re.escape(f"cannot write {out}: No space left on device; choose a folder")):
        write(model, out)
    assert list(tmp_path.iterdir()) == []  # neither the folder, nor its parent, nor a half-written copy


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_exported_files_have_the_modes_the_umask_gives(model, tmp_path, mask, file_mode, folder_mode):
    old = os.umask(mask)
    try:
        write(model, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == folder_mode
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert hf_files.WEIGHTS in modes and set(modes.values()) == {file_mode}, modes


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refused_init_from_exits_2_in_one_line_and_leaves_no_workdir(good, tmp_path):
    """A folder refused once the data is read, when the workdir (two new folders deep) exists:
    the run removes what it made."""
    bpe = shutil.copytree(good, tmp_path / "bpe")
    edit_json(bpe / hf_files.MTP_FILE, lambda m: {**m, "tokenizer": "bpe"})
    write_code(tmp_path / "corpus.txt")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.main",
            "--config=configs/mtp3.py:tiny",
            f"--workdir={tmp_path / 'new' / 'run'}",
            f"--config.init_from={bpe}",
            f"--config.data.source={tmp_path / 'corpus.txt'}",
            f"--config.data.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "reads 'bpe' tokens but the data's tokenizer is 'byte'" in errors[0], errors
    assert "Traceback" not in result.stderr and not (tmp_path / "new").exists()
