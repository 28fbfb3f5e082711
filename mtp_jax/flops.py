"""A configuration's train step counted by formula, before anything compiles: FLOPs per token by
part, the model FLOPs (MFU's numerator) and the hardware FLOPs a chip executes; with the vocabulary
and the name both cost tools (bench.py, measured here; tpu_plan.py, bounded on a TPU) give a
configuration.
"""

from __future__ import annotations

from mtp_jax import attention as attention_lib
from mtp_jax import heads
from mtp_jax.mtp import n_predict


def vocab_size(config) -> int:
    """The vocabulary the data would give, without reading any data."""
    return 256 if config.data.tokenizer == "byte" else config.data.vocab_size


def config_name(config) -> str:
    n = n_predict(config)
    return f"{config.preset} baseline" if n == 1 else f"{config.preset} {config.mtp_head_type} n={n}"


def flops_per_token(config, vocab: int) -> dict[str, float]:
    """One forward pass's FLOPs per token, by part: each transformer block's matmuls and its
    attention (QK^T and AV over all T keys), and the heads (merges and unembeddings)."""
    m, n, t = config.model, n_predict(config), config.seq_len
    d, head_dim = m.d_model, m.head_dim or m.d_model // m.n_heads  # head_dim: explicit (0: d / heads)
    d_q, d_kv = m.n_heads * head_dim, (m.n_kv_heads or m.n_heads) * head_dim  # grouped-query: fewer kv
    head = heads.get(config.mtp_head_type)
    return {
        "blocks": m.n_layers + (n - 1) * head.blocks_per_head,
        "block_matmuls": 2 * (2 * d * d_q + 2 * d * d_kv + 3 * d * m.mlp_dim),
        "attention": 2 * 2 * t * d_q,
        # extra heads project onto the draft vocabulary's tokens when there is one
        "unembeddings": 2 * d * vocab + (n - 1) * head.output_flops(d, config.get("mtp_draft_vocab") or vocab),
        "merges": (n - 1) * head.other_flops(d),
    }


def model_flops(config, vocab: int, *, causal: bool = False) -> float:
    """Analytic model FLOPs of one train step, the numerator of MFU: 3x (forward + backward) the
    forward matmuls, nothing recomputed. Attention counts all T keys per query, as PaLM's and
    MaxText's published MFU did, or (causal) the (T + 1) / 2 a query sees on average."""
    f = flops_per_token(config, vocab)
    attention = f["attention"] * ((config.seq_len + 1) / (2 * config.seq_len) if causal else 1.0)
    per_token = f["blocks"] * (f["block_matmuls"] + attention) + f["unembeddings"] + f["merges"]
    return 3.0 * per_token * config.batch_size * config.seq_len


def hardware_flops(config, vocab: int, platform: str) -> float:
    """FLOPs the chip executes in one train step on `platform`: the model FLOPs, plus each head's
    logits computed once more in the backward pass (the cross-entropy is rematerialised), plus the
    trunk blocks' forward pass once more under model.remat; attention as the implementation runs
    it (blockwise: the key blocks a causal query block sees, and its forward recomputed in the
    backward pass)."""
    f, t = flops_per_token(config, vocab), config.seq_len
    attention, passes = f["attention"], 3  # forward, and the backward's two
    blocks = -(-t // config.model.attention_block_size)
    implementation = attention_lib.resolve(config.model.attention, platform)
    if implementation in ("blockwise", "splash") and blocks > 1:
        attention, passes = attention * (blocks + 1) / (2 * blocks), 4
    per_token = f["blocks"] * (3 * f["block_matmuls"] + passes * attention) + 4 * f["unembeddings"] + 3 * f["merges"]
    if config.model.remat:
        per_token += config.model.n_layers * (f["block_matmuls"] + attention)
    return per_token * config.batch_size * t
