"""config.json ↔ config.model: the architectures that import, each a few fields of a Hugging Face
config.json (or of the config gguf.py reads from a GGUF file's metadata), read here and nowhere
else; and the config.json export writes for our model. hf.py maps the tensors.
"""

from __future__ import annotations

import math

from mtp_jax.errors import UserError
from mtp_jax.hf_files import RESAVE

NORM_EPS = 1e-6  # rms_norm_eps where a config.json leaves it out (LlamaConfig's default)
# The architectures that map onto this model (class name: model_type). They differ in a few fields
# of config.json, which model_fields reads: Qwen2 has query, key and value biases; Mistral may
# have a sliding window, imported only where it covers seq_len (attention_window).
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# config.json's sizes, each a positive integer.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_json(shape, max_positions: int, eos_token_id: int | None) -> dict:
    """config.json from our ModelShape: a LlamaForCausalLM, or a Qwen2ForCausalLM when the
    attention has query, key and value biases (transformers' Llama would add one to o_proj too)."""
    rope = {
        "rope_type": "default" if shape.rope_scaling == "none" else shape.rope_scaling,
        "rope_theta": shape.rope_theta,
    }
    if shape.rope_scaling != "none":
        rope["factor"] = shape.rope_factor
    if shape.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=shape.rope_low_freq_factor,
            high_freq_factor=shape.rope_high_freq_factor,
            original_max_position_embeddings=shape.rope_original_context,
        )
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if shape.qkv_bias else ("LlamaForCausalLM", "llama")
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.d_model,
        "intermediate_size": shape.mlp_dim,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": shape.norm_eps,
        "tie_word_embeddings": shape.tie_embeddings,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta (and rope_scaling).
        "rope_theta": shape.rope_theta,
        "rope_parameters": rope,
        **({"rope_scaling": rope} if shape.rope_scaling != "none" else {}),
        "attention_bias": False,
        "mlp_bias": False,
        "max_position_embeddings": max_positions,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def model_fields(hf: dict, where: str) -> dict:
    """config.model's shape fields from a config.json of one of ARCHITECTURES, every value they
    come from checked; refuses, by name, what is missing or malformed and what our model does not
    implement. This is the one place that reads an architecture's fields."""

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise UserError(f"{where} {problem}: it is not a config this model can take; {RESAVE}")

    def unsupported(name: str, value, ours) -> None:
        if value != ours:
            raise UserError(
                f"{where} sets {name}={value!r:.80}, which this model does not implement (it has "
                f"{name}={ours!r}): only {', '.join(ARCHITECTURES)} layers import"
            )

    archs = hf.get("architectures")
    need(
        archs is None or (isinstance(archs, list) and all(isinstance(a, str) for a in archs)),
        f"sets architectures={archs!r}, which is not a list of class names",
    )
    arch = architecture(hf)
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{where} describes a {arch!s:.80}, which does not map onto this model: it imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    for name in _SIZES:
        need(name in hf, f"lacks {name}")
        need(positive_int(hf[name]), f"sets {name}={hf[name]!r:.80}, which is not a positive integer")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else kv_heads
    need(
        positive_int(kv_heads) and heads % kv_heads == 0,
        f"sets num_key_value_heads={kv_heads!r:.80}, which does not divide num_attention_heads={heads}",
    )
    head_dim = hf.get("head_dim") or d // heads
    need(
        positive_int(head_dim) and head_dim % 2 == 0 and (hf.get("head_dim") or d % heads == 0),
        f"sets head_dim={head_dim!r:.80} (hidden_size={d}, num_attention_heads={heads}): this model needs an "
        "even head size",
    )
    eps = hf.get("rms_norm_eps", NORM_EPS)
    need(positive_number(eps), f"sets rms_norm_eps={eps!r:.80}, which is not a positive number")
    tie = hf.get("tie_word_embeddings")
    need(tie is None or isinstance(tie, bool), f"sets tie_word_embeddings={tie!r:.80}, which is not true or false")
    unsupported("hidden_act", hf.get("hidden_act", "silu"), "silu")
    unsupported("mlp_bias", hf.get("mlp_bias", False), False)
    if arch != "Qwen2ForCausalLM":  # Llama's attention_bias adds an o_proj bias as well
        unsupported("attention_bias", hf.get("attention_bias", False), False)
    return {
        "d_model": d,
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "mlp_dim": hf["intermediate_size"],
        "tie_embeddings": bool(tie),
        "norm_eps": float(eps),
        "head_dim": 0 if head_dim * heads == d else head_dim,
        "qkv_bias": arch == "Qwen2ForCausalLM",
        **rope_fields(hf, where, need),
    }


def rope_fields(hf: dict, where: str, need) -> dict:
    """config.model's rope fields from rope_parameters (transformers >= 5) or rope_theta and
    rope_scaling (earlier versions); refuses a rope type other than default, linear and llama3."""
    for key in ("rope_scaling", "rope_parameters"):
        need(isinstance(hf.get(key) or {}, dict), f"sets {key}={hf.get(key)!r:.80}, which is not an object")
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    need(positive_number(theta), f"sets rope_theta={theta!r:.80}, which is not a positive number")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise UserError(
            f"{where} sets rope_type={kind!r:.80}, which this model does not implement: it imports "
            "the rope types default, linear and llama3"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(
            f"{where} sets partial_rotary_factor={rope['partial_rotary_factor']!r:.80}, which this model "
            "does not implement: it rotates every dimension of a head"
        )
    fields = {"rope_theta": float(theta), "rope_scaling": "none" if kind == "default" else kind}
    if kind == "default":
        return fields
    names = {"rope_factor": "factor"}
    if kind == "llama3":
        names.update(
            rope_low_freq_factor="low_freq_factor",
            rope_high_freq_factor="high_freq_factor",
            rope_original_context="original_max_position_embeddings",
        )
    for ours, theirs in names.items():
        value = rope.get(theirs)
        need(positive_number(value), f"sets rope_parameters.{theirs}={value!r:.80}, which is not a positive number")
        fields[ours] = int(value) if ours == "rope_original_context" else float(value)
    if kind == "llama3":
        need(
            fields["rope_high_freq_factor"] > fields["rope_low_freq_factor"],
            "sets rope_parameters.high_freq_factor no larger than low_freq_factor",
        )
    return fields


def attention_window(hf: dict) -> int | None:
    """The sliding window of the config's attention layers, or None when they read every position
    (Mistral's sliding_window; Qwen2's when use_sliding_window)."""
    window = hf.get("sliding_window")
    uses = hf.get("use_sliding_window", False) if architecture(hf) == "Qwen2ForCausalLM" else True
    return window if uses and positive_int(window) else None


def architecture(hf: dict) -> str:
    """The class a config.json names (its first architecture, else its model_type's class)."""
    archs = hf.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = hf.get("model_type")
    return next((arch for arch, name in ARCHITECTURES.items() if name == model_type), str(model_type or "?"))


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def positive_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
