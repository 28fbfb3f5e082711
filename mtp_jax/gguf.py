"""llama.cpp's GGUF files, read as a Hugging Face folder: the file's metadata as the config.json
transformers would write for it, its tensors under their Hugging Face names (dequantized to
float32 when read), and the tokenizer it embeds as a `tokenizers` tokenizer. hf.py's one mapping
does the rest (hf.open_folder), as for a folder.

Reading uses the `gguf` package, llama.cpp's own reader and dequantizer (pip install -e '.[gguf]').
llama.cpp's converter permutes the rows of a Llama model's query and key weights (its RoPE pairs
dimensions i and i + 1 of a head, Hugging Face's i and i + H/2); reading undoes it. Everything the
import does not implement (another architecture, a quantization outside QUANTIZATIONS, RoPE
frequency factors, a sentencepiece tokenizer) is refused in one line that names it.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np
import tokenizers

from mtp_jax.errors import UserError

# GGUF architecture → (the transformers class it is, whether its query and key rows are permuted).
ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}
QUANTIZATIONS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# GGUF tensor name → Hugging Face name; blk.{l}. becomes model.layers.{l}.
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# How text is split before byte-level BPE, by tokenizer.ggml.pre (as transformers' GGUF loader
# splits it); any other value: GPT-2's split (the ByteLevel pre-tokenizer's own).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, under its Hugging Face name and shape; read() dequantizes it."""

    file: pathlib.Path
    shape: tuple[int, ...]  # Hugging Face's: [out, in] for a Linear weight
    data: np.ndarray  # the file's bytes (memory-mapped) or values
    quantization: str
    heads: int = 0  # > 0: undo llama.cpp's row permutation over this many heads

    def read(self) -> np.ndarray:
        import gguf

        values = gguf.quants.dequantize(self.data, gguf.GGMLQuantizationType[self.quantization])
        values = np.asarray(values, np.float32).reshape(self.shape)
        if self.heads:  # rows (head, pair i, 2) → (head, 2, pair i)
            values = values.reshape(self.heads, -1, 2, *self.shape[1:]).swapaxes(1, 2).reshape(self.shape)
        return values


def read_model(path: pathlib.Path) -> tuple[dict, dict[str, GGUFTensor]]:
    """(config.json's fields, {Hugging Face name: tensor}) of the GGUF file `path`, no tensor read."""
    reader = _reader(path)
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{path} holds a {arch!r:.40} model, which does not map onto this model: it imports the "
            f"GGUF architectures {', '.join(ARCHITECTURES)}"
        )
    config = _config(meta, arch, {t.name for t in reader.tensors})
    heads = {
        "attn_q.weight": config.get("num_attention_heads", 0),
        "attn_k.weight": config.get("num_key_value_heads", config.get("num_attention_heads", 0)),
    }
    tensors = {}
    for t in reader.tensors:
        name, layer = _hf_name(t.name, path)
        quantization = t.tensor_type.name
        if quantization not in QUANTIZATIONS:
            raise UserError(
                f"tensor {t.name} in {path} is {quantization}, which this import does not read: it reads "
                f"{', '.join(QUANTIZATIONS)}; quantize the model to one of them with llama.cpp"
            )
        permuted = ARCHITECTURES[arch][1] and layer in heads
        tensors[name] = GGUFTensor(
            path, tuple(int(n) for n in reversed(t.shape)), t.data, quantization, heads[layer] if permuted else 0
        )
    return config, tensors


def embeds_tokenizer(path: pathlib.Path) -> bool:
    """Whether the GGUF file `path` describes a tokenizer (read_tokenizer builds byte-level ones)."""
    return "tokenizer.ggml.model" in _reader(path).fields


