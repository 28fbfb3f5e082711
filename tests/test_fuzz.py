"""Bad input: malformed token files and meta.json, non-UTF-8 and symlink-looped corpora, configs
that raise or overrides of the wrong type. Each must end in one clear line (UserError in process,
`error: …` and exit 2 from main) and leave every existing file as it was. Hypothesis feeds the
data loader random byte strings and random small token files."""

import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtp_jax import data
from mtp_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_config(source, cache_dir, **overrides):
    config = ml_collections.ConfigDict(
        dict(
            source=str(source),
            tokenizer="byte",
            vocab_size=0,
            token_dtype="uint32",
            val_fraction=0.25,
            split_seed=0,
            cache_dir=str(cache_dir),
        )
    )
    config.update(overrides)
    return config


def tree_digest(directory):
    directory = pathlib.Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def assert_one_line_error(source_dir, cache_dir, config, match):
    """prepare(config) raises one line matching `match`, changes nothing in source_dir, builds nothing."""
    before = tree_digest(source_dir)
    with pytest.raises(UserError, match=match) as error:
        data.prepare(config, show_progress=False)
    assert "\n" not in str(error.value)
    assert tree_digest(source_dir) == before
    assert not cache_dir.exists() or not any(cache_dir.iterdir()), "a failed build left files in the cache"


# ------------------------------------------------------------------------------- token files


def write_tokens(directory, tokens, dtype="<u4", meta=None):
    directory.mkdir(exist_ok=True)
    path = directory / "tokens.bin"
    np.asarray(tokens, dtype).tofile(path)
    if meta is not None:
        (directory / "meta.json").write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    return path


def test_token_file_of_odd_length_is_rejected(tmp_path):
    path = write_tokens(tmp_path / "src", np.arange(100))
    with path.open("ab") as f:
        f.write(b"\x01")  # 401 bytes: not a whole number of uint32 tokens
    assert_one_line_error(
        tmp_path / "src",
        tmp_path / "cache",
        data_config(path, tmp_path / "cache", vocab_size=100),
        "not a multiple of 4",
    )


@pytest.mark.parametrize(
    "meta, overrides, match",
    [
        (None, {}, "data.vocab_size=0 and no vocab_size"),
        ({"vocab_size": 100, "dtype": "uint16"}, {}, "says dtype='uint16' but data.token_dtype='uint32'"),
        ({"vocab_size": 100}, {"vocab_size": 50}, "says vocab_size=100 but data.vocab_size=50"),
        ({"vocab_size": 50}, {}, "holds token id 99 >= vocab_size=50"),
        (b"{not json", {}, "is not valid JSON"),
        (b"\xff\xfe\x00", {}, "is not valid JSON"),
        ([1, 2, 3], {}, "must be a JSON object with an integer vocab_size"),
        ({"vocab_size": "big"}, {}, "must be a JSON object with an integer vocab_size"),
    ],
)
def test_token_file_with_missing_or_contradicting_meta_is_rejected(tmp_path, meta, overrides, match):
    path = write_tokens(tmp_path / "src", np.arange(100), meta=meta)
    assert_one_line_error(
        tmp_path / "src", tmp_path / "cache", data_config(path, tmp_path / "cache", **overrides), match
    )


# ------------------------------------------------------------------------------- text corpora


def test_non_utf8_files_in_a_corpus_are_skipped_and_counted(tmp_path, caplog):
    texts = {"a.py": "def f(x):\n    return x\n" * 5, "b.py": "print('héllo')\n" * 7, "c.py": "x = 1\n" * 9}
    for name, text in texts.items():
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_text(text, encoding="utf-8")
    (tmp_path / "src" / "latin1.py").write_bytes("# café\n".encode("latin-1"))  # 0xe9 alone is not UTF-8
    with caplog.at_level(logging.WARNING, logger="mtp_jax.data"):
        prepared = data.prepare(data_config(tmp_path / "src", tmp_path / "cache"), show_progress=False)
    assert "Skipped 1 files" in caplog.text
    expected = b"".join(t.encode("utf-8") for t in texts.values())
    got = np.concatenate([prepared.train, prepared.val]).astype(np.uint8)
    np.testing.assert_array_equal(
        np.bincount(got, minlength=256), np.bincount(np.frombuffer(expected, np.uint8), minlength=256)
    )


