"""What a token cache directory holds, written: `build` turns a source into its files and returns
its meta.json. Text is tokenized into `train.bin` / `val.bin` (flat little-endian ids), a token
file is split into both, a task's problems are packed with their loss masks (`train_mask.bin` /
`val_mask.bin`, uint8, 1 where a token is a loss target), and token shards are checked and
recorded where they lie. cache.py decides where and when, and reads it back.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm

from mtp_jax.data import shards as shards_lib
from mtp_jax.data import tasks
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.sources import (
    TOKEN_DTYPES,
    Document,
    Source,
    extra_documents,
    read_text,
    split_documents,
    val_count,
)
from mtp_jax.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: text files are decoded without newline translation
_CHUNK_DOCS = 64  # documents per batch-encode call: large enough to use all cores
_CHUNK_TOKENS = 1 << 24  # tokens per read when copying / scanning a token file


def build(
    data_cfg: Any, source: Source, extra: Source | None, settings: dict, out: pathlib.Path, show_progress: bool
) -> dict:
    """Writes the cache files of `source` (and the training files of `extra`, data.train_extra)
    into `out`; returns their meta.json."""
    if source.kind == "shards":
        return _build_shard_record(source, settings, out, show_progress)
    if source.kind == "bin":
        return _build_from_tokens(source, settings, out)
    if source.kind == "task":
        return _build_task(data_cfg, source, settings, out)
    return _build_from_text(source, extra, settings, out, show_progress)


def _build_task(cfg: Any, source: Source, settings: dict, out: pathlib.Path) -> dict:
    """A task's problems packed into train/val token streams and their loss masks (tasks.pack)."""
    num_val = val_count(settings["num_train"], settings["val_fraction"])
    problems = tasks.splits(
        tasks.from_config(cfg),
        num_train=settings["num_train"],
        num_val=num_val,
        eval_problems=settings["eval_problems"],
        seed=settings["seed"],
        split_seed=settings["split_seed"],
    )
    checksums, counts, dtype = {}, {}, _out_dtype(settings["vocab_size"])
    for split, split_problems in problems.items():
        streams = tasks.pack(split_problems, settings["example_len"])
        for suffix, stream, stream_dtype in zip(("", "_mask"), streams, (dtype, "u1")):
            with _SplitWriter(out / f"{split}{suffix}.bin", stream_dtype) as writer:
                writer.write(stream)
            checksums[split + suffix] = writer.sha256
        counts[split] = len(streams[0])
    meta = _meta(
        settings,
        source,
        dtype,
        n_train_tokens=counts["train"],
        n_val_tokens=counts["val"],
        n_train_docs=len(problems["train"]),
        n_val_docs=len(problems["val"]),
        val_bytes=None,
        checksums=checksums,
    )
    return dict(meta, example_len=settings["example_len"], task={k: v for k, v in settings.items() if k not in meta})


