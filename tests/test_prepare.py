"""python -m mtp_jax.prepare: text, JSONL and parquet -> llm.c shards, in parallel, resumable."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tokenizers

from mtp_jax import prepare as prepare_lib
from mtp_jax import train
from mtp_jax.data import shards
from mtp_jax.errors import UserError
from mtp_jax.metrics import read_metrics
from tests.util import ROOT, load_config

DOCS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 7) for i in range(60)]


def write_jsonl(path: pathlib.Path, docs=DOCS, field: str = "text") -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2  # two files, so the order across files counts
    for i, part in enumerate((docs[:half], docs[half:])):
        (path / f"part{i}.jsonl").write_text(
            "".join(json.dumps({field: d, "id": j}) + "\n" for j, d in enumerate(part))
        )
    return path


def settings(source, out, **kw) -> prepare_lib.Settings:
    kw = {"tokenizer": "byte", "shard_tokens": 1000, "val_docs": 5, **kw}
    return prepare_lib.Settings(source=str(source), out=out, **kw)


def read_shards(paths) -> list[np.ndarray]:
    """Each shard's ids, read by the header layout llm.c documents (not by mtp_jax)."""
    out = []
    for path in paths:
        raw = pathlib.Path(path).read_bytes()
        magic, version, n = np.frombuffer(raw[:12], "<i4")
        assert (magic, version) == (20240520, 1)
        ids = np.frombuffer(raw[1024:], "<u2")
        assert len(ids) == n
        out.append(ids)
    return out


