"""How well the extra heads would draft for self-speculative decoding, measured on real text.

Teacher-forced: with the true tokens as context, head k's argmax at t is accepted when it equals
head 1's argmax at t + k - 1 (DeepSeek-V3 and Megatron's metric), which greedy decoding loops
cannot inflate by repeating themselves. `rank_acceptance` does the same for each of a head's top
tokens, which is what a Medusa tree (speculative.Tree) is fitted to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import data as data_lib
from mtp_jax.mtp import MTPModel, n_predict
from mtp_jax.speculative import Tree


@functools.partial(jax.jit, static_argnums=(0, 1))
def teacher_forced_acceptance(graphdef, chunk_size: int, params, window: jax.Array) -> dict:
    """Draft acceptance on window [B, T + n]. Returns 'acceptance_k' for k >= 2 and
    'mean_accepted', the expected tokens per verify pass: 1 + sum_k P(drafts 2 … k all accepted),
    over the positions where every head can be checked."""
    model = nnx.merge(graphdef, params)
    n, t = model.n_predict, window.shape[1] - model.n_predict
    greedy = [model.greedy(k, h, chunk_size) for k, h in enumerate(model.hidden_states(window, t), 1)]
    metrics, prefix, expected = {}, True, 1.0
    for k in range(2, n + 1):
        agree = greedy[k - 1][:, : t - k + 1] == greedy[0][:, k - 1 :]  # [B, T - k + 1]
        metrics[f"acceptance_{k}"] = jnp.mean(agree)
        prefix = prefix & agree[:, : t - n + 1]
        expected = expected + jnp.mean(prefix)
    metrics["mean_accepted"] = expected
    return metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def rank_acceptance(graphdef, ranks: int, params, window: jax.Array) -> jax.Array:
    """[n - 1, ranks]: with the true tokens as context (window [B, T + n]), the fraction of
    positions t where head k's rank-r token (k = 2 … n, r < ranks) equals head 1's argmax at
    t + k - 1, i.e. where a greedy tree's candidate would be accepted."""
    model = nnx.merge(graphdef, params)
    t = window.shape[1] - model.n_predict
    rows = []
    for k, h in enumerate(model.hidden_states(window, t), 1):
        if k == 1:
            greedy = model.greedy(1, h)  # [B, T]
            continue

        def ranks_of(row, k=k):  # one sequence at a time: at most [T, V] logits exist
            h_row, target = row
            logits = model.logits(k, h_row)  # [T - k + 1, V]
            rank = jnp.sum(logits > jnp.take_along_axis(logits, target[:, None], axis=-1), axis=-1)
            return jnp.mean(jax.nn.one_hot(rank, ranks), axis=0)

        rows.append(jnp.mean(jax.lax.map(ranks_of, (h[:, : t - k + 1], greedy[:, k - 1 :])), axis=0))
    return jnp.stack(rows)


def tree_windows(config, val_tokens) -> np.ndarray:
    """The validation windows a tree is fitted on, [eval_batches, batch_size, seq_len + n]: those
    evaluation uses (though not aligned to a task's packed problems). Training keeps them in the
    workdir (workdir.VAL_WINDOWS)."""
    return data_lib.eval_windows(
        val_tokens,
        window_len=config.seq_len + n_predict(config),
        batch_size=config.batch_size,
        num_batches=config.eval_batches,
    )


def build_tree(model: MTPModel, windows: np.ndarray, size: int, ranks: int = 8) -> Tree:
    """The `size`-node tree (root excluded) that maximises the expected accepted length under the
    per-head, per-rank acceptance measured on `windows` (tree_windows)."""
    graphdef, params = nnx.split(model, nnx.Param)
    acceptance = np.mean([np.asarray(rank_acceptance(graphdef, ranks, params, b)) for b in windows], axis=0)
    return Tree.build(acceptance, size)
