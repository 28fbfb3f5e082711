"""Token shards in the llm.c / modded-nanogpt format, opened lazily and never read whole.

A shard is a header of 256 little-endian int32 (magic, version, number of tokens, then zeros)
followed by the token ids: magic 20240520 version 1 holds uint16 ids (GPT-2's vocabulary),
magic 20240801 version 7 uint32 ids (llm.c's Llama 3 shards). A shard without a header is a
flat file of `data.token_dtype` ids. `ShardedTokens` presents a list of shards as one stream
whose pieces no window spans (batches.py asks it for its `lengths`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from mtp_jax.errors import UserError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype, as llm.c's dev/data/data_common.py writes them.
FORMATS = {(20240520, 1): "<u2", (20240801, 7): "<u4"}
MAGICS = {magic for magic, _ in FORMATS}
_SCAN_TOKENS = 1 << 22  # tokens per read when checking ids: a few MB of memory, not the shard


@dataclasses.dataclass(frozen=True)
class Shard:
    path: pathlib.Path
    offset: int  # bytes before the first token: HEADER_BYTES, or 0 without a header
    dtype: str  # '<u2' | '<u4'
    num_tokens: int

    @property
    def has_header(self) -> bool:
        return self.offset > 0


def header(num_tokens: int, dtype: str) -> bytes:
    """The llm.c header of a shard holding `num_tokens` ids of `dtype` ('<u2' or '<u4')."""
    ((magic, version),) = [key for key, d in FORMATS.items() if d == np.dtype(dtype).str]
    ints = np.zeros(HEADER_INTS, "<i4")
    ints[:3] = magic, version, num_tokens
    return ints.tobytes()


def _magic(path: pathlib.Path) -> int | None:
    with path.open("rb") as f:
        head = f.read(4)
    return int(np.frombuffer(head, "<i4")[0]) if len(head) == 4 else None


def has_header(path: pathlib.Path) -> bool:
    """Whether the file starts with an llm.c magic (else it is a flat file of ids)."""
    return _magic(path) in MAGICS


def read_shard(path: pathlib.Path, headerless_dtype: str) -> Shard:
    """The shard at `path`, its header checked against the file's size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    magic = _magic(path)
    if magic not in MAGICS:
        itemsize = np.dtype(headerless_dtype).itemsize
        if size == 0 or size % itemsize:
            raise UserError(
                f"token shard {path} has {size} bytes, not a positive multiple of {itemsize} "
                f"({np.dtype(headerless_dtype).name}) and no llm.c header: check data.token_dtype or the file"
            )
        return Shard(path, 0, np.dtype(headerless_dtype).str, size // itemsize)
    if len(head) < HEADER_BYTES:
        raise UserError(
            f"token shard {path} has {size} bytes, less than its {HEADER_BYTES}-byte llm.c header: "
            "the file is truncated; fetch or prepare it again"
        )
    version, num_tokens = (int(x) for x in np.frombuffer(head[4:12], "<i4"))
    if (magic, version) not in FORMATS:
        known = ", ".join(f"magic {m} version {v} ({np.dtype(d).name})" for (m, v), d in FORMATS.items())
        raise UserError(f"token shard {path} has magic {magic} with version {version}: expected {known}")
    dtype = FORMATS[magic, version]
    held = (size - HEADER_BYTES) // np.dtype(dtype).itemsize
    if num_tokens != held or (size - HEADER_BYTES) % np.dtype(dtype).itemsize:
        raise UserError(
            f"token shard {path}: its header says {num_tokens} tokens but the file holds "
            f"{size - HEADER_BYTES} bytes of {np.dtype(dtype).name} ids ({held} tokens): the file is "
            "truncated or not a shard; fetch or prepare it again"
        )
    return Shard(path, HEADER_BYTES, dtype, num_tokens)


def check_same_format(shards: Sequence[Shard]) -> None:
    """Shards of one stream share a header (or its absence) and a dtype."""
    first = shards[0]
    for shard in shards[1:]:
        if shard.has_header != first.has_header:
            with_header, without = (first, shard) if first.has_header else (shard, first)
            raise UserError(
                f"token shard {without.path} does not start with an llm.c magic ({sorted(MAGICS)}) "
                f"but {with_header.path} does: remove the odd file from the glob, or fix it"
            )
        if shard.dtype != first.dtype:
            raise UserError(
                f"token shard {shard.path} holds {np.dtype(shard.dtype).name} ids but {first.path} "
                f"holds {np.dtype(first.dtype).name}: use shards of one dtype"
            )


def check_ids(shard: Shard, vocab_size: int, progress: Callable[[int], None] = lambda n: None) -> None:
    """Raises UserError naming the shard and offset of the first id >= vocab_size. Reads the shard
    in chunks of a few MB (not mapped, so its pages do not stay resident in this process)."""
    itemsize = np.dtype(shard.dtype).itemsize
    with shard.path.open("rb") as f:
        f.seek(shard.offset)
        done = 0
        while done < shard.num_tokens:
            chunk = np.frombuffer(f.read(min(_SCAN_TOKENS, shard.num_tokens - done) * itemsize), shard.dtype)
            bad = np.flatnonzero(chunk >= vocab_size)
            if len(bad):
                raise UserError(
                    f"token shard {shard.path} holds id {int(chunk[bad[0]])} >= "
                    f"data.vocab_size={vocab_size} at token {done + int(bad[0])}: set data.vocab_size "
                    "to the vocabulary the shards were tokenized with"
                )
            done += len(chunk)
            progress(len(chunk) * itemsize)


class ShardedTokens:
    """Shards as one read-only token stream; each shard is opened on first use and read a window
    at a time.

    Positions are offsets into the shards laid end to end; `lengths` tells the sampler where
    one shard ends, so that no window spans two. Rows are read with pread rather than through a
    memory map: a map's touched pages count as this process's resident memory and pile up over
    a run (read-ahead brings in hundreds of KB per window), while read pages stay in the
    operating system's cache."""

    def __init__(self, shards: Sequence[Shard]):
        self.shards = tuple(shards)
        self.lengths = tuple(s.num_tokens for s in self.shards)
        self.dtype = np.dtype(self.shards[0].dtype)
        self._starts = np.cumsum((0,) + self.lengths)
        self._files: dict[int, int] = {}  # shard index -> open file descriptor

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def _read(self, i: int, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of shard i."""
        if i not in self._files:
            self._files[i] = os.open(self.shards[i].path, os.O_RDONLY)
        offset = self.shards[i].offset + start * self.dtype.itemsize
        return np.frombuffer(os.pread(self._files[i], count * self.dtype.itemsize, offset), self.dtype)

    def windows(self, starts: np.ndarray, window_len: int) -> np.ndarray:
        """Rows [len(starts), window_len] (int32) at stream positions `starts`, each within one shard."""
        shard = np.searchsorted(self._starts, starts, side="right") - 1
        local = starts - self._starts[shard]
        if np.any(local + window_len > np.asarray(self.lengths)[shard]):
            raise ValueError(f"a window of {window_len} tokens at {starts} crosses the end of a shard")
        out = np.empty((len(starts), window_len), np.int32)
        for row, (i, start) in enumerate(zip(shard.tolist(), local.tolist())):
            out[row] = self._read(i, start, window_len)
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        """Tokens [start:stop] of the stream, read from the shards they lie in."""
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("ShardedTokens supports contiguous slices only")
        parts = []
        for i in range(len(self.shards)):
            lo, hi = max(start, int(self._starts[i])), min(stop, int(self._starts[i + 1]))
            if lo < hi:
                parts.append(self._read(i, lo - int(self._starts[i]), hi - lo))
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)
