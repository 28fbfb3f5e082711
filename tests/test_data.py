"""Tests for mtp_jax.data: corpus -> token files -> batches."""

import json
import pathlib
import sysconfig

import ml_collections
import numpy as np
import pytest

from mtp_jax import data
from mtp_jax.data import build, cache
from mtp_jax.errors import UserError


def make_cfg(tmp_path: pathlib.Path, source, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        source=str(source),
        tokenizer="byte",
        vocab_size=0,
        token_dtype="uint32",
        val_fraction=0.2,
        split_seed=0,
        cache_dir=str(tmp_path / "cache"),
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def write_corpus(root: pathlib.Path, n_files: int = 10) -> dict[str, str]:
    """n_files small documents, each with a unique marker so its split can be identified."""
    texts = {
        f"sub{i % 3}/doc{i:02d}.txt": f"document {i} marker-{i:02d}-end\n" + "the quick brown fox. " * (5 + i)
        for i in range(n_files)
    }
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return texts


def prepare(cfg) -> data.TokenData:
    return data.prepare(cfg, show_progress=False)


def split_text(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens, np.uint8)).decode()


# --------------------------------------------------------------------------- tokenization


def test_byte_tokens_are_utf8_bytes_and_round_trip(tmp_path):
    text = "héllo wörld → ünïcode\n" * 20
    (tmp_path / "a.txt").write_text(text)
    d = prepare(make_cfg(tmp_path, tmp_path / "a.txt", val_fraction=0.1))
    tokens = np.concatenate([d.train, d.val])
    assert tokens.tolist() == list(text.encode())
    assert d.vocab_size == 256 and d.train.dtype == np.uint16
    assert d.bytes_per_token == 1.0
    tok = data.load_tokenizer(d.directory)
    assert tok.vocab_size == 256
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0xFF]) == "\ufffd"


def test_single_text_file_splits_last_fraction_by_position(tmp_path):
    text = "abcdefghij" * 100  # 1000 bytes
    (tmp_path / "a.txt").write_text(text)
    d = prepare(make_cfg(tmp_path, tmp_path / "a.txt", val_fraction=0.05))
    assert (len(d.train), len(d.val)) == (950, 50)
    assert split_text(d.val) == text[950:]


def test_bpe_round_trips_and_honours_vocab_size(tmp_path):
    corpus = tmp_path / "corpus"
    texts = write_corpus(corpus, n_files=20)
    d = prepare(make_cfg(tmp_path, corpus, tokenizer="bpe", vocab_size=300))
    tok = data.load_tokenizer(d.directory)
    assert d.vocab_size == 300 and tok.vocab_size == 300
    assert int(max(d.train.max(), d.val.max())) < 300
    assert (d.directory / "tokenizer.json").is_file()
    # Training is deterministic, so every host of a multi-host run gets the same token ids.
    again = prepare(make_cfg(tmp_path / "other", corpus, tokenizer="bpe", vocab_size=300))
    assert again.meta["sha256"] == d.meta["sha256"]
    sample = "the quick brown fox. marker-03 ünïcode"
    assert tok.decode(tok.encode(sample)) == sample
    # Merges learned: BPE is shorter than bytes on the corpus it was trained on.
    assert len(tok.encode("the quick brown fox. " * 4)) < len("the quick brown fox. " * 4) // 2
    # One <|endoftext|> after each document.
    eot = tok.encode(data.EOT)
    assert len(eot) == 1
    assert int((d.train == eot[0]).sum()) == d.meta["n_train_docs"] == 16
    assert int((d.val == eot[0]).sum()) == d.meta["n_val_docs"] == 4
    assert d.meta["val_bytes"] == sum(len(t.encode()) for t in texts.values() if t.split()[2] in tok.decode(d.val))


