"""Batches: pure functions of (seed, step, process_index), so resuming at step s reproduces the run.

A window is `window_len` consecutive tokens (seq_len + the MTP lookahead). Random mode draws
uniform starts seeded by (seed, step); epoch mode visits every window once per epoch in a
permutation seeded by (seed, epoch). Each process gathers only its rows of the global batch.
"""

from __future__ import annotations

import functools

import numpy as np

from mtp_jax.errors import UserError


def check_fits(data, window_len: int) -> None:
    """Raises UserError unless both splits hold at least one window of `window_len` tokens (`data`: a TokenData)."""
    for split, tokens in (("train", data.train), ("validation", data.val)):
        _check_split_fits(len(tokens), window_len, split)


def _check_split_fits(num_tokens: int, window_len: int, split: str) -> None:
    if num_tokens < window_len:
        raise UserError(
            f"the {split} split has {num_tokens} tokens, fewer than one window of {window_len} tokens "
            "(seq_len + MTP tokens): use a smaller seq_len or more data (data.source)"
        )


def _epoch_stride(window_len: int, align: int) -> int:
    # Text: non-overlapping windows. A task (a window holds whole problems + n lookahead tokens): the
    # next window starts at the next problem, so every problem is an input exactly once.
    return window_len // align * align


def num_windows(num_tokens: int, window_len: int, align: int = 1) -> int:
    """Epoch-mode windows, at starts 0, s, 2 * s, ... for the stride s (window_len when align = 1)."""
    stride = _epoch_stride(window_len, align)
    return (num_tokens - window_len) // stride + 1 if num_tokens >= window_len else 0


def steps_per_epoch(num_tokens: int, *, window_len: int, batch_size: int, align: int = 1) -> int:
    """Full batches per epoch; the last partial batch of windows is dropped."""
    return num_windows(num_tokens, window_len, align) // batch_size


def global_batch_starts(
    num_tokens: int, *, window_len: int, batch_size: int, seed: int, step: int, num_epochs: int = 0, align: int = 1
) -> np.ndarray:
    """Start positions [batch_size] (int64) of the global batch at `step`, multiples of `align`
    (a task's example length, so that windows begin with a whole problem).

    num_epochs == 0: uniform random starts in [0, num_tokens - window_len], seeded by (seed, step).
    num_epochs > 0: each epoch visits every window exactly once in a permutation seeded by
    (seed, epoch); how many epochs to run is the trainer's business.
    """
    _check_split_fits(num_tokens, window_len, "train")
    if num_epochs == 0:
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, (num_tokens - window_len) // align, size=batch_size, endpoint=True, dtype=np.int64) * align
    per_epoch = steps_per_epoch(num_tokens, window_len=window_len, batch_size=batch_size, align=align)
    if per_epoch == 0:
        raise UserError(
            f"the train split has {num_windows(num_tokens, window_len, align)} windows of {window_len} tokens, "
            f"fewer than batch_size={batch_size}: use a smaller batch_size or seq_len, or more data"
        )
    order = _epoch_order(seed, step // per_epoch, num_windows(num_tokens, window_len, align))
    i = step % per_epoch
    return order[i * batch_size : (i + 1) * batch_size] * _epoch_stride(window_len, align)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    # Cached because every step of an epoch needs the same permutation; read-only so callers
    # cannot corrupt the cache.
    order = np.random.default_rng([seed, epoch, 1]).permutation(n_windows).astype(np.int64)
    order.flags.writeable = False
    return order


def local_batch(
    tokens: np.ndarray,
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

    `tokens` may be any per-token stream: a task's loss mask gathers at the same starts."""
    if batch_size % process_count:
        raise UserError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}: "
            "use a batch_size that is a multiple of the number of processes"
        )
    starts = global_batch_starts(
        len(tokens), window_len=window_len, batch_size=batch_size, seed=seed, step=step,
        num_epochs=num_epochs, align=align,
    )
    rows = batch_size // process_count
    return _gather(tokens, starts[process_index * rows : (process_index + 1) * rows], window_len)


def eval_windows(val_tokens: np.ndarray, *, window_len: int, batch_size: int, num_batches: int,
                 align: int = 1) -> np.ndarray:
    """A fixed validation subset [num_batches, batch_size, window_len] (int32): evenly spaced starts
    (multiples of `align`)."""
    _check_split_fits(len(val_tokens), window_len, "validation")
    last = (len(val_tokens) - window_len) // align
    starts = np.linspace(0, last, num_batches * batch_size).round().astype(np.int64) * align
    return _gather(val_tokens, starts, window_len).reshape(num_batches, batch_size, window_len)


def _gather(tokens: np.ndarray, starts: np.ndarray, window_len: int) -> np.ndarray:
    return np.asarray(tokens[starts[:, None] + np.arange(window_len)], dtype=np.int32)
