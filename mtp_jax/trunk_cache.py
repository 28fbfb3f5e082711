"""Heads-only training on cached trunk outputs (config.trunk_cache).

With trainable='heads' the trunk is frozen, so what it computes for a training window never
changes; in epoch mode (num_epochs > 0) every epoch revisits the same windows. The trunk then
runs over each window once, the first time a batch draws it, and its final hidden state, head
1's argmax (the self-distillation targets, mtp.model_targets) and head 1's loss are kept in host
memory; every later visit trains the heads on them alone, skipping the trunk's forward pass and
head 1's logits. Every head type reads only the trunk's output and the window's tokens, so every
one can train this way; the cached outputs give the same loss and gradients as the step through
the frozen trunk (tests/test_draft_heads.py). Memory: 4·(D + 2) bytes per training token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from mtp_jax import data as data_lib
from mtp_jax import sharding
from mtp_jax.mtp import TrunkOutputs, n_predict


def abstract_outputs(config, batch_sharding) -> TrunkOutputs:
    """The shapes of a step's TrunkOutputs, on the batch's sharding."""
    rows = (config.batch_size, config.seq_len)
    return TrunkOutputs(
        jax.ShapeDtypeStruct(rows + (config.model.d_model,), jnp.dtype(config.model.dtype), sharding=batch_sharding),
        jax.ShapeDtypeStruct(rows, jnp.int32, sharding=batch_sharding),
        jax.ShapeDtypeStruct(rows, jnp.float32, sharding=batch_sharding),
    )


def with_outputs(step, state, window, trunk: TrunkOutputs):
    """train.train_step with the trunk's outputs as a positional argument (the compiled step's
    shardings are given per position)."""
    return step(state, window, trunk=trunk)


@functools.partial(jax.jit, static_argnums=(0, 1))
def trunk_outputs(graphdef, chunk_size: int, params, window: jax.Array) -> TrunkOutputs:
    """The frozen trunk's outputs for the inputs of window [B, T + n]."""
    return nnx.merge(graphdef, params).trunk_outputs(window, chunk_size)


class TrunkCache:
    """This process's rows of each step's batch of trunk outputs, computed at a window's first
    visit and read from host memory at every later one. Keyed by the window's start, so every
    epoch's permutation of the same windows finds them."""

    def __init__(self, config, data: data_lib.TokenData, graphdef, mesh):
        self.config, self.graphdef, self.mesh = config, graphdef, mesh
        self.pieces = data_lib.lengths(data.train)
        self.align = data.example_len
        self.rows: dict[int, TrunkOutputs] = {}  # window start -> its row of each output
        self.computed = 0  # windows run through the trunk so far

    def batch(self, params, step: int, window: jax.Array) -> TrunkOutputs:
        """The trunk outputs of `step`'s batch `window` (the global array train_batch built)."""
        config = self.config
        starts = data_lib.global_batch_starts(
            self.pieces,
            window_len=config.seq_len + n_predict(config),
            batch_size=config.batch_size,
            seed=config.seed,
            step=step,
            num_epochs=config.num_epochs,
            align=self.align,
        )
        count = config.batch_size // jax.process_count()
        local = starts[jax.process_index() * count : (jax.process_index() + 1) * count].tolist()
        if any(s not in self.rows for s in local):
            fresh = trunk_outputs(self.graphdef, config.loss_chunk_size, params, window)
            fresh = multihost_utils.global_array_to_host_local_array(fresh, self.mesh, P(sharding.BATCH_AXES))
            for i, s in enumerate(local):
                self.rows[s] = TrunkOutputs(*(np.asarray(column[i]) for column in fresh))
            self.computed += len(local)
        return TrunkOutputs(
            *(sharding.global_batch(np.stack(column), self.mesh) for column in zip(*(self.rows[s] for s in local)))
        )