def shard_bytes(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def test_byte_shards_hold_every_document_in_order_split_at_val_docs(tmp_path):
    meta = prepare_lib.prepare(
        settings(write_jsonl(tmp_path / "src") / "*.jsonl", tmp_path / "out"), show_progress=False
    )
    train_ids = read_shards(sorted((tmp_path / "out").glob("train_*.bin")))
    val_ids = read_shards(sorted((tmp_path / "out").glob("val_*.bin")))
    assert [len(s) for s in train_ids[:-1]] == [1000] * (len(train_ids) - 1) and 0 < len(train_ids[-1]) <= 1000
    assert bytes(np.concatenate(val_ids).astype(np.uint8)).decode() == "".join(DOCS[:5])
    assert bytes(np.concatenate(train_ids).astype(np.uint8)).decode() == "".join(DOCS[5:])
    assert (meta["n_val_docs"], meta["n_train_docs"], meta["eot_id"], meta["vocab_size"]) == (5, 55, None, 256)
    assert meta["val_bytes"] == meta["n_val_tokens"] == sum(len(d) for d in DOCS[:5])
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_bpe_shards_end_each_document_with_endoftext_and_two_workers_write_the_same(tmp_path):
    source = write_jsonl(tmp_path / "src") / "*.jsonl"
    one = prepare_lib.prepare(settings(source, tmp_path / "one", tokenizer="bpe", vocab_size=300), show_progress=False)
    two = prepare_lib.prepare(
        settings(source, tmp_path / "two", tokenizer="bpe", vocab_size=300, workers=2), show_progress=False
    )
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert one == two
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "one" / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    assert one["eot_id"] == eot and one["tokenizer"] == "bpe"
    expected = np.concatenate([tok.encode(d).ids + [eot] for d in DOCS[5:]])
    assert np.array_equal(np.concatenate(read_shards(sorted((tmp_path / "one").glob("train_*.bin")))), expected)


def test_resume_after_an_interruption_mid_shard_writes_the_same_shards(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "src") / "*.jsonl"
    prepare_lib.prepare(settings(source, tmp_path / "whole", shard_tokens=700), show_progress=False)
    real_write, calls = prepare_lib.ShardWriter.write, []

    def killed_mid_shard(self, split, doc, offset):
        calls.append(split)
        if len(calls) == 4:  # the fourth shard: half written to its temporary name, then killed
            (self.out / f".{split}_{len(self.progress['shards'][split]):06d}.bin.tmp").write_bytes(b"\x01" * 99)
            raise KeyboardInterrupt
        real_write(self, split, doc, offset)

    monkeypatch.setattr(prepare_lib.ShardWriter, "write", killed_mid_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.prepare(settings(source, tmp_path / "resumed", shard_tokens=700), show_progress=False)
    monkeypatch.undo()
    assert len(list((tmp_path / "resumed").glob("*.bin"))) == 3
    prepare_lib.prepare(settings(source, tmp_path / "resumed", shard_tokens=700), show_progress=False)
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "whole")
    assert json.loads((tmp_path / "resumed" / "meta.json").read_text()) == json.loads(
        (tmp_path / "whole" / "meta.json").read_text()
    )


def test_resume_after_kill_9_mid_run_writes_the_same_shards(tmp_path):
    """The real interruption: the command's process group is killed with SIGKILL once its first
    shards are on disk, then the same command is run again."""
    docs = [f"doc {i} " + "x = [i * i for i in range(10)]\n" * (50 + i % 40) for i in range(4000)]
    source = write_jsonl(tmp_path / "src", docs) / "*.jsonl"
    command = [
        sys.executable,
        "-m",
        "mtp_jax.prepare",
        f"--source={source}",
        "--tokenizer=byte",
        "--shard_tokens=20000",
        "--val_docs=5",
        "--workers=2",
    ]
    subprocess.run(command + [f"--out={tmp_path / 'whole'}"], check=True, cwd=ROOT, capture_output=True)
    total = len(shard_bytes(tmp_path / "whole"))
    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        command + [f"--out={resumed}"],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list(resumed.glob("train_*.bin"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 0 < len(list(resumed.glob("*.bin"))) < total  # killed mid-run, not after it
    subprocess.run(command + [f"--out={resumed}"], check=True, cwd=ROOT, capture_output=True)
    assert shard_bytes(resumed) == shard_bytes(tmp_path / "whole")
    assert json.loads((resumed / "meta.json").read_text()) == json.loads((tmp_path / "whole" / "meta.json").read_text())
    assert not list(resumed.glob(".*"))  # no temporary file left behind


def test_parquet_rows_are_documents_like_jsonl_lines(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": list(range(60)), "content": DOCS}), tmp_path / "pq" / "a.parquet", row_group_size=7)
    prepare_lib.prepare(
        settings(tmp_path / "pq" / "*.parquet", tmp_path / "from_parquet", text_field="content"), show_progress=False
    )
    prepare_lib.prepare(
        settings(write_jsonl(tmp_path / "src") / "*.jsonl", tmp_path / "from_jsonl"), show_progress=False
    )
    assert shard_bytes(tmp_path / "from_parquet") == shard_bytes(tmp_path / "from_jsonl")
    with pytest.raises(UserError, match=r"a.parquet has no column 'text' \(it has id, content\): pass --text_field"):
        prepare_lib.prepare(settings(tmp_path / "pq" / "*.parquet", tmp_path / "no_column"), show_progress=False)


def tree(root: pathlib.Path) -> dict:
    """Every path under `root` with its size, time and mode: what a refused command must not change."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(root.rglob("*"))
    }


def refused(args: list[str], capsys) -> str:
    """prepare's one error line for `args`, checked to be the only output and to exit with 2."""
    with pytest.raises(SystemExit) as e:
        prepare_lib.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def unreadable(path: pathlib.Path) -> pathlib.Path:
    """A path whose reading fails: a file without read permission, or, for root, who reads any
    file, a folder."""
    path.write_text("{}")
    path.chmod(0)
    if os.access(path, os.R_OK):
        path.unlink()
        path.mkdir()
    return path


def read_only_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder no one can make anything in: a 0555 one, or, for root, sysfs."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder = pathlib.Path("/sys")
        if not folder.is_dir():
            pytest.skip("running as root without /sys: no folder is unwritable")
    return folder


def jsonl_line(src: pathlib.Path, name: str, line: int, text: str) -> None:
    """Replaces line `line` (from 1) of src/name with `text`."""
    lines = (src / name).read_text().splitlines()
    lines[line - 1] = text
    (src / name).write_text("\n".join(lines) + "\n")


def write_parquet(path: pathlib.Path, column, type_=None) -> pathlib.Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": pa.array(column, type_ and getattr(pa, type_)())}), path)
    return path


JSON_VALUES = {"null": "null", "a number": "42", "a list": '["x", "y"]', "an object": '{"x": 1}'}


def make_bad(case: str, tmp_path: pathlib.Path, flags: dict) -> None:
    """Breaks the source folder (tmp_path/src), --out or `flags` as `case` says."""
    src, out = tmp_path / "src", flags["out"]
    if case == "empty glob":
        flags["source"] = src / "*.parquet"
    elif case == "bad line":
        jsonl_line(src, "part0.jsonl", 3, "{bad")
    elif case == "too few documents":
        flags["val_docs"] = 60
    elif case == "no such text field":
        flags["text_field"] = "body"
    elif case == "foreign out":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    elif case == "unknown tokenizer":
        flags["tokenizer"] = "wordpiece"
    elif case == "binary file named .jsonl":
        (src / "part1.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    elif case == "0-byte parquet":
        (src / "a.parquet").write_bytes(b"")
        flags["source"] = src / "*"
    elif case == "zero-row parquet":
        flags["source"] = write_parquet(tmp_path / "a.parquet", [], "string")
    elif case == "parquet column of numbers":
        flags["source"] = write_parquet(tmp_path / "a.parquet", [1, 2])
    elif case == "out in a read-only folder":
        flags["out"] = read_only_folder(tmp_path) / "new" / "out"
    elif case == "corrupt progress.json":
        out.mkdir()
        (out / "progress.json").write_text('{"identity": [')
    elif case.startswith("--bpe_docs="):
        flags.update(tokenizer="bpe", bpe_docs=case.split("=")[1])
    elif case == "unreadable tokenizer.json":
        flags["tokenizer"] = unreadable(tmp_path / "tok.json")
    elif case == "tokenizer.json not JSON":
        (tmp_path / "tok.json").write_text("{not json")
        flags["tokenizer"] = tmp_path / "tok.json"
    elif case.startswith("JSONL text "):
        jsonl_line(src, "part0.jsonl", 1, f'{{"text": {JSON_VALUES[case.removeprefix("JSONL text ")]}}}')


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty glob", "matches no files: fix the glob pattern"),
        ("bad line", "part0.jsonl:3 is not a JSON object with a 'text' field (not JSON: "),
        ("too few documents", "has 60 documents, no more than --val_docs=60: lower --val_docs"),
        (
            "no such text field",
            (
                "part0.jsonl:1 is not a JSON object with a 'body' field (its fields: 'text', 'id'): "
                "fix that line, or pass --text_field"
            ),
        ),
        ("foreign out", "exists and was not written by prepare"),
        ("unknown tokenizer", "--tokenizer='wordpiece' is not 'byte', 'bpe' or an existing tokenizer.json"),
        ("binary file named .jsonl", "part1.jsonl:1 is not UTF-8 text: part1.jsonl is not JSONL"),
        ("0-byte parquet", "a.parquet is not a parquet file ("),
        ("zero-row parquet", "holds no documents (its files are empty): pass files with text"),
        ("parquet column of numbers", "a.parquet's column 'text' holds int64, not text: pass --text_field"),
        ("out in a read-only folder", "/new/out ("),
        ("corrupt progress.json", "progress.json is not the record prepare writes (damaged or written by something"),
        ("--bpe_docs=-3", "--bpe_docs=-3 must be at least 1"),
        ("--bpe_docs=0", "--bpe_docs=0 must be at least 1"),
        ("unreadable tokenizer.json", "tok.json' cannot be read ("),
        ("tokenizer.json not JSON", "tok.json' is not a tokenizer.json ("),
        *[
            (f"JSONL text {kind}", f"part0.jsonl:1: its 'text' is {kind}, not a string: fix that line")
            for kind in JSON_VALUES
        ],
    ],
)
def test_bad_input_exits_2_with_one_line_before_out_is_made(tmp_path, capsys, monkeypatch, case, message):
    write_jsonl(tmp_path / "src")
    flags = {"source": tmp_path / "src" / "*.jsonl", "tokenizer": "byte", "out": tmp_path / "out", "val_docs": 5}
    make_bad(case, tmp_path, flags)
    before = tree(tmp_path)
    monkeypatch.setattr(prepare_lib, "write_shards", lambda *a: pytest.fail("refused after --out was made"))
    error = refused([f"--{name}={value}" for name, value in flags.items()], capsys)
    assert message in error
    assert "--val_docs" not in error or case == "too few documents"
    assert tree(tmp_path) == before


def test_a_refusal_deep_in_the_corpus_leaves_no_out_and_the_corrected_command_runs(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "src")
    out = tmp_path / "new" / "out"
    args = [
        f"--source={src / '*.jsonl'}",
        "--tokenizer=bpe",
        "--vocab_size=300",
        "--bpe_docs=20",
        f"--out={out}",
        "--val_docs=5",
        "--shard_tokens=500",
    ]
    jsonl_line(src, "part1.jsonl", 20, '{"text": 42}')  # document 50
    monkeypatch.setattr(prepare_lib, "_CHUNK_CHARS", 1)  # a document per chunk: shards are written before it
    real_write, shards_written = prepare_lib.ShardWriter.write, []

    def counted_write(self, *args):
        shards_written.append(args)
        real_write(self, *args)

    monkeypatch.setattr(prepare_lib.ShardWriter, "write", counted_write)
    assert (
        refused(args, capsys) == f"error: {src / 'part1.jsonl'}:20: its 'text' is a number, not a string: fix that line"
    )
    assert len(shards_written) > 3 and not (tmp_path / "new").exists()
    jsonl_line(src, "part1.jsonl", 20, json.dumps({"text": DOCS[49]}))
    prepare_lib.main(args)
    prepare_lib.prepare(
        settings(src / "*.jsonl", tmp_path / "whole", tokenizer="bpe", vocab_size=300, bpe_docs=20, shard_tokens=500),
        show_progress=False,
    )
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")


def test_a_resumed_run_that_is_refused_keeps_its_out(tmp_path, capsys, monkeypatch):
    """An --out holding an interrupted run's shards was there before the command: a refusal leaves it."""
    src = write_jsonl(tmp_path / "src")
    args = [f"--source={src / '*.jsonl'}", "--tokenizer=byte", f"--out={tmp_path / 'out'}", "--val_docs=5"]

    def raises(error):
        def function(*args):
            raise error

        return function

    monkeypatch.setattr(prepare_lib, "encoded", raises(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare_lib.main(args)
    before = tree(tmp_path / "out")
    assert "progress.json" in before
    monkeypatch.setattr(prepare_lib, "encoded", raises(UserError("a broken line, met while tokenizing")))
    assert refused(args, capsys) == "error: a broken line, met while tokenizing"
    assert tree(tmp_path / "out") == before


def test_prepared_shards_train_with_the_document_mask(tmp_path):
    out = tmp_path / "shards"
    meta = prepare_lib.prepare(
        settings(
            write_jsonl(tmp_path / "src") / "*.jsonl",
            out,
            tokenizer="bpe",
            vocab_size=300,
            shard_tokens=2000,
            val_docs=10,
        ),
        show_progress=False,
    )
    config = load_config(
        "mtp3",
        "tiny",
        {
            "data.source": str(out / "train_*.bin"),
            "data.val_source": str(out / "val_*.bin"),
            "data.vocab_size": 0,
            "data.document_mask": True,
            "data.cache_dir": str(tmp_path / "cache"),
            "num_train_steps": 3,
            "eval_batches": 1,
            "sample_tokens": 0,
            "log_every": 1,
        },
    )
    final = train.run(config, tmp_path / "run")
    assert meta["vocab_size"] == 300
    assert np.isfinite(final["eval/loss_3"])
    assert [e["step"] for e in read_metrics(tmp_path / "run") if "train/loss_1" in e] == [1, 2, 3]
    assert shards.has_header(out / "train_000000.bin")
