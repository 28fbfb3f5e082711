"""The token cache: tokenize a source once, publish it atomically, memory-map it.

`prepare` builds a source (see sources.py) into a cache directory named after the source, its
settings and a hash of both (the files are build.py's: `train.bin` / `val.bin`, a task's masks,
`meta.json`; token shards are recorded, not copied, and mapped where they lie), and memory-maps
them. A build happens in a temporary directory that is renamed into place only when complete, so
concurrent runs and killed builds never leave a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from mtp_jax.data import shards as shards_lib
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.build import FORMAT_VERSION, build
from mtp_jax.data.sources import check_settings, extra_training_source, resolve_source
from mtp_jax.errors import UserError

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"


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
    extra = extra_training_source(data_cfg, source)
    settings = check_settings(data_cfg, source, extra)
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
        meta = build(data_cfg, source, extra, settings, tmp, show_progress)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


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
