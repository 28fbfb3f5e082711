"""Checks a resolved config before any work starts, so that a bad value costs one line, not a run.

`validate` asks each domain in turn: the MTP heads (mtp.py), their loss schedules
(schedules.py), training, evaluation, the model, and a task's own fields (data/tasks.py); the
first invalid field raises a UserError naming it and its fix.
"""

from __future__ import annotations

import jax

from mtp_jax import mtp, schedules
from mtp_jax.attention import NAMES as ATTENTION_NAMES
from mtp_jax.data import tasks
from mtp_jax.errors import need
from mtp_jax.model import ROPE_SCALINGS
from mtp_jax.mtp import n_predict

DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("stop", "skip")
TRAINABLE = ("all", "heads")


def validate(config, platform: str | None = None) -> None:
    """Raise UserError naming the first invalid field and how to fix it; `platform` is what the
    model will run on (default: jax.default_backend())."""
    mtp.check_config(config)
    schedules.check_config(config)
    check_training(config)
    check_evaluation(config)
    check_model(config.model, platform or jax.default_backend())
    if tasks.task_name(str(config.data.source)) is not None:
        tasks.check_config(config, n_predict(config))


def check_training(config) -> None:
    """Steps, batches, the optimizer, logging and saving, what is trained, and non-finite steps."""
    need(config.loss_chunk_size >= 0, f"loss_chunk_size={config.loss_chunk_size} must be >= 0 (0: no chunking)")
    need(config.batch_size >= 1, f"batch_size={config.batch_size} must be >= 1")
    need(
        config.num_train_steps >= 1 or config.num_epochs >= 1,
        f"num_train_steps={config.num_train_steps} must be >= 1 (or set num_epochs)",
    )
    need(config.num_epochs >= 0, f"num_epochs={config.num_epochs} must be >= 0")
    need(config.learning_rate > 0, f"learning_rate={config.learning_rate} must be > 0")
    for field in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "keep_checkpoints"):
        need(config[field] >= 1, f"{field}={config[field]} must be >= 1")
    need(
        config.nan_policy in NAN_POLICIES,
        f"nan_policy={config.nan_policy!r} is unknown: choose one of {', '.join(NAN_POLICIES)}",
    )
    need(
        config.trainable in TRAINABLE,
        f"trainable={config.trainable!r} is unknown: choose one of {', '.join(TRAINABLE)}",
    )
    need(
        not config.trunk_cache
        or (
            config.trainable == "heads" and config.num_epochs >= 1 and tasks.task_name(str(config.data.source)) is None
        ),
        "trunk_cache=True keeps a frozen trunk's outputs for the next epoch's visit of each text window: it needs "
        "trainable='heads', num_epochs >= 1 and a text source (or set trunk_cache=False)",
    )
    need(
        config.trainable != "heads" or n_predict(config) > 1,
        "trainable='heads' trains heads 2 … n but the model has none: "
        "set --config.use_mtp=True --config.mtp_n_tokens=4",
    )


def check_evaluation(config) -> None:
    """The probes evaluation runs besides the losses (0 turns one off)."""
    need(
        config.induction_batches >= 0 and config.parse_rate_prompts >= 0,
        f"induction_batches={config.induction_batches} and parse_rate_prompts={config.parse_rate_prompts} "
        "must be >= 0 (0: off)",
    )
    need(
        0 < config.parse_rate_tokens < config.seq_len,
        f"parse_rate_tokens={config.parse_rate_tokens} must be in "
        f"1 … seq_len - 1 = {config.seq_len - 1} (the rest of seq_len is the prompt)",
    )


def check_model(m, platform: str) -> None:
    """config.model: the attention heads' sizes, RoPE, norms, dtypes and the attention kernel, which
    must run on `platform`."""
    if m.head_dim:
        need(
            m.head_dim > 0 and m.head_dim % 2 == 0,
            f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs; 0: d_model / n_heads)",
        )
    else:
        need(
            m.d_model % m.n_heads == 0 and (m.d_model // m.n_heads) % 2 == 0,
            f"model.d_model={m.d_model} must be "
            f"a multiple of 2 * model.n_heads={2 * m.n_heads} (even RoPE head size), or set model.head_dim",
        )
    need(
        m.rope_scaling in ROPE_SCALINGS,
        f"model.rope_scaling={m.rope_scaling!r} is unknown: choose one of {', '.join(ROPE_SCALINGS)}",
    )
    need(m.norm_eps > 0, f"model.norm_eps={m.norm_eps} must be > 0")
    need(
        m.n_kv_heads >= 0 and m.n_heads % (m.n_kv_heads or m.n_heads) == 0,
        f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} (0: as many as n_heads)",
    )
    for field in ("dtype", "param_dtype"):
        need(m[field] in DTYPES, f"model.{field}={m[field]!r} is unknown: choose one of {', '.join(DTYPES)}")
    need(
        m.attention in ATTENTION_NAMES,
        f"model.attention={m.attention!r} is unknown: choose one of {', '.join(ATTENTION_NAMES)}",
    )
    need(m.attention_block_size >= 1, f"model.attention_block_size={m.attention_block_size} must be >= 1")
    need(
        m.attention != "splash" or platform == "tpu",
        f"model.attention='splash' is a TPU kernel and this backend is {platform}: use 'auto' or 'blockwise'",
    )