def _out_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def _build_from_tokens(source: Source, settings: dict, out: pathlib.Path) -> dict:
    """Copies a token file into train.bin (first tokens) and val.bin (last fraction)."""
    path, vocab_size = source.paths[0], settings["vocab_size"]
    in_dtype, offset = np.dtype(TOKEN_DTYPES[settings["token_dtype"]]), 0
    if shards_lib.has_header(path):  # an llm.c shard: its header says the dtype and the count
        shard = shards_lib.read_shard(path, in_dtype.str)
        in_dtype, offset = np.dtype(shard.dtype), shard.offset
    size = path.stat().st_size - offset
    if size % in_dtype.itemsize:
        raise UserError(
            f"token file {path} has {size} bytes, not a multiple of {in_dtype.itemsize} "
            f"({settings['token_dtype']}): check data.token_dtype or the file"
        )
    if size == 0:
        raise UserError(f"token file {path} is empty: pass a file with tokens")
    tokens = np.memmap(path, dtype=in_dtype, mode="r", offset=offset)
    top = max(int(tokens[i : i + _CHUNK_TOKENS].max()) for i in range(0, len(tokens), _CHUNK_TOKENS))
    if top >= vocab_size:
        raise UserError(
            f"token file {path} holds token id {top} >= vocab_size={vocab_size}: "
            "set data.vocab_size larger or check data.token_dtype"
        )
    n_val = val_count(len(tokens), settings["val_fraction"])
    dtype = _out_dtype(vocab_size)
    checksums = {}
    for split, part in (("train", tokens[: len(tokens) - n_val]), ("val", tokens[len(tokens) - n_val :])):
        with _SplitWriter(out / f"{split}.bin", dtype) as writer:
            for i in range(0, len(part), _CHUNK_TOKENS):
                writer.write(part[i : i + _CHUNK_TOKENS])
        checksums[split] = writer.sha256
    return _meta(
        settings,
        source,
        dtype,
        n_train_tokens=len(tokens) - n_val,
        n_val_tokens=n_val,
        n_train_docs=None,
        n_val_docs=None,
        val_bytes=None,
        checksums=checksums,
    )


def _build_shard_record(source: Source, settings: dict, out: pathlib.Path, show_progress: bool) -> dict:
    """Checks token shards (headers, one format, every id below vocab_size) and returns the meta
    that maps them; copies the tokenizer of shards made by mtp_jax.prepare."""
    headerless = TOKEN_DTYPES[settings["token_dtype"]]
    shards = {
        "train": [shards_lib.read_shard(p, headerless) for p in source.paths],
        "val": [shards_lib.read_shard(pathlib.Path(p), headerless) for p in settings["val_paths"]],
    }
    shards_lib.check_same_format(shards["train"] + shards["val"])
    every = shards["train"] + shards["val"]
    with tqdm.tqdm(
        total=sum(s.num_tokens * np.dtype(s.dtype).itemsize for s in every),
        unit="B",
        unit_scale=True,
        desc="checking shards",
        disable=not show_progress,
    ) as bar:
        for shard in every:
            shards_lib.check_ids(shard, settings["vocab_size"], bar.update)
    made_by = source.paths[0].parent / "meta.json"
    made = json.loads(made_by.read_text()) if made_by.is_file() else {}
    n_tokens = {split: sum(s.num_tokens for s in shards[split]) for split in shards}
    tokenizer = made.get("tokenizer")
    if tokenizer == "bpe":
        shutil.copyfile(made_by.parent / "tokenizer.json", out / "tokenizer.json")
    # The validation text's size, when these are the validation shards prepare counted it for.
    val_bytes = made.get("val_bytes") if made.get("n_val_tokens") == n_tokens["val"] else None
    return dict(
        format_version=FORMAT_VERSION,
        tokenizer=tokenizer,
        vocab_size=settings["vocab_size"],
        dtype=np.dtype(every[0].dtype).name,
        n_train_tokens=n_tokens["train"],
        n_val_tokens=n_tokens["val"],
        n_train_docs=made.get("n_train_docs"),
        n_val_docs=made.get("n_val_docs"),
        val_bytes=val_bytes,
        eot_id=made.get("eot_id"),
        source=source.description,
        val_source=settings["val_source"],
        shards={split: [[str(s.path), s.offset, s.dtype, s.num_tokens] for s in shards[split]] for split in shards},
    )


