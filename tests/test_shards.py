"""Token shards in the llm.c format as a data source: read back, sampled, checked, never read whole."""

import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tokenizers

from mtp_jax import data, mtp
from mtp_jax.errors import UserError
from tests.util import ROOT, load_config


def write_shard(
    path: pathlib.Path, ids, magic: int = 20240520, version: int = 1, dtype: str = "<u2", claimed: int | None = None
) -> None:
    """The layout llm.c documents, written without mtp_jax: 256 little-endian int32 (magic,
    version, token count, zeros), then the ids."""
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(ids) if claimed is None else claimed
    path.write_bytes(header.tobytes() + np.asarray(ids).astype(dtype).tobytes())


def shard_cfg(tmp_path: pathlib.Path, source, val_source, **overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        source=str(source),
        val_source=str(val_source),
        tokenizer="byte",
        vocab_size=1000,
        token_dtype="uint16",
        val_fraction=0.1,
        split_seed=0,
        cache_dir=str(tmp_path / "cache"),
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def write_split(root: pathlib.Path, split: str, sizes, seed: int = 0, **kw) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [rng.integers(0, 1000, size=n) for n in sizes]
    for i, shard_ids in enumerate(ids):
        write_shard(root / f"{split}_{i:06d}.bin", shard_ids, **kw)
    return ids


def prepare(tmp_path, **overrides) -> data.TokenData:
    return data.prepare(
        shard_cfg(tmp_path, tmp_path / "d" / "train_*.bin", tmp_path / "d" / "val_*.bin", **overrides),
        show_progress=False,
    )


@pytest.mark.parametrize("magic,version,dtype", [(20240520, 1, "<u2"), (20240801, 7, "<u4")])
def test_shards_read_back_exactly_as_written(tmp_path, magic, version, dtype):
    train = write_split(tmp_path / "d", "train", [300, 50, 120], magic=magic, version=version, dtype=dtype)
    val = write_split(tmp_path / "d", "val", [80], seed=1, magic=magic, version=version, dtype=dtype)
    d = prepare(tmp_path)
    assert data.lengths(d.train) == (300, 50, 120) and data.lengths(d.val) == (80,)
    assert np.array_equal(d.train[0:470], np.concatenate(train))
    assert np.array_equal(d.train[290:310], np.concatenate(train)[290:310])  # a slice across two shards
    assert np.array_equal(d.val[:], val[0])
    assert d.vocab_size == 1000 and d.train.dtype == np.dtype(dtype)
    # The cache holds a record of the check, not a copy: the shards are mapped where they lie.
    assert not (d.directory / "train.bin").exists()
    again = prepare(tmp_path)
    assert again.directory == d.directory and np.array_equal(again.train[0:470], d.train[0:470])


def test_headerless_shards_use_token_dtype(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    ids = np.arange(200) % 1000
    ids.astype("<u4").tofile(root / "train_0.bin")
    ids[:50].astype("<u4").tofile(root / "val_0.bin")
    d = prepare(tmp_path, token_dtype="uint32")
    assert np.array_equal(d.train[:], ids) and len(d.val) == 50


def test_windows_never_span_shards_and_an_epoch_visits_every_window_of_every_shard():
    pieces, window_len = (50, 37, 100), 10
    per_piece = [n // window_len for n in pieces]  # non-overlapping windows, the partial one dropped
    assert data.num_windows(pieces, window_len) == sum(per_piece) == 18
    offsets = np.cumsum((0,) + pieces)
    expected = {int(offsets[j]) + i * window_len for j, n in enumerate(per_piece) for i in range(n)}
    starts = np.concatenate(
        [
            data.global_batch_starts(pieces, window_len=window_len, batch_size=3, seed=0, step=s, num_epochs=1)
            for s in range(6)
        ]
    )
    assert sorted(starts.tolist()) == sorted(expected)
    random = np.concatenate(
        [data.global_batch_starts(pieces, window_len=window_len, batch_size=64, seed=1, step=s) for s in range(50)]
    )
    piece = np.searchsorted(offsets, random, side="right") - 1
    assert np.all(random + window_len <= offsets[piece + 1])  # inside the piece it starts in
    assert set(random.tolist()) == {
        int(offsets[j]) + i for j, n in enumerate(pieces) for i in range(n - window_len + 1)
    }


def test_sampling_covers_shards_in_proportion_to_their_windows():
    pieces, window_len = (1000, 3000, 6000), 10
    starts = np.concatenate(
        [data.global_batch_starts(pieces, window_len=window_len, batch_size=64, seed=0, step=s) for s in range(300)]
    )
    share = np.bincount(np.searchsorted(np.cumsum(pieces), starts, side="right"), minlength=3) / len(starts)
    expected = np.array([n - window_len + 1 for n in pieces]) / sum(n - window_len + 1 for n in pieces)
    np.testing.assert_allclose(share, expected, atol=0.015)  # 19,200 draws: 3 s.e. is about 0.011


def test_one_piece_is_the_single_stream_sampler():
    kw = dict(window_len=20, batch_size=16, seed=3, step=5)
    for num_epochs in (0, 2):
        assert np.array_equal(
            data.global_batch_starts([1000], num_epochs=num_epochs, **kw),
            data.global_batch_starts(1000, num_epochs=num_epochs, **kw),
        )


def test_batches_from_shards_are_the_windows_at_the_sampled_starts(tmp_path):
    train = np.concatenate(write_split(tmp_path / "d", "train", [64, 200, 33]))
    write_split(tmp_path / "d", "val", [40, 40], seed=1)
    d = prepare(tmp_path)
    kw = dict(window_len=17, batch_size=8, seed=2, step=3)
    batch = data.local_batch(d.train, **kw)
    starts = data.global_batch_starts(data.lengths(d.train), **kw)
    assert batch.dtype == np.int32
    assert np.array_equal(batch, np.stack([train[s : s + 17] for s in starts]))
    halves = [data.local_batch(d.train, process_index=p, process_count=2, **kw) for p in range(2)]
    assert np.array_equal(np.concatenate(halves), batch)
    windows = data.eval_windows(d.val, window_len=17, batch_size=2, num_batches=2)
    assert windows.shape == (2, 2, 17)


def corrupt(root: pathlib.Path, case: str) -> str:
    """Breaks the shards under root one way; returns the text the error must contain."""
    bad = root / "train_000001.bin"
    if case == "wrong magic":
        bad.write_bytes(b"\x00" * 4 + bad.read_bytes()[4:])
        return f"token shard {bad} does not start with an llm.c magic"
    if case == "truncated":
        write_shard(bad, np.arange(100), claimed=150)
        return f"token shard {bad}: its header says 150 tokens but the file holds 200 bytes"
    if case == "id >= vocab":
        ids = np.arange(100)
        ids[37] = 1000
        write_shard(bad, ids)
        return f"token shard {bad} holds id 1000 >= data.vocab_size=1000 at token 37"
    if case == "mixed dtypes":
        write_shard(bad, np.arange(100), magic=20240801, version=7, dtype="<u4")
        return f"token shard {bad} holds uint32 ids but"
    if case == "unknown version":
        write_shard(bad, np.arange(100), version=3)
        return f"token shard {bad} has magic 20240520 with version 3"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["wrong magic", "truncated", "id >= vocab", "mixed dtypes", "unknown version"])
def test_bad_shard_is_refused_naming_the_file(tmp_path, case):
    write_split(tmp_path / "d", "train", [100, 100, 100])
    write_split(tmp_path / "d", "val", [50])
    message = corrupt(tmp_path / "d", case)
    with pytest.raises(UserError) as e:
        prepare(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize(
    "val_source,message",
    [
        ("", "is a glob of token shards: name the validation shards with data.val_source"),
        ("{d}/nothing_*.bin", "matches no files"),
        ("{d}/notes.txt", "is not token shards"),
    ],
)
def test_shards_need_validation_shards(tmp_path, val_source, message):
    write_split(tmp_path / "d", "train", [100])
    (tmp_path / "d" / "notes.txt").write_text("text")
    with pytest.raises(UserError, match=message):
        data.prepare(
            shard_cfg(tmp_path, tmp_path / "d" / "train_*.bin", val_source.format(d=tmp_path / "d")),
            show_progress=False,
        )


def test_val_source_is_refused_for_other_sources(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n" * 10)
    with pytest.raises(UserError, match="data.val_source='x' is only for a glob of token shards"):
        data.prepare(shard_cfg(tmp_path, tmp_path / "a.txt", "x", vocab_size=0), show_progress=False)


def test_main_exits_2_with_one_line_naming_the_bad_shard(tmp_path):
    write_split(tmp_path / "d", "train", [100, 100])
    write_split(tmp_path / "d", "val", [50])
    message = corrupt(tmp_path / "d", "truncated")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.main",
            "--config=configs/mtp3.py:tiny",
            f"--workdir={tmp_path / 'run'}",
            f"--config.data.source={tmp_path / 'd' / 'train_*.bin'}",
            f"--config.data.val_source={tmp_path / 'd' / 'val_*.bin'}",
            "--config.data.vocab_size=1000",
            f"--config.data.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- document boundaries


def test_document_mask_equals_a_brute_force_reference_for_every_head():
    rng = np.random.default_rng(0)
    b, t, n, eot = 6, 50, 5, 3
    window = rng.integers(0, 12, size=(b, t + n))  # an end-of-text token at about 1 in 12 positions
    for k in range(1, n + 1):
        # Head k at p predicts window[p + k]: it stays only if no document ends in p + 1 … p + k - 1.
        expected = np.array([[not np.any(window[i, p + 1 : p + k] == eot) for p in range(t)] for i in range(b)])
        assert np.array_equal(np.asarray(mtp.document_mask(window, eot, k, t)), expected), k
    assert np.asarray(mtp.document_mask(window, eot, 1, t)).all()  # the next token is never masked


def test_document_mask_drops_targets_as_a_per_token_mask_would_and_combines_with_task_masks():
    config = load_config("mtp3", "tiny")
    model = mtp.build_model(config, 16, seed=0)
    n, t, eot = 3, 12, 5
    rng = np.random.default_rng(1)
    window = rng.integers(0, 16, size=(2, t + n)).astype(np.int32)
    window[0, 4], window[1, 9] = eot, eot
    weights = (1.0, 0.5, 0.25)
    plain = mtp.mtp_loss(model, window, weights)[1]
    absent = mtp.mtp_loss(model, window, weights, eot_id=15 if 15 not in window else 99)[1]
    assert {k: float(v) for k, v in plain.items()} == {k: float(v) for k, v in absent.items()}  # bit for bit
    task = (rng.random((2, t + n)) < 0.7).astype(np.int32)
    masked = mtp.mtp_loss(model, window, weights, mask=task, eot_id=eot)[1]
    for k in range(1, n + 1):
        # The same targets as a per-token mask on window[:, k:t + k] for head k alone.
        per_token = task.copy()
        per_token[:, k : t + k] &= np.asarray(mtp.document_mask(window, eot, k, t))
        reference = mtp.mtp_loss(model, window, weights, mask=per_token)[1]
        np.testing.assert_allclose(float(masked[f"loss_{k}"]), float(reference[f"loss_{k}"]), rtol=1e-6)
        np.testing.assert_allclose(float(masked[f"accuracy_{k}"]), float(reference[f"accuracy_{k}"]), rtol=1e-6)
    assert float(masked["loss_1"]) == float(mtp.mtp_loss(model, window, weights, mask=task)[1]["loss_1"])


def test_document_mask_needs_an_end_of_text_id(tmp_path):
    write_split(tmp_path / "d", "train", [100])
    write_split(tmp_path / "d", "val", [50])
    d = prepare(tmp_path)
    on = ml_collections.ConfigDict({"document_mask": True, "eot_id": -1})
    with pytest.raises(
        UserError, match="data.document_mask=True needs the id that ends a document, .* records none: set data.eot_id"
    ):
        data.document_eot_id(on, d)
    on.eot_id = 999
    assert data.document_eot_id(on, d) == 999
    assert data.document_eot_id(ml_collections.ConfigDict({"document_mask": False, "eot_id": 999}), d) is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"val_source": "{d}/nothing_*.bin"}, "data.val_source='{d}/nothing_*.bin' matches no files: fix the glob"),
        ({"val_source": "{d}/nothing.bin"}, "data.val_source='{d}/nothing.bin' does not exist"),
        *[
            (
                {"eot_id": eot_id, "document_mask": mask},
                (
                    f"data.eot_id={eot_id} is not an id of the 1000-id vocabulary: "
                    "set the id that ends a document (0 … 999), or -1 for the data's own"
                ),
            )
            for eot_id in (1000, -5)
            for mask in (False, True)
        ],
    ],
)
def test_bad_data_fields_are_refused_naming_the_field_before_the_cache_is_made(tmp_path, overrides, message):
    write_split(tmp_path / "d", "train", [100])
    write_split(tmp_path / "d", "val", [50])
    overrides = {k: v.format(d=tmp_path / "d") if isinstance(v, str) else v for k, v in overrides.items()}
    val_source = overrides.pop("val_source", tmp_path / "d" / "val_*.bin")
    with pytest.raises(UserError) as error:
        data.prepare(shard_cfg(tmp_path, tmp_path / "d" / "train_*.bin", val_source, **overrides), show_progress=False)
    assert str(error.value).startswith(message.format(d=tmp_path / "d"))
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """Shards made by mtp_jax.prepare from the same documents: {'byte': folder, 'bpe': folder}."""
    from mtp_jax import prepare as prepare_lib

    root = tmp_path_factory.mktemp("prepared")
    (root / "docs.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i}: " + "the lazy dog. " * (1 + i % 5)}) + "\n" for i in range(40))
    )
    for tokenizer in ("byte", "bpe"):
        prepare_lib.prepare(
            prepare_lib.Settings(str(root / "docs.jsonl"), tokenizer, root / tokenizer, val_docs=5, vocab_size=300),
            show_progress=False,
        )
    return {tokenizer: root / tokenizer for tokenizer in ("byte", "bpe")}


