"""Loss-weight schedules and the head curriculum: the weight of each head's loss as a function of
the step, evaluated inside the jitted train step so that a resumed run reproduces an
uninterrupted one exactly (nothing extra to checkpoint).

    weight_1(s) = 1
    weight_k(s) = mtp_weight(s) * w_k * on_k(s)          k = 2 … n

`mtp_weight(s)` moves from `mtp_weight` to `mtp_weight_final` (`mtp_weight_schedule`):
  'constant'  never moves (the default: exactly the losses of a fixed `mtp_weight`);
  'stepped'   jumps at `mtp_weight_switch` × steps (DeepSeek-V3: 0.3 -> 0.1 after ~2/3 of training);
  'linear', 'cosine'  start moving at `mtp_weight_switch` × steps and reach the final value at the
              last step.
`on_k(s)` ∈ {0, 1} is the head curriculum (`mtp_curriculum`, Aynetdinov & Akbik 2025): the first
`mtp_curriculum_fraction` of training is cut into n - 1 equal stages;
  'forward'   starts with head 1 alone and brings in heads 2, 3, … n at the stages' starts;
  'reverse'   starts with all n heads and drops heads n, n-1, … 2 at the stages' ends;
  'none'      keeps every head on.
w_k is `mtp_loss_weights` (mtp.auxiliary_weights). A head that is off still runs (its loss and
accuracy are logged) but adds nothing to the total, so no gradient reaches its parameters (weight
decay still shrinks them).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from mtp_jax.errors import need
from mtp_jax.mtp import auxiliary_weights, n_predict

WEIGHT_SCHEDULES = ("constant", "stepped", "linear", "cosine")
CURRICULA = ("none", "forward", "reverse")


def check_config(config) -> None:
    """The schedule and curriculum fields (config.validate)."""
    need(config.mtp_weight >= 0, f"mtp_weight={config.mtp_weight} must be >= 0")
    need(
        config.mtp_weight_schedule in WEIGHT_SCHEDULES,
        f"mtp_weight_schedule={config.mtp_weight_schedule!r} is unknown: choose one of {', '.join(WEIGHT_SCHEDULES)}",
    )
    need(config.mtp_weight_final >= 0, f"mtp_weight_final={config.mtp_weight_final} must be >= 0")
    need(
        config.mtp_curriculum in CURRICULA,
        f"mtp_curriculum={config.mtp_curriculum!r} is unknown: choose one of {', '.join(CURRICULA)}",
    )
    for field in ("mtp_weight_switch", "mtp_curriculum_fraction"):
        need(0 <= config[field] <= 1, f"{field}={config[field]} must be a fraction of training in [0, 1]")


def weight_progress(schedule: str, step, steps: int, switch: float):
    """How far mtp_weight has moved from its initial (0) to its final value (1) at `step`."""
    start = round(switch * steps)
    if schedule == "constant":
        return jnp.float32(0.0)
    if schedule == "stepped":
        return jnp.where(step >= start, 1.0, 0.0).astype(jnp.float32)
    linear = jnp.clip((step - start) / max(steps - start, 1), 0.0, 1.0).astype(jnp.float32)
    return linear if schedule == "linear" else 0.5 * (1.0 - jnp.cos(math.pi * linear))


def heads_on(curriculum: str, step, steps: int, n: int, fraction: float):
    """on_k(step) for k = 1 … n, [n] float32 of 0s and 1s (head 1 is always on)."""
    stage = fraction * steps / max(n - 1, 1)  # steps per curriculum stage
    on = [jnp.float32(1.0)]
    for k in range(2, n + 1):
        if curriculum == "forward":
            on.append(jnp.where(step >= round((k - 1) * stage), 1.0, 0.0).astype(jnp.float32))
        elif curriculum == "reverse":
            on.append(jnp.where(step < round((n - k + 1) * stage), 1.0, 0.0).astype(jnp.float32))
        else:
            on.append(jnp.float32(1.0))
    return jnp.stack(on)


def mtp_weight(config, step, steps: int):
    """The scheduled mtp_weight at `step` of a `steps`-step run (a float32 scalar)."""
    t = weight_progress(config.mtp_weight_schedule, step, steps, config.mtp_weight_switch)
    # (1 - t) * a + t * b is exactly a at t = 0 and exactly b at t = 1.
    return (1.0 - t) * jnp.float32(config.mtp_weight) + t * jnp.float32(config.mtp_weight_final)


def head_weights(config, step, steps: int):
    """Each head's weight in the total loss at `step`, [n] float32 (traceable in the step).

    The products mtp_weight * w_k are rounded to float32 from Python's doubles, as a fixed tuple
    of weights would be, so a constant schedule gives the losses of fixed weights bit for bit."""
    n = n_predict(config)
    w = auxiliary_weights(config.mtp_loss_weights, n)
    t = weight_progress(config.mtp_weight_schedule, step, steps, config.mtp_weight_switch)
    initial = jnp.asarray((1.0,) + tuple(config.mtp_weight * x for x in w), jnp.float32)
    final = jnp.asarray((1.0,) + tuple(config.mtp_weight_final * x for x in w), jnp.float32)
    on = heads_on(config.mtp_curriculum, step, steps, n, config.mtp_curriculum_fraction)
    return ((1.0 - t) * initial + t * final) * on