def read_tokenizer(path: pathlib.Path) -> tokenizers.Tokenizer:
    """The byte-level BPE tokenizer the GGUF file `path` embeds, built as transformers' GGUF
    loader builds it: its vocabulary and merges, its control tokens special, its user-defined
    tokens added, text split by its tokenizer.ggml.pre."""
    meta = _Metadata(_reader(path), path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{path} embeds a {kind!r:.40} tokenizer, which this import does not build (it builds "
            "byte-level BPE, 'gpt2'): pass --config.data.tokenizer=PATH to the model's tokenizer.json"
        )
    tokens, merges = meta.need("tokenizer.ggml.tokens"), meta.need("tokenizer.ggml.merges")
    kinds = meta.get("tokenizer.ggml.token_type", [])
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): i
        for i, token in enumerate(tokens)
    }
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tokenizer.pre_tokenizer = (
        level
        if split is None
        else tokenizers.pre_tokenizers.Sequence(
            [tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"), level]
        )
    )
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel (as transformers has it).
    tokenizer.add_special_tokens(
        [
            tokenizers.AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, kinds)
            if k == _CONTROL and set(t) <= alphabet
        ]
    )
    tokenizer.add_tokens(
        [tokenizers.AddedToken(t, normalized=False) for t, k in zip(tokens, kinds) if k == _USER_DEFINED and t in vocab]
    )
    return tokenizer


def _reader(path: pathlib.Path):
    """The file's GGUFReader, kept for the file as it is now: parsing its metadata takes seconds,
    and an import reads it for the config, then for the weights and the tokenizer."""
    try:
        stat = path.stat()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): check that it is a readable file") from None
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _parse(path: pathlib.Path, mtime_ns: int, size: int):
    try:
        import gguf
    except ImportError:
        raise UserError(f"reading {path} needs the gguf package: pip install -e '.[gguf]'") from None
    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): check that it is a readable file") from None
    except (ValueError, IndexError, KeyError) as e:  # what the reader raises on a file that is not GGUF
        raise UserError(
            f"{path} is not a GGUF file the gguf package reads ({' '.join(str(e).split())[:120]}): "
            "pass a .gguf model written by llama.cpp, or a Hugging Face folder"
        ) from None


class _Metadata:
    """A GGUF file's key-value metadata, each value read when first asked for."""

    def __init__(self, reader, path: pathlib.Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str):
        if key not in self.fields:
            raise UserError(
                f"{self.path} lacks the metadata {key}: it is not a complete GGUF model; convert it again "
                "with llama.cpp"
            )
        return self.get(key)


def _config(meta: _Metadata, arch: str, names: set[str]) -> dict:
    """config.json's fields for the file's model (hf_config.model_fields checks them)."""
    if "rope_freqs.weight" in names:
        raise UserError(
            f"{meta.path} holds rope_freqs.weight (RoPE frequency factors, Llama 3.1's context "
            "extension), which this GGUF import does not read: import the model's Hugging Face folder"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(
            f"{meta.path} sets {arch}.rope.scaling.type={scaling!r:.40}, which this import does not "
            "implement: it imports none and linear; import the model's Hugging Face folder"
        )
    heads = meta.need(f"{arch}.attention.head_count")
    config = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": arch,
        "vocab_size": meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])) or None,
        "hidden_size": meta.need(f"{arch}.embedding_length"),
        "intermediate_size": meta.need(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.need(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "rms_norm_eps": meta.need(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10_000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "max_position_embeddings": meta.get(f"{arch}.context_length"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    head_dim = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count"))
    if head_dim is not None:
        config["head_dim"] = head_dim
        rotated = meta.get(f"{arch}.rope.dimension_count", head_dim)
        if rotated != head_dim:
            raise UserError(
                f"{meta.path} rotates {rotated} of each head's {head_dim} dimensions (partial RoPE), "
                "which this model does not implement: it rotates them all"
            )
    if scaling == "linear":
        config["rope_parameters"] = {
            "rope_type": "linear",
            "rope_theta": config["rope_theta"],
            "factor": meta.need(f"{arch}.rope.scaling.factor"),
        }
    return {key: value for key, value in config.items() if value is not None}


def _hf_name(name: str, path: pathlib.Path) -> tuple[str, str | None]:
    """(Hugging Face name, the name within its layer or None) of GGUF tensor `name`."""
    if name in _NAMES:
        return _NAMES[name], None
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}", parts[2]
    raise UserError(
        f"{path} holds tensor {name!r:.80}, which no layer of this model has: only Llama and Qwen2 layers import"
    )


@functools.cache
def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}