def prepared_data(prepared, tokenizer: str, tmp_path, **overrides) -> tuple[data.TokenData, ml_collections.ConfigDict]:
    folder = prepared[tokenizer]
    cfg = shard_cfg(
        tmp_path,
        folder / "train_*.bin",
        folder / "val_*.bin",
        **{"vocab_size": 0, "document_mask": True, "eot_id": -1, **overrides},
    )
    return data.prepare(cfg, show_progress=False), cfg


def test_document_mask_on_prepared_shards_uses_their_own_id_only_for_eot_id_minus_1(prepared, tmp_path):
    d, cfg = prepared_data(prepared, "bpe", tmp_path)
    eot = tokenizers.Tokenizer.from_file(str(prepared["bpe"] / "tokenizer.json")).token_to_id("<|endoftext|>")
    assert data.document_eot_id(cfg, d) == eot
    cfg.eot_id = 7
    assert data.document_eot_id(cfg, d) == 7
    with pytest.raises(UserError, match=r"data.eot_id=-5 is not an id of the 300-id vocabulary"):
        prepared_data(prepared, "bpe", tmp_path, eot_id=-5)


def test_document_mask_on_byte_shards_says_bytes_have_no_end_of_text_id(prepared, tmp_path):
    d, cfg = prepared_data(prepared, "byte", tmp_path)
    with pytest.raises(UserError) as error:
        data.document_eot_id(cfg, d)
    assert str(error.value) == (
        f"data.document_mask=True needs the id that ends a document, and {d.meta['source']} "
        "is byte tokens, which have none: set data.document_mask=False, or tokenize with BPE "
        "(data.tokenizer='bpe', or mtp_jax.prepare --tokenizer=bpe), whose documents end with "
        "<|endoftext|>"
    )