def test_jsonl_lines_are_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [f"doc {i} " + "x" * i for i in range(10)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n\n")
    d = prepare(make_cfg(tmp_path, path))
    assert (d.meta["n_train_docs"], d.meta["n_val_docs"]) == (8, 2)
    assert len(d.train) + len(d.val) == sum(len(t) for t in docs)


def test_stdlib_source_is_every_py_file_outside_site_packages_in_path_order():
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    source = data.resolve_source("stdlib")
    installed = {p for p in stdlib.glob("*-packages/**/*.py")}
    assert set(source.paths) == {p for p in stdlib.rglob("*.py") if p.is_file()} - installed
    assert len(source.paths) > 500 and stdlib / "json" / "decoder.py" in source.paths
    relative = [p.relative_to(stdlib).as_posix() for p in source.paths]
    assert relative == sorted(relative)


def test_one_stdlib_package_is_a_small_corpus_of_exactly_its_files(tmp_path):
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "json"
    size = sum(len(p.read_bytes()) for p in root.rglob("*.py"))
    d = prepare(make_cfg(tmp_path, "stdlib/json"))
    assert len(d.train) + len(d.val) == size  # bytes: every file of the package, nothing else
    assert d.meta["val_bytes"] == d.meta["n_val_tokens"] == len(d.val)
    with pytest.raises(UserError, match="no package 'nonexistent'.*e.g. stdlib/email"):
        prepare(make_cfg(tmp_path, "stdlib/nonexistent"))


def test_several_stdlib_packages_are_exactly_their_files(tmp_path):
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    source = data.resolve_source("stdlib/json,tomllib")
    expected = {p for name in ("json", "tomllib") for p in (stdlib / name).rglob("*.py")}
    assert set(source.paths) == expected and len(source.paths) == len(expected)
    relative = [p.relative_to(stdlib).as_posix() for p in source.paths]
    assert relative == sorted(relative)
    with pytest.raises(UserError, match="no package 'nonexistent'.*stdlib/email,json"):
        data.resolve_source("stdlib/json,nonexistent")


# --------------------------------------------------------------------------- split


def test_train_and_val_are_disjoint_by_file_and_fixed_by_split_seed(tmp_path):
    corpus = tmp_path / "corpus"
    texts = write_corpus(corpus, n_files=10)
    markers = [t.split()[2] for t in texts.values()]

    def val_markers(seed):
        d = prepare(make_cfg(tmp_path, corpus, split_seed=seed))
        train, val = split_text(d.train), split_text(d.val)
        assert not [m for m in markers if m in train and m in val]
        assert sorted(m for m in markers if m in train or m in val) == sorted(markers)
        return {m for m in markers if m in val}

    seed0 = val_markers(0)
    assert len(seed0) == 2
    (next(iter((tmp_path / "cache").iterdir()))).rename(tmp_path / "moved")  # force a rebuild
    assert val_markers(0) == seed0
    assert any(val_markers(s) != seed0 for s in (1, 2, 3))


def test_train_extra_adds_training_files_and_keeps_the_split(tmp_path):
    corpus = tmp_path / "corpus"
    markers = [t.split()[2] for t in write_corpus(corpus, n_files=10).values()]
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "more.txt").write_text("extra marker-xx-end\n")
    alone = prepare(make_cfg(tmp_path, corpus))
    # The glob matches data.source's files too: none is read twice, none held out is trained on.
    both = prepare(make_cfg(tmp_path, corpus, train_extra=str(tmp_path / "**" / "*.txt")))
    assert np.array_equal(both.val, alone.val)
    train, train_alone = split_text(both.train), split_text(alone.train)
    assert train.count("marker-xx-end") == 1
    assert [train.count(m) for m in markers] == [train_alone.count(m) for m in markers]
    assert sum(train_alone.count(m) for m in markers) == 8
    assert both.meta["n_train_docs"] == alone.meta["n_train_docs"] + 1


def test_train_extra_beside_anything_but_files_is_refused(tmp_path):
    write_corpus(tmp_path / "corpus", n_files=4)
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "shard.bin").write_bytes(np.arange(64, dtype=np.uint16).tobytes())
    refused = r"data.train_extra=.*adds files to a source of files, and .* is not one"
    with pytest.raises(UserError, match=refused):  # one text file as the extra
        prepare(make_cfg(tmp_path, tmp_path / "corpus", train_extra=str(tmp_path / "a.txt")))
    with pytest.raises(UserError, match=refused):  # token shards as the source
        prepare(make_cfg(tmp_path, tmp_path / "*.bin", train_extra=str(tmp_path / "corpus")))


