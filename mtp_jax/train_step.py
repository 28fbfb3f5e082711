"""The train step: AdamW and its schedule, one optimizer step, and the step compiled for a mesh.

`make_train_step` builds the model abstractly, shards the state by the parameters' logical axes
and compiles `train_step` once; `train.run`, the benchmark and the TPU planner all take the
`TrainSetup` it returns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp_jax import sharding, trunk_cache
from mtp_jax.checkpoint import abstract_like
from mtp_jax.mtp import TrunkOutputs, build_model, mtp_loss, n_predict
from mtp_jax.schedules import head_weights


def make_optimizer(config, steps: int):
    """AdamW with linear warm-up then cosine decay to 10 % of the peak, and global-norm clipping.

    No weight decay on vectors (norm scales) or on the embedding table."""
    warmup = min(config.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(steps, warmup + 1), end_value=0.1 * config.learning_rate
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim >= 2 and "embedding" not in jax.tree_util.keystr(path), params
        )

    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay, mask=decay_mask),
    )
    return schedule, tx


def trainable_part(params: dict, trainable: str) -> dict:
    """The part of the parameters the optimizer updates (and holds state for): all of them, or
    under trainable='heads' only `heads` (heads 2 … n; for 'parallel' heads head 1's block is the
    decoder's last layer, so it stays frozen with the rest of the decoder). A draft vocabulary's
    token ids are never trained."""
    return (
        {"heads": params["heads"]} if trainable == "heads" else {k: v for k, v in params.items() if k != "draft_vocab"}
    )


def train_step(
    graphdef,
    tx,
    schedule,
    weights_at,
    chunk_size,
    compute_shardings,
    trainable,
    eot_id,
    targets,
    state,
    window,
    mask=None,
    inputs=None,
    trunk=None,
):
    """One optimizer step. A non-finite loss or gradient leaves the parameters untouched and is
    counted, so no NaN ever reaches the parameters (or a checkpoint); nan_policy decides on the
    host whether the run stops. weights_at(step) gives each head's loss weight [n] (schedules.py).
    A task's batch adds its loss mask and model inputs (mtp_loss); trunk_cache, the trunk's outputs.

    Only the trainable parameters are differentiated: the frozen ones enter as constants, so
    no gradient (and, when nothing trainable precedes them, no backward pass) is computed for
    them and they come out bit-identical."""
    step = state["step"]
    weights = weights_at(step)

    def loss_fn(trained):
        params = jax.lax.with_sharding_constraint({**state["params"], **trained}, compute_shardings)
        return mtp_loss(nnx.merge(graphdef, params), window, weights, chunk_size, mask, inputs, eot_id, targets, trunk)

    trained = trainable_part(state["params"], trainable)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trained)
    params = {**state["params"], **optax.apply_updates(trained, updates)}
    finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = {
        "params": keep_old(params, state["params"]),
        "opt_state": keep_old(opt_state, state["opt_state"]),
        "step": step + 1,
        "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (state["first_nonfinite_step"] < 0) & ~finite, step + 1, state["first_nonfinite_step"]
        ),
    }
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(step)}
    if len(weights) > 1:
        metrics.update({f"head_weight_{k}": weights[k - 1] for k in range(2, len(weights) + 1)})
    return new_state, metrics


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a run (or the benchmark) needs to initialise a state and take compiled steps."""

    graphdef: nnx.GraphDef
    init_state: Callable[[], dict]  # () -> a fresh train state; jit it with out_shardings=state_shardings
    abstract_state: dict  # ShapeDtypeStructs with shardings
    state_shardings: dict
    param_shardings: dict
    n_params: int
    # (state, window [B, T + n] int32 [, a task's mask and inputs, same shape] [, TrunkOutputs])
    # -> (state, metrics); donates state
    step_fn: jax.stages.Compiled


def make_train_step(
    config, vocab_size: int, mesh, steps: int, batch_arrays: int = 1, eot_id: int | None = None
) -> TrainSetup:
    """Model, optimizer and shardings for `config`, and the train step compiled once for `mesh`.

    batch_arrays: 1 (window) for text, 3 (window, mask, inputs; all [B, T + n]) for a task.
    eot_id: data.document_mask's end-of-text id (data.document_eot_id), None when off.
    With config.trunk_cache the step also takes the frozen trunk's TrunkOutputs."""

    def make_model():
        return build_model(config, vocab_size, seed=config.seed, platform=mesh.devices.flat[0].platform)

    graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    axes = sharding.logical_axes(abstract_params)
    schedule, tx = make_optimizer(config, steps)

    def init_state():
        params = nnx.to_pure_dict(nnx.split(make_model(), nnx.Param)[1])
        return {
            "params": params,
            "opt_state": tx.init(trainable_part(params, config.trainable)),
            "step": jnp.zeros((), jnp.int32),
            "nonfinite_steps": jnp.zeros((), jnp.int32),
            "first_nonfinite_step": -jnp.ones((), jnp.int32),
        }

    abstract_state = jax.eval_shape(init_state)
    param_shardings = sharding.param_shardings(abstract_state["params"], axes, mesh)
    state_shardings = sharding.state_shardings(abstract_state, param_shardings, mesh)
    abstract_state = abstract_like(abstract_state, state_shardings)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))

    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = jax.ShapeDtypeStruct(
        (config.batch_size, config.seq_len + n_predict(config)), jnp.int32, sharding=batch_sharding
    )
    step = functools.partial(
        train_step,
        graphdef,
        tx,
        schedule,
        functools.partial(head_weights, config, steps=steps),
        config.loss_chunk_size,
        sharding.compute_shardings(param_shardings),
        config.trainable,
        eot_id,
        config.mtp_targets,
    )
    batch, batch_shardings = (abstract_batch,) * batch_arrays, (batch_sharding,) * batch_arrays
    if config.trunk_cache:  # the step takes (state, window, the frozen trunk's outputs)
        batch += (trunk_cache.abstract_outputs(config, batch_sharding),)
        batch_shardings += (TrunkOutputs(*(batch_sharding,) * 3),)
        step = functools.partial(trunk_cache.with_outputs, step)
    step_fn = (
        jax.jit(
            step,
            in_shardings=(state_shardings, *batch_shardings),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )
        .lower(abstract_state, *batch)
        .compile()
    )
    return TrainSetup(graphdef, init_state, abstract_state, state_shardings, param_shardings, n_params, step_fn)


def memory_per_device(memory) -> int:
    """Bytes a compiled step needs on each device (its memory analysis describes one shard of the
    SPMD program); the donated state's buffers are reused for the new state, so counted once."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