RSS_SCRIPT = """
import json, pathlib, sys
from mtp_jax import train
from mtp_jax.data import shards
from tests.util import load_config

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

def mapped(path):  # resident bytes of any memory map of `path`
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line.split()[0].count("-") == 1 and ":" not in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total

root = pathlib.Path(sys.argv[1])
train_shard = root / "train_000000.bin"
seen = []
read = shards.ShardedTokens.windows
def windows(self, starts, window_len):
    rows = read(self, starts, window_len)
    if self.shards[0].path == train_shard:
        seen.append((rss(), mapped(train_shard)))
    return rows
shards.ShardedTokens.windows = windows
config = load_config("mtp3", "tiny", {"data.source": str(root / "train_*.bin"), "data.val_source": str(root / "val_*.bin"),
                                      "data.vocab_size": 256, "data.cache_dir": str(root / "cache"), "num_train_steps": 10,
                                      "eval_batches": 1, "sample_tokens": 0, "log_every": 10})
train.run(config, root / "run")
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_training_from_a_400_mb_shard_keeps_it_out_of_resident_memory(tmp_path):
    n_tokens = 200_000_000  # 400 MB of uint16
    pattern = (np.arange(1 << 20) * 7919 % 256).astype("<u2")
    header = np.zeros(256, "<i4")
    header[:3] = 20240520, 1, n_tokens
    with open(tmp_path / "train_000000.bin", "wb") as f:
        f.write(header.tobytes())
        for i in range(0, n_tokens, len(pattern)):
            f.write(pattern[: n_tokens - i].tobytes())
    write_shard(tmp_path / "val_000000.bin", pattern[:5000])
    result = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(seen) == 10  # one read per training step
    shard_bytes = (tmp_path / "train_000000.bin").stat().st_size
    # From the first batch to the last (the steps, not the compile): JAX's own growth over ten
    # steps is tens of MB; reading the shard whole would add its 400 MB.
    growth = seen[-1][0] - seen[0][0]
    assert growth < shard_bytes / 4, (growth, shard_bytes)
    assert max(m for _, m in seen) < 1 << 20  # and none of it is resident through a memory map