def test_non_utf8_files_are_skipped_and_counted(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, n_files=4)
    (corpus / "blob.dat").write_bytes(b"\xff\xfe\x00binary")
    (corpus / ".git").mkdir()
    (corpus / ".git" / "HEAD").write_text("hidden files are not corpus\n")
    d = prepare(make_cfg(tmp_path, corpus, val_fraction=0.25))
    assert d.meta["n_train_docs"] + d.meta["n_val_docs"] == 4
    assert "Skipped 1 files" in caplog.text


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_without_rebuilding(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    cfg = make_cfg(tmp_path, corpus)
    first = prepare(cfg)
    builds = []
    monkeypatch.setattr(cache, "build", lambda *a: builds.append(a))
    second = prepare(cfg)
    assert builds == []
    assert second.directory == first.directory
    assert np.array_equal(second.train, first.train)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_cache_key_changes_with_settings_and_source(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    dirs = {prepare(make_cfg(tmp_path, corpus)).directory}
    dirs.add(prepare(make_cfg(tmp_path, corpus, split_seed=1)).directory)
    dirs.add(prepare(make_cfg(tmp_path, corpus, val_fraction=0.3)).directory)
    (corpus / "new.txt").write_text("a new file\n")
    dirs.add(prepare(make_cfg(tmp_path, corpus)).directory)
    assert len(dirs) == 4


def test_truncated_cache_is_rebuilt(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    cfg = make_cfg(tmp_path, corpus)
    good = prepare(cfg)
    expected = np.array(good.train)
    with open(good.directory / "train.bin", "r+b") as f:
        f.truncate(10)
    rebuilt = prepare(cfg)
    assert "Rebuilding data cache" in caplog.text
    assert np.array_equal(rebuilt.train, expected)
    assert (rebuilt.directory / "train.bin").stat().st_size == 2 * len(expected)


def test_leftover_temp_dir_from_killed_build_is_not_used(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    cfg = make_cfg(tmp_path, corpus)
    good = prepare(cfg)
    expected = np.array(good.train)
    name = good.directory.name
    good.directory.rename(tmp_path / "moved")
    # What a kill -9 mid-build leaves: a temp dir named after a dead pid, with half the files.
    stale = tmp_path / "cache" / f".tmp-{name}-4194305-abc"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\x00" * 6)
    (stale / "meta.json").write_text("{}")
    d = prepare(cfg)
    assert d.directory.name == name
    assert np.array_equal(d.train, expected)
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [name]


def test_build_that_loses_the_publish_race_uses_the_winners_cache(tmp_path, monkeypatch):
    """Two processes build the same cache (e.g. a parallel sweep's first runs); the second finds
    no cache when it checks, and the first's by the time it renames its own into place."""
    import shutil

    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    winner = prepare(make_cfg(tmp_path, corpus))
    loser_build = tmp_path / "cache" / f".tmp-{winner.directory.name}-1-x"
    shutil.copytree(winner.directory, loser_build)
    real_exists = pathlib.Path.exists
    monkeypatch.setattr(pathlib.Path, "exists", lambda self: False if self == winner.directory else real_exists(self))
    cache.publish(loser_build, winner.directory)  # the rename fails: the winner's cache is in place
    monkeypatch.undo()
    assert cache.cache_problem(winner.directory) is None
    assert np.array_equal(prepare(make_cfg(tmp_path, corpus)).train, winner.train)


def test_failed_build_leaves_no_cache_and_source_untouched(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    before = {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file()}

    def explode(*args):
        raise KeyboardInterrupt  # stands in for a crash mid-build

    monkeypatch.setattr(build, "_write_split", explode)
    with pytest.raises(KeyboardInterrupt):
        prepare(make_cfg(tmp_path, corpus))
    assert list((tmp_path / "cache").iterdir()) == []
    assert {p: p.read_bytes() for p in corpus.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- token files


@pytest.mark.parametrize("dtype,vocab,out_dtype", [("uint32", 70_000, np.uint32), ("uint16", 1000, np.uint16)])
def test_token_file_loads_with_ids_as_written(tmp_path, dtype, vocab, out_dtype):
    ids = np.random.default_rng(0).integers(0, vocab, size=1000).astype(dtype)
    path = tmp_path / "tokens.bin"
    ids.astype("<" + np.dtype(dtype).str[1:]).tofile(path)
    d = prepare(make_cfg(tmp_path, path, tokenizer="ignored", token_dtype=dtype, vocab_size=vocab, val_fraction=0.1))
    assert (len(d.train), len(d.val)) == (900, 100)
    assert np.array_equal(np.concatenate([d.train, d.val]), ids)
    assert d.train.dtype == out_dtype
    assert d.vocab_size == vocab and d.bytes_per_token is None
    assert path.read_bytes() == ids.tobytes()


def test_token_file_vocab_size_read_from_meta_json(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(100, dtype="<u4").tofile(path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 128, "dtype": "uint32"}))
    d = prepare(make_cfg(tmp_path, path, vocab_size=0))
    assert d.vocab_size == 128
    assert d.meta["n_train_tokens"] == 80


# --------------------------------------------------------------------------- batches


def test_local_batch_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(window_len=9, batch_size=8, seed=3)
    a = data.local_batch(tokens, step=5, **kw)
    assert a.shape == (8, 9) and a.dtype == np.int32
    assert np.array_equal(a, data.local_batch(tokens, step=5, **kw))
    assert not np.array_equal(a, data.local_batch(tokens, step=6, **kw))
    assert not np.array_equal(a, data.local_batch(tokens, step=5, window_len=9, batch_size=8, seed=4))
    starts = data.global_batch_starts(len(tokens), step=5, **kw)
    for row, start in zip(a, starts):
        assert np.array_equal(row, tokens[start : start + 9])
    many = np.concatenate([data.global_batch_starts(len(tokens), step=s, **kw) for s in range(500)])
    assert many.min() >= 0 and many.max() <= len(tokens) - 9


@pytest.mark.parametrize("num_epochs", [0, 2])
def test_two_processes_together_see_the_one_process_batch(num_epochs):
    tokens = np.arange(5000, dtype=np.uint32)
    kw = dict(window_len=17, batch_size=8, seed=1, step=7, num_epochs=num_epochs)
    whole = data.local_batch(tokens, **kw)
    halves = [data.local_batch(tokens, process_index=p, process_count=2, **kw) for p in range(2)]
    assert halves[0].shape == (4, 17)
    assert np.array_equal(np.concatenate(halves), whole)


def test_epoch_mode_visits_every_window_once_per_epoch():
    n_tokens, window, batch_size = 1000, 10, 7
    n_windows = data.num_windows(n_tokens, window)
    per_epoch = data.steps_per_epoch(n_tokens, window_len=window, batch_size=batch_size)
    assert (n_windows, per_epoch) == (100, 14)
    kw = dict(window_len=window, batch_size=batch_size, seed=0, num_epochs=2)
    epochs = [
        np.concatenate(
            [data.global_batch_starts(n_tokens, step=s, **kw) for s in range(e * per_epoch, (e + 1) * per_epoch)]
        )
        for e in range(2)
    ]
    for starts in epochs:
        assert len(starts) == len(set(starts.tolist())) == 98  # 2 leftover windows dropped
        assert set(starts.tolist()) <= set(range(0, 1000, 10))
    assert not np.array_equal(epochs[0], epochs[1])


def test_eval_windows_are_fixed_and_evenly_spaced():
    val = np.arange(1000, dtype=np.uint16)
    w = data.eval_windows(val, window_len=10, batch_size=4, num_batches=3)
    assert w.shape == (3, 4, 10) and w.dtype == np.int32
    assert np.array_equal(w, data.eval_windows(val, window_len=10, batch_size=4, num_batches=3))
    starts = w[:, :, 0].ravel()
    assert starts[0] == 0 and starts[-1] == 990
    assert np.all(np.abs(np.diff(starts) - 90) <= 1)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "source_kind,overrides,message",
    [
        ("missing", {}, "does not exist"),
        ("empty_dir", {}, "contains no files"),
        ("glob", {}, "matches no files"),
        ("empty_file", {}, "holds no UTF-8 text"),
        ("binary_dir", {}, "holds no text"),
        ("text", {"tokenizer": "wordpiece"}, "data.tokenizer='wordpiece' is not supported"),
        ("text", {"vocab_size": 512}, "data.vocab_size=512 is invalid for tokenizer='byte'"),
        ("text", {"tokenizer": "bpe", "vocab_size": 100}, "data.vocab_size=100 is invalid for tokenizer='bpe'"),
        ("text", {"val_fraction": 0.0}, "data.val_fraction=0.0 must be in (0, 1)"),
        ("bad_jsonl", {}, "bad.jsonl:2 is not a JSON object with a 'text' field (its fields: 'body')"),
        ("number_jsonl", {}, "number.jsonl:2: its 'text' is a number, not a string: fix that line"),
        ("binary_jsonl", {}, "binary.jsonl:1 is not UTF-8 text: binary.jsonl is not JSONL"),
        ("odd_bin", {"vocab_size": 100}, "not a multiple of 4"),
        ("bin", {"vocab_size": 50}, "token id 99 >= vocab_size=50"),
        ("bin", {"vocab_size": 0}, "no vocab_size in"),
        ("bin_meta", {"vocab_size": 200}, "says vocab_size=128 but data.vocab_size=200"),
        ("bin_meta", {"token_dtype": "uint16"}, "says dtype='uint32' but data.token_dtype='uint16'"),
        ("bin", {"vocab_size": 128, "token_dtype": "int8"}, "data.token_dtype='int8' is not supported"),
    ],
)
def test_bad_input_raises_user_error_naming_the_problem(tmp_path, source_kind, overrides, message):
    src = tmp_path / "src"
    src.mkdir()
    source = {
        "missing": tmp_path / "nope",
        "empty_dir": tmp_path / "empty",
        "glob": src / "*.nothing",
        "empty_file": src / "empty.txt",
        "binary_dir": tmp_path / "binary",
        "text": src / "a.txt",
        "bad_jsonl": src / "bad.jsonl",
        "number_jsonl": src / "number.jsonl",
        "binary_jsonl": src / "binary.jsonl",
        "odd_bin": src / "odd.bin",
        "bin": src / "t.bin",
        "bin_meta": src / "t.bin",
    }[source_kind]
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary").mkdir()
    for i in range(3):
        (tmp_path / "binary" / f"{i}.dat").write_bytes(b"\xff\xfe" * (i + 1))
    (src / "empty.txt").write_text("")
    (src / "a.txt").write_text("some text\n" * 10)
    (src / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (src / "number.jsonl").write_text('{"text": "ok"}\n{"text": 42}\n')
    (src / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n")
    (src / "odd.bin").write_bytes(b"\x00" * 7)
    np.arange(100, dtype="<u4").tofile(src / "t.bin")
    if source_kind == "bin_meta":
        (src / "meta.json").write_text(json.dumps({"vocab_size": 128, "dtype": "uint32"}))
    with pytest.raises(UserError) as e:
        prepare(make_cfg(tmp_path, source, **overrides))
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not [
        p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")
    ]


def test_corpus_shorter_than_a_window_fails_check_fits(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    d = prepare(make_cfg(tmp_path, tmp_path / "a.txt", val_fraction=0.1))
    data.check_fits(d, window_len=10)
    with pytest.raises(UserError, match="validation split has 10 tokens, fewer than one window of 11"):
        data.check_fits(d, window_len=11)
    with pytest.raises(UserError, match="train split has 90 tokens.*smaller seq_len"):
        data.check_fits(d, window_len=91)


def test_batch_errors_name_the_problem():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(UserError, match="batch_size=6 is not divisible by process_count=4"):
        data.local_batch(tokens, window_len=10, batch_size=6, seed=0, step=0, process_count=4)
    with pytest.raises(UserError, match="10 windows of 10 tokens, fewer than batch_size=16"):
        data.local_batch(tokens, window_len=10, batch_size=16, seed=0, step=0, num_epochs=1)
    with pytest.raises(UserError, match="train split has 100 tokens"):
        data.local_batch(tokens, window_len=101, batch_size=2, seed=0, step=0)


def test_token_file_dataset_has_no_tokenizer(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(100, dtype="<u4").tofile(path)
    d = prepare(make_cfg(tmp_path, path, vocab_size=100))
    with pytest.raises(UserError, match="no tokenizer for a token-file dataset"):
        data.load_tokenizer(d.directory)