def _build_from_text(
    source: Source, extra: Source | None, settings: dict, out: pathlib.Path, show_progress: bool
) -> dict:
    train_docs, val_docs = split_documents(source, settings["val_fraction"], settings["split_seed"])
    train_docs += extra_documents(extra, source) if extra else []
    if "tokenizer_file" in settings:  # data.tokenizer=PATH: the model's own, as it is
        bpe = tokenizer_lib.read_given(settings["tokenizer_file"])
        bpe.save(str(out / "tokenizer.json"))
        encode = functools.partial(tokenizer_lib.encode_bpe, bpe, settings["eot_id"])
    elif settings["tokenizer"] == "bpe":
        texts = (t for t in map(read_text, train_docs) if t)
        bpe = tokenizer_lib.train_bpe(texts, settings["vocab_size"], show_progress, length=len(train_docs))
        bpe.save(str(out / "tokenizer.json"))
        encode = functools.partial(tokenizer_lib.encode_bpe, bpe, bpe.token_to_id(tokenizer_lib.EOT))
    else:
        encode = tokenizer_lib.encode_bytes
    dtype = _out_dtype(settings["vocab_size"])
    stats = {}
    bar = tqdm.tqdm(total=len(train_docs) + len(val_docs), unit="doc", desc="tokenizing", disable=not show_progress)
    with bar:
        for split, docs in (("train", train_docs), ("val", val_docs)):
            stats[split] = _write_split(docs, encode, out / f"{split}.bin", dtype, bar)
    skipped = stats["train"].skipped + stats["val"].skipped
    if skipped:
        log.warning("Skipped %d files of %s that are not UTF-8 text", skipped, source.description)
    if stats["train"].n_tokens + stats["val"].n_tokens == 0:
        raise UserError(f"data.source {source.description} holds no text: pass UTF-8 text files")
    return _meta(
        settings,
        source,
        dtype,
        n_train_tokens=stats["train"].n_tokens,
        n_val_tokens=stats["val"].n_tokens,
        n_train_docs=stats["train"].n_docs,
        n_val_docs=stats["val"].n_docs,
        val_bytes=stats["val"].n_bytes,
        checksums={split: s.sha256 for split, s in stats.items()},
    )


@dataclasses.dataclass
class _SplitStats:
    n_tokens: int
    n_docs: int
    n_bytes: int
    skipped: int
    sha256: str


def _write_split(
    docs: Sequence[Document],
    encode: Callable[[list[str]], list[np.ndarray]],
    path: pathlib.Path,
    dtype: str,
    bar: tqdm.tqdm,
) -> _SplitStats:
    n_docs = n_bytes = skipped = 0
    with _SplitWriter(path, dtype) as writer:
        for i in range(0, len(docs), _CHUNK_DOCS):
            chunk = docs[i : i + _CHUNK_DOCS]
            texts = [read_text(d) for d in chunk]
            skipped += sum(t is None for t in texts)
            texts = [t for t in texts if t]
            for ids in encode(texts):
                writer.write(ids)
            n_docs += len(texts)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            bar.update(len(chunk))
    return _SplitStats(writer.n_tokens, n_docs, n_bytes, skipped, writer.sha256)


class _SplitWriter:
    """Appends token ids to a little-endian file, counting and hashing them on the way."""

    def __init__(self, path: pathlib.Path, dtype: str):
        self._file = path.open("wb")
        self._dtype = dtype
        self._hash = hashlib.sha256()
        self.n_tokens = 0
        self.sha256 = ""

    def write(self, ids: np.ndarray) -> None:
        data = np.asarray(ids).astype(self._dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.n_tokens += len(ids)

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self.sha256 = self._hash.hexdigest()


def _meta(settings: dict, source: Source, dtype: str, *, checksums: dict, **counts) -> dict:
    return dict(
        format_version=FORMAT_VERSION,
        tokenizer=settings["tokenizer"],
        vocab_size=settings["vocab_size"],
        dtype=np.dtype(dtype).name,
        **counts,
        source=source.description,
        val_fraction=settings["val_fraction"],
        split_seed=settings["split_seed"],
        sha256={f"{split}.bin": digest for split, digest in checksums.items()},
        # A model's own tokenizer: where it came from, and the id that ends a document (or None).
        **({key: settings[key] for key in ("tokenizer_file", "eot_id")} if "tokenizer_file" in settings else {}),
    )
