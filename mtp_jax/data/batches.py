"""Batches: pure functions of (seed, step, process_index), so resuming at step s reproduces the run.

A window is `window_len` consecutive tokens (seq_len + the MTP lookahead). The token stream is
one array, or token shards laid end to end (shards.ShardedTokens), whose `lengths` the sampler
respects: no window spans two pieces. Random mode draws uniform starts over every piece's
windows, seeded by (seed, step), so a piece is sampled in proportion to its windows; epoch mode
visits every window of every piece once per epoch in a permutation seeded by (seed, epoch).
Each process gathers only its rows of the global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from mtp_jax.errors import UserError


def lengths(tokens) -> tuple[int, ...]:
    """The lengths of the pieces of a token stream that no window spans (one for an array)."""
    return tuple(getattr(tokens, "lengths", (len(tokens),)))


def check_fits(data, window_len: int) -> None:
    """Raises UserError unless both splits hold at least one window of `window_len` tokens
    (`data`: a TokenData)."""
    for split, tokens in (("train", data.train), ("validation", data.val)):
        _check_split_fits(lengths(tokens), window_len, split)


def _check_split_fits(pieces: tuple[int, ...], window_len: int, split: str) -> None:
    if max(pieces) < window_len:
        held = f"{pieces[0]} tokens" if len(pieces) == 1 else f"shards of at most {max(pieces)} tokens"
        raise UserError(
            f"the {split} split has {held}, fewer than one window of {window_len} tokens "
            "(seq_len + MTP tokens): use a smaller seq_len or more data (data.source)"
        )


def _pieces(num_tokens: int | Sequence[int]) -> tuple[int, ...]:
    return (int(num_tokens),) if np.ndim(num_tokens) == 0 else tuple(int(n) for n in num_tokens)


def _epoch_stride(window_len: int, align: int) -> int:
    # Text: non-overlapping windows. A task (a window holds whole problems + n lookahead tokens):
    # the next window starts at the next problem, so every problem is an input exactly once.
    return window_len // align * align


def _epoch_counts(pieces: tuple[int, ...], window_len: int, align: int) -> np.ndarray:
    stride = _epoch_stride(window_len, align)
    n = np.asarray(pieces, np.int64)
    return np.where(n >= window_len, (n - window_len) // stride + 1, 0)


def _start_counts(pieces: tuple[int, ...], window_len: int, align: int) -> np.ndarray:
    """How many starts 0, align, 2 * align, … each piece has for a whole window."""
    n = np.asarray(pieces, np.int64)
    return np.where(n >= window_len, (n - window_len) // align + 1, 0)


def _positions(index: np.ndarray, pieces: tuple[int, ...], counts: np.ndarray, spacing: int) -> np.ndarray:
    """Stream positions of window numbers `index`, where piece j holds counts[j] windows
    `spacing` apart from its start (for one piece: index * spacing)."""
    ends = np.cumsum(counts)
    piece = np.searchsorted(ends, index, side="right")
    offsets = np.cumsum((0,) + pieces)[:-1]
    return offsets[piece] + (index - (ends[piece] - counts[piece])) * spacing


def num_windows(num_tokens: int | Sequence[int], window_len: int, align: int = 1) -> int:
    """Epoch-mode windows, at starts 0, s, 2 * s, ... of each piece for the stride s (window_len
    when align = 1). num_tokens: the stream's length, or each shard's."""
    return int(_epoch_counts(_pieces(num_tokens), window_len, align).sum())


def steps_per_epoch(num_tokens: int | Sequence[int], *, window_len: int, batch_size: int, align: int = 1) -> int:
    """Full batches per epoch; the last partial batch of windows is dropped."""
    return num_windows(num_tokens, window_len, align) // batch_size


def global_batch_starts(
    num_tokens: int | Sequence[int],
    *,
    window_len: int,
    batch_size: int,
    seed: int,
    step: int,
    num_epochs: int = 0,
    align: int = 1,
) -> np.ndarray:
    """Start positions [batch_size] (int64) of the global batch at `step`, multiples of `align`
    (a task's example length, so that windows begin with a whole problem) from their piece's start.

    num_epochs == 0: uniform random starts over all windows, seeded by (seed, step).
    num_epochs > 0: each epoch visits every window exactly once in a permutation seeded by
    (seed, epoch); how many epochs to run is the trainer's business.
    """
    pieces = _pieces(num_tokens)
    _check_split_fits(pieces, window_len, "train")
    if num_epochs == 0:
        counts = _start_counts(pieces, window_len, align)
        rng = np.random.default_rng([seed, step])
        index = rng.integers(0, counts.sum() - 1, size=batch_size, endpoint=True, dtype=np.int64)
        return _positions(index, pieces, counts, align)
    per_epoch = steps_per_epoch(pieces, window_len=window_len, batch_size=batch_size, align=align)
    if per_epoch == 0:
        raise UserError(
            f"the train split has {num_windows(pieces, window_len, align)} windows of {window_len} tokens, "
            f"fewer than batch_size={batch_size}: use a smaller batch_size or seq_len, or more data"
        )
    counts = _epoch_counts(pieces, window_len, align)
    order = _epoch_order(seed, step // per_epoch, int(counts.sum()))
    i = step % per_epoch
    return _positions(order[i * batch_size : (i + 1) * batch_size], pieces, counts, _epoch_stride(window_len, align))


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    # Cached because every step of an epoch needs the same permutation; read-only so callers
    # cannot corrupt the cache.
    order = np.random.default_rng([seed, epoch, 1]).permutation(n_windows).astype(np.int64)
    order.flags.writeable = False
    return order


def local_batch(
    tokens,
    *,
    window_len: int,
    batch_size: int,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int = 0,
    align: int = 1,
) -> np.ndarray:
    """This process's rows [batch_size // process_count, window_len] (int32) of the global batch.

    `tokens`: an array or ShardedTokens; any per-token stream (a task's loss mask gathers at the
    same starts)."""
    if batch_size % process_count:
        raise UserError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}: "
            "use a batch_size that is a multiple of the number of processes"
        )
    starts = global_batch_starts(
        lengths(tokens),
        window_len=window_len,
        batch_size=batch_size,
        seed=seed,
        step=step,
        num_epochs=num_epochs,
        align=align,
    )
    rows = batch_size // process_count
    return _gather(tokens, starts[process_index * rows : (process_index + 1) * rows], window_len)


def eval_windows(val_tokens, *, window_len: int, batch_size: int, num_batches: int, align: int = 1) -> np.ndarray:
    """A fixed validation subset [num_batches, batch_size, window_len] (int32): evenly spaced
    over all windows (starts at multiples of `align` in their piece)."""
    pieces = lengths(val_tokens)
    _check_split_fits(pieces, window_len, "validation")
    counts = _start_counts(pieces, window_len, align)
    index = np.linspace(0, counts.sum() - 1, num_batches * batch_size).round().astype(np.int64)
    starts = _positions(index, pieces, counts, align)
    return _gather(val_tokens, starts, window_len).reshape(num_batches, batch_size, window_len)


def _gather(tokens, starts: np.ndarray, window_len: int) -> np.ndarray:
    if hasattr(tokens, "windows"):  # shards: each row read from the one shard it lies in
        return tokens.windows(starts, window_len)
    return np.asarray(tokens[starts[:, None] + np.arange(window_len)], dtype=np.int32)
