"""Checks a resolved config before any work starts, so that a bad value costs one line, not a run."""

from __future__ import annotations

import jax

from mtp_jax import heads
from mtp_jax.attention import NAMES as ATTENTION_NAMES
from mtp_jax.data import tasks
from mtp_jax.errors import UserError
from mtp_jax.model import ROPE_SCALINGS
from mtp_jax.mtp import TARGETS, WEIGHT_SCHEMES, n_predict
from mtp_jax.schedules import CURRICULA, WEIGHT_SCHEDULES

DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("stop", "skip")
TRAINABLE = ("all", "heads")


def validate(config, platform: str | None = None) -> None:
    """Raise UserError naming the first invalid field and how to fix it; `platform` is what the
    model will run on (default: jax.default_backend())."""

    def need(ok: bool, message: str):
        if not ok:
            raise UserError(message)

    need(
        config.mtp_n_tokens >= 1, f"mtp_n_tokens={config.mtp_n_tokens} must be >= 1 (1 is plain next-token prediction)"
    )
    head_type = heads.get(config.mtp_head_type)
    n = n_predict(config)
    scheme = config.mtp_loss_weights
    if scheme not in WEIGHT_SCHEMES:
        try:
            weights = [float(w) for w in scheme.split(",")]
        except ValueError:
            raise UserError(
                f"mtp_loss_weights={scheme!r} is unknown: choose one of "
                f"{', '.join(WEIGHT_SCHEMES)} or give n-1 comma-separated floats"
            ) from None
        need(
            len(weights) == n - 1 or n == 1,
            f"mtp_loss_weights={scheme!r} has {len(weights)} weights "
            f"but mtp_n_tokens={n} needs {n - 1} (one per extra head)",
        )
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
    need(
        config.seq_len > config.mtp_n_tokens,
        f"seq_len={config.seq_len} must exceed mtp_n_tokens={config.mtp_n_tokens}: raise seq_len or lower mtp_n_tokens",
    )
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
        config.induction_batches >= 0 and config.parse_rate_prompts >= 0,
        f"induction_batches={config.induction_batches} and parse_rate_prompts={config.parse_rate_prompts} "
        "must be >= 0 (0: off)",
    )
    need(
        0 < config.parse_rate_tokens < config.seq_len,
        f"parse_rate_tokens={config.parse_rate_tokens} must be in "
        f"1 … seq_len - 1 = {config.seq_len - 1} (the rest of seq_len is the prompt)",
    )
    need(
        config.nan_policy in NAN_POLICIES,
        f"nan_policy={config.nan_policy!r} is unknown: choose one of {', '.join(NAN_POLICIES)}",
    )
    need(
        config.trainable in TRAINABLE,
        f"trainable={config.trainable!r} is unknown: choose one of {', '.join(TRAINABLE)}",
    )
    need(
        config.mtp_targets in TARGETS,
        f"mtp_targets={config.mtp_targets!r} is unknown: choose one of {', '.join(TARGETS)}",
    )
    need(config.mtp_draft_vocab >= 0, f"mtp_draft_vocab={config.mtp_draft_vocab} must be >= 0 (0: all tokens)")
    need(
        config.mtp_draft_vocab == 0 or head_type.shares_unembedding,
        f"mtp_draft_vocab restricts the shared unembedding, which {head_type.name!r} heads do not use: choose "
        f"another mtp_head_type, or set mtp_draft_vocab=0",
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
        config.trainable != "heads" or n > 1,
        "trainable='heads' trains heads 2 … n but the model has none: "
        "set --config.use_mtp=True --config.mtp_n_tokens=4",
    )
    m = config.model
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
    need(
        m.n_layers >= head_type.min_layers,
        f"model.n_layers={m.n_layers} is too small: {head_type.name!r} heads need >= {head_type.min_layers}",
    )
    for field in ("dtype", "param_dtype"):
        need(m[field] in DTYPES, f"model.{field}={m[field]!r} is unknown: choose one of {', '.join(DTYPES)}")
    need(
        m.attention in ATTENTION_NAMES,
        f"model.attention={m.attention!r} is unknown: choose one of {', '.join(ATTENTION_NAMES)}",
    )
    need(m.attention_block_size >= 1, f"model.attention_block_size={m.attention_block_size} must be >= 1")
    platform = platform or jax.default_backend()
    need(
        m.attention != "splash" or platform == "tpu",
        f"model.attention='splash' is a TPU kernel and this backend is {platform}: use 'auto' or 'blockwise'",
    )
    if tasks.task_name(str(config.data.source)) is not None:
        tasks.check_config(config, n)
