"""The token cache: tokenize a source once, publish it atomically, memory-map it.

`prepare` turns a source (see sources.py) into `train.bin` / `val.bin` (flat little-endian ids)
plus `meta.json` in a cache directory named after the source, its settings and a hash of both,
and memory-maps them; a task also writes `train_mask.bin` / `val_mask.bin` (uint8, 1 where a
token is a loss target). Token shards are not copied: their cache directory records that their
headers and ids were checked (once), and the shards are mapped where they lie. A build happens in a temporary directory that is renamed into place
only when complete, so concurrent runs and killed builds never leave a half-written cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
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
    check_settings,
    read_text,
    resolve_source,
    split_documents,
    val_count,
)
from mtp_jax.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: text files are decoded without newline translation
_TMP_PREFIX = ".tmp-"
_CHUNK_DOCS = 64  # documents per batch-encode call: large enough to use all cores
_CHUNK_TOKENS = 1 << 24  # tokens per read when copying / scanning a token file


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class TokenData:
    train: np.ndarray | shards_lib.ShardedTokens  # [n_train_tokens] memmap of train.bin, or the shards
    val: np.ndarray | shards_lib.ShardedTokens  # [n_val_tokens]
    meta: dict
    directory: pathlib.Path
    train_mask: np.ndarray | None = None  # [n_train_tokens] uint8 loss mask of a task; None: all targets
    val_mask: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def example_len(self) -> int:
        """Windows start at multiples of this: a task's packed problem length (1 for text)."""
        return self.meta.get("example_len", 1)

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per validation token: converts loss per token into bits per byte."""
        if self.meta["val_bytes"] is None or not self.meta["n_val_tokens"]:
            return None
        return self.meta["val_bytes"] / self.meta["n_val_tokens"]

    @property
    def eot_id(self) -> int | None:
        """The id that ends each document, if the data has one (bytes do not)."""
        if "eot_id" in self.meta:
            return self.meta["eot_id"]
        if self.meta["tokenizer"] == "bpe":
            return tokenizer_lib.bpe_eot_id(self.directory)
        return None


def check_eot_id(data_cfg: Any, vocab_size: int) -> None:
    """data.eot_id is -1 (the data's own) or an id of the vocabulary, whether data.document_mask
    is on or not: a value that could never be right is refused before any data is read."""
    eot_id = int(data_cfg.get("eot_id", -1))
    if eot_id != -1 and not 0 <= eot_id < vocab_size:
        raise UserError(
            f"data.eot_id={eot_id} is not an id of the {vocab_size}-id vocabulary: set the id that ends a "
            f"document (0 … {vocab_size - 1}), or -1 for the data's own"
        )


def document_eot_id(data_cfg: Any, data: TokenData) -> int | None:
    """The end-of-text id past which data.document_mask hides each head's targets; None when off.
    data.eot_id when set (check_eot_id checked it), else the data's own."""
    if not data_cfg.get("document_mask", False):
        return None
    eot_id = int(data_cfg.get("eot_id", -1))
    if eot_id != -1:
        return eot_id
    if data.eot_id is not None:
        return data.eot_id
    if data.meta["tokenizer"] == "byte":
        raise UserError(
            f"data.document_mask=True needs the id that ends a document, and {data.meta['source']} is "
            "byte tokens, which have none: set data.document_mask=False, or tokenize with BPE "
            f"(data.tokenizer='bpe', or mtp_jax.prepare --tokenizer=bpe), whose documents end with "
            f"{tokenizer_lib.EOT}"
        )
    raise UserError(
        f"data.document_mask=True needs the id that ends a document, and {data.meta['source']} "
        "records none: set data.eot_id (50256 for GPT-2 shards)"
    )


def prepare(data_cfg: Any, *, show_progress: bool = True) -> TokenData:
    """Builds (or reuses) the token cache for `data_cfg` and memory-maps it.

    Text is decoded as UTF-8 for both tokenizers; files that are not valid UTF-8 are skipped
    and counted in one log line. Hidden files and directories (names starting with '.') under
    a directory source are skipped, so a `.git` folder does not become training data.
    The cache lives in `cache_dir/<source>-<tokenizer>-<hash>/`; it is built in a temporary
    directory and renamed into place only when complete.
    """
    source = resolve_source(str(data_cfg.source))
    settings = check_settings(data_cfg, source)
    check_eot_id(data_cfg, settings["vocab_size"])
    key = json.dumps([FORMAT_VERSION, source.description, source.fingerprint, settings])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache_dir = pathlib.Path(str(data_cfg.cache_dir)).expanduser()
    final = cache_dir / f"{source.name}-{settings['tokenizer'] or 'tokens'}-{digest}"

    if final.exists():
        problem = cache_problem(final)
        if problem is None:
            return _load(final)
        log.warning("Rebuilding data cache %s: %s", final, problem)

    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(cache_dir, final.name)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-{os.getpid()}-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by others
    try:
        if source.kind == "shards":
            meta = _build_shard_record(source, settings, tmp, show_progress)
        elif source.kind == "bin":
            meta = _build_from_tokens(source, settings, tmp)
        elif source.kind == "task":
            meta = _build_task(data_cfg, source, settings, tmp)
        else:
            meta = _build_from_text(source, settings, tmp, show_progress)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


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


def _build_from_text(source: Source, settings: dict, out: pathlib.Path, show_progress: bool) -> dict:
    train_docs, val_docs = split_documents(source, settings["val_fraction"], settings["split_seed"])
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


def cache_problem(directory: pathlib.Path) -> str | None:
    """Why the cache in `directory` cannot be used, or None when it can."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "meta.json is not valid JSON"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format_version={meta.get('format_version')} is not {FORMAT_VERSION}"
    if "shards" in meta:
        for split in ("train", "val"):
            for path, offset, dtype, num_tokens in meta["shards"][split]:
                size = pathlib.Path(path).stat().st_size if pathlib.Path(path).is_file() else None
                if size != offset + num_tokens * np.dtype(dtype).itemsize:
                    return f"the shard {path} has changed or gone"
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        expected = meta[f"n_{split}_tokens"] * itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            return f"{path.name} has {actual} bytes, meta.json implies {expected}"
        mask = directory / f"{split}_mask.bin"
        if "example_len" in meta and (mask.stat().st_size if mask.is_file() else None) != meta[f"n_{split}_tokens"]:
            return f"{mask.name} does not hold one byte per token"
    if meta["tokenizer"] == "bpe" and not (directory / "tokenizer.json").is_file():
        return "tokenizer.json is missing"
    return None


def _remove_dead_builds(cache_dir: pathlib.Path, name: str) -> None:
    """Removes temp dirs left by builds of `name` whose process is gone (e.g. kill -9)."""
    for tmp in cache_dir.glob(f"{_TMP_PREFIX}{name}-*"):
        match = re.fullmatch(rf"{re.escape(_TMP_PREFIX + name)}-(\d+)-.*", tmp.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Renames a complete build into place, replacing an invalid cache only after success."""
    old = None
    if final.exists():
        if cache_problem(final) is None:
            return  # another process published the same cache while this one was building
        old = final.with_name(f"{_TMP_PREFIX}{final.name}-{os.getpid()}-old")
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        # Another process published between the check above and this rename: use its cache.
        if cache_problem(final) is not None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load(directory: pathlib.Path) -> TokenData:
    meta = json.loads((directory / "meta.json").read_text())
    if "shards" in meta:
        train, val = (
            shards_lib.ShardedTokens(
                [
                    shards_lib.Shard(pathlib.Path(path), offset, dtype, n)
                    for path, offset, dtype, n in meta["shards"][split]
                ]
            )
            for split in ("train", "val")
        )
        return TokenData(train=train, val=val, meta=meta, directory=directory)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")

    def tokens(split: str, suffix: str = "", dtype: np.dtype = dtype) -> np.ndarray:
        if meta[f"n_{split}_tokens"] == 0:  # np.memmap cannot map an empty file
            return np.zeros(0, dtype)
        return np.memmap(directory / f"{split}{suffix}.bin", dtype=dtype, mode="r")

    masks = (
        {split: tokens(split, "_mask", np.dtype(np.uint8)) for split in ("train", "val")}
        if "example_len" in meta
        else {"train": None, "val": None}
    )
    return TokenData(
        train=tokens("train"),
        val=tokens("val"),
        meta=meta,
        directory=directory,
        train_mask=masks["train"],
        val_mask=masks["val"],
    )