def test_corpus_with_no_utf8_text_is_rejected(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.bin").write_bytes(b"\xff\xfe\xfd" * (i + 1))
    assert_one_line_error(
        tmp_path / "src", tmp_path / "cache", data_config(tmp_path / "src", tmp_path / "cache"), "holds no text"
    )


def test_symlink_loops_are_read_once_or_rejected(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello loops\n" * 10)
    os.symlink("self", src / "self")  # a link to itself
    os.symlink(".", src / "here")  # a directory link back to its own parent
    prepared = data.prepare(data_config(src, tmp_path / "cache"), show_progress=False)
    assert len(prepared.train) + len(prepared.val) == len("hello loops\n" * 10)

    os.symlink("loop", tmp_path / "loop")
    assert_one_line_error(src, tmp_path / "cache2", data_config(tmp_path / "loop", tmp_path / "cache2"), "symlink loop")


# ------------------------------------------------------------------------------- hypothesis

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=5))
def test_prepare_keeps_every_utf8_byte_of_random_files(blobs):
    """Random byte strings as corpus files: the byte tokenizer keeps every byte of each UTF-8
    file (each once) and skips the rest; no text at all is a UserError."""

    def utf8(blob):
        try:
            blob.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    expected = b"".join(b for b in blobs if utf8(b))
    with tempfile.TemporaryDirectory() as tmp:
        src, cache = pathlib.Path(tmp, "src"), pathlib.Path(tmp, "cache")
        src.mkdir()
        for i, blob in enumerate(blobs):
            (src / f"{i}.txt").write_bytes(blob)
        config = data_config(src, cache)
        if not expected:
            with pytest.raises(UserError):
                data.prepare(config, show_progress=False)
            return
        prepared = data.prepare(config, show_progress=False)
    got = np.concatenate([prepared.train, prepared.val]).astype(np.int64)
    np.testing.assert_array_equal(
        np.bincount(got, minlength=256), np.bincount(np.frombuffer(expected, np.uint8), minlength=256)
    )


@FUZZ
@given(
    raw=st.binary(max_size=48),
    dtype=st.sampled_from(["uint16", "uint32"]),
    vocab_size=st.integers(0, 70_000),
    meta=st.sampled_from([None, "same", "other_dtype", "garbage"]),
)
def test_prepare_copies_random_token_files_exactly_or_refuses(raw, dtype, vocab_size, meta):
    """Random bytes as a token file: either the train then validation tokens are the file's tokens
    in order, or a UserError, exactly when the file cannot be valid."""
    itemsize = np.dtype(dtype).itemsize
    tokens = np.frombuffer(raw[: len(raw) - len(raw) % itemsize], f"<u{itemsize}")
    meta_vocab = int(tokens.max()) + 1 if len(tokens) else 1
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp, "tokens.bin")
        path.write_bytes(raw)
        meta_json = {
            None: None,
            "same": {"vocab_size": meta_vocab, "dtype": dtype},
            "other_dtype": {"vocab_size": meta_vocab, "dtype": "uint16" if dtype == "uint32" else "uint32"},
            "garbage": "{",
        }[meta]
        if meta_json is not None:
            pathlib.Path(tmp, "meta.json").write_text(json.dumps(meta_json) if meta != "garbage" else meta_json)
        effective_vocab = vocab_size or (meta_vocab if meta in ("same", "other_dtype") else 0)
        valid = (
            len(raw) % itemsize == 0
            and len(tokens) > 0
            and meta not in ("garbage", "other_dtype")
            and effective_vocab > int(tokens.max(initial=0))
            and not (vocab_size and meta == "same" and vocab_size != meta_vocab)
        )
        config = data_config(path, pathlib.Path(tmp, "cache"), token_dtype=dtype, vocab_size=vocab_size)
        if not valid:
            with pytest.raises(UserError):
                data.prepare(config, show_progress=False)
            return
        prepared = data.prepare(config, show_progress=False)
        np.testing.assert_array_equal(np.concatenate([prepared.train, prepared.val]), tokens)


# ------------------------------------------------------------------------------- main


@pytest.fixture
def workdir(tmp_path):
    """An existing workdir whose files a failed run must not touch."""
    directory = tmp_path / "run"
    (directory / "checkpoints" / "4").mkdir(parents=True)
    (directory / "checkpoints" / "4" / "state").write_bytes(os.urandom(64))
    (directory / "metrics.jsonl").write_text('{"step": 4, "train/loss_1": 3.0}\n')
    return directory


def run_main(*args):
    return subprocess.run(
        [sys.executable, "-m", "mtp_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def assert_main_refuses(result, workdir, before, match):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0]
    assert tree_digest(workdir) == before


@pytest.mark.parametrize(
    "text, match",
    [
        ("raise RuntimeError('boom')\n", "could not load the config: RuntimeError: boom"),
        ("def get_config(:\n", "could not load the config: SyntaxError"),
    ],
)
def test_config_file_that_raises_is_one_line(tmp_path, workdir, text, match):
    config = tmp_path / "bad_config.py"
    config.write_text(text)
    before = tree_digest(workdir)
    assert_main_refuses(run_main(f"--config={config}", f"--workdir={workdir}"), workdir, before, match)


@pytest.mark.parametrize(
    "override, match",
    [
        ("--config.batch_size=abc", "batch_size"),
        ("--config.learning_rate=fast", "learning_rate"),
        ("--config.model.n_layers=2.5", "n_layers"),
        ("--config.no_such_field=1", "no_such_field"),
    ],
)
def test_override_of_the_wrong_type_is_one_line(workdir, override, match):
    before = tree_digest(workdir)
    assert_main_refuses(
        run_main("--config=configs/mtp3.py:tiny", f"--workdir={workdir}", override), workdir, before, match
    )


@pytest.mark.slow
def test_bad_data_source_through_main_is_one_line(tmp_path, workdir):
    os.symlink("loop", tmp_path / "loop")
    before = tree_digest(workdir)
    result = run_main(
        "--config=configs/mtp3.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.source={tmp_path / 'loop'}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
    )
    assert_main_refuses(result, workdir, before, "is a broken symlink or a symlink loop")
