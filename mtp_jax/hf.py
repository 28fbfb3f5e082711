"""The one mapping between our parameter tree and the Hugging Face Llama layout, and the folder
that holds it. `export.py` writes such folders; `--config.init_from` (train.py) reads them, ours or
any saved by transformers' `save_pretrained` for a `LlamaForCausalLM`.

A folder holds
  config.json              LlamaForCausalLM's config: transformers loads the folder with no code of ours
  model.safetensors        every tensor, float32 (a transformers folder may shard them, with an index)
  mtp_jax.json             what transformers cannot express: head type, n, loss weights, tokenizer
  tokenizer.json           BPE models (with tokenizer_config.json); byte-level models get TOKENIZER.md

Tensor names (L = num_hidden_layers; D, V, M = hidden, vocabulary and MLP sizes; N, N_kv, H =
query heads, key/value heads, head size; head k >= 2 is stored at i = k - 2). HF Linear weights
are [out, in], ours [in, out]:
  model.embed_tokens.weight                         [V, D]      decoder.embedding
  model.layers.{l}.input_layernorm.weight           [D]         blocks[l].attn_norm.scale
  model.layers.{l}.self_attn.q_proj.weight          [N·H, D]    blocks[l].attn.wq [D, N, H]
  model.layers.{l}.self_attn.{k,v}_proj.weight      [N_kv·H, D] blocks[l].attn.wk, wv [D, N_kv, H]
  model.layers.{l}.self_attn.o_proj.weight          [D, N·H]    blocks[l].attn.wo [N, H, D]
  model.layers.{l}.post_attention_layernorm.weight  [D]         blocks[l].mlp_norm.scale
  model.layers.{l}.mlp.{gate,up,down}_proj.weight   [M, D], [M, D], [D, M]   blocks[l].mlp.w_*
  model.norm.weight                                 [D]         decoder.final_norm.scale (every head's)
  lm_head.weight                                    [V, D]      decoder.unembedding (absent when tied)
The heads, which transformers ignores:
  linear      extra_heads.{i}.weight                [V, D]      (Meta's multi-token models' name)
  parallel    extra_heads.{i}.<a layer's names>     one decoder layer each, named as model.layers.{l}
  sequential  model.layers.{L+i}.<a layer's names>, .enorm.weight, .hnorm.weight [D] and
              .eh_proj.weight [D, 2D]: DeepSeek-V3's MTP modules. As there, eh_proj reads
              [enorm(embedding); hnorm(hidden)] (our `merge` reads the halves the other way round).
              The embedding, final norm and output head are the model's own, so DeepSeek's
              per-module copies (embed_tokens, shared_head) are not written.

RoPE needs no permutation: model.rope rotates the two halves of each head as HF's rotate_half
does, with the same frequencies theta^(-2i/H) (tests/test_hf.py checks the logits).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from flax import nnx
from safetensors import SafetensorError

from mtp_jax.cli import new_folders, remove_empty
from mtp_jax.data import EOT
from mtp_jax.errors import UserError
from mtp_jax.mtp import HEAD_TYPES, build_model, loss_weights

FORMAT = 1  # mtp_jax.json's format version
NORM_EPS = 1e-6  # model.RMSNorm's epsilon
WEIGHTS, INDEX, MTP_FILE = "model.safetensors", "model.safetensors.index.json", "mtp_jax.json"
RESAVE = "save the folder again (python -m mtp_jax.export or transformers' save_pretrained)"
# config.json's sizes, each a positive integer.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# safetensors' dtypes: bytes per element; weights import from the float ones.
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype(jnp.bfloat16), "F32": np.dtype("<f4"),
                "F64": np.dtype("<f8")}

# One decoder layer: (HF name under the layer's prefix, path under our block, layout). Layouts:
# 'same' is stored as is; 'linear' is a Linear weight whose first dimension is its input and
# 'linear2' one whose first two are ([N, H, D] → [D, N·H]); 'merge' is eh_proj (see above).
_LAYER = (
    ("input_layernorm.weight", ("attn_norm", "scale"), "same"),
    ("self_attn.q_proj.weight", ("attn", "wq"), "linear"),
    ("self_attn.k_proj.weight", ("attn", "wk"), "linear"),
    ("self_attn.v_proj.weight", ("attn", "wv"), "linear"),
    ("self_attn.o_proj.weight", ("attn", "wo"), "linear2"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "same"),
    ("mlp.gate_proj.weight", ("mlp", "w_gate"), "linear"),
    ("mlp.up_proj.weight", ("mlp", "w_up"), "linear"),
    ("mlp.down_proj.weight", ("mlp", "w_down"), "linear"),
)


def layout(n_layers: int, tie_embeddings: bool, n: int, head_type: str, heads: bool = True):
    """[(HF tensor name, path in our parameter tree, layout)] for a model; heads=False: the
    trunk only (embedding, layers, final norm, unembedding)."""
    def layer(prefix: str, path: tuple):
        return [(f"{prefix}.{name}", path + sub, kind) for name, sub, kind in _LAYER]

    rows = [("model.embed_tokens.weight", ("decoder", "embedding"), "same")]
    for i in range(n_layers):
        rows += layer(f"model.layers.{i}", ("decoder", "blocks", i))
    rows.append(("model.norm.weight", ("decoder", "final_norm", "scale"), "same"))
    if not tie_embeddings:
        rows.append(("lm_head.weight", ("decoder", "unembedding"), "linear"))
    for i in range(n - 1 if heads else 0):
        if head_type == "linear":
            rows.append((f"extra_heads.{i}.weight", ("heads", i), "linear"))
        elif head_type == "parallel":
            rows += layer(f"extra_heads.{i}", ("heads", i))
        else:
            prefix = f"model.layers.{n_layers + i}"
            rows += [(f"{prefix}.enorm.weight", ("heads", i, "embed_norm", "scale"), "same"),
                     (f"{prefix}.hnorm.weight", ("heads", i, "hidden_norm", "scale"), "same"),
                     (f"{prefix}.eh_proj.weight", ("heads", i, "merge"), "merge")]
            rows += layer(prefix, ("heads", i, "block"))
    return rows


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """Our array → the HF tensor (an exact permutation of its elements)."""
    if kind == "same":
        return x
    if kind == "merge":  # ours: [hidden; embedding] rows; DeepSeek's eh_proj: [embedding; hidden] columns
        x = np.concatenate(np.split(x, 2)[::-1])
    n_in = 2 if kind == "linear2" else 1
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)


def from_hf(y: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor → our array of `shape` (the inverse of to_hf)."""
    if kind == "same":
        return y.reshape(shape)
    x = y.T.reshape(shape)
    return np.concatenate(np.split(x, 2)[::-1]) if kind == "merge" else x


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape to_hf gives an array of our `shape`."""
    if kind == "same":
        return tuple(shape)
    n_in = 2 if kind == "linear2" else 1
    return math.prod(shape[n_in:]), math.prod(shape[:n_in])


# ---------------------------------------------------------------------------------------------
# config.json ↔ config.model
# ---------------------------------------------------------------------------------------------


def llama_config(shape, max_positions: int, eos_token_id: int | None) -> dict:
    """config.json for LlamaForCausalLM from our ModelShape."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": shape.vocab_size, "hidden_size": shape.d_model, "intermediate_size": shape.mlp_dim,
        "num_hidden_layers": shape.n_layers, "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim, "hidden_act": "silu",
        "rms_norm_eps": NORM_EPS, "tie_word_embeddings": shape.tie_embeddings,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta.
        "rope_theta": shape.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "attention_bias": False, "mlp_bias": False, "max_position_embeddings": max_positions,
        "bos_token_id": None, "eos_token_id": eos_token_id, "torch_dtype": "float32", "dtype": "float32",
    }


def model_fields(hf: dict, where: str) -> dict:
    """config.model's shape fields from a LlamaForCausalLM config.json, every value they come from
    checked; refuses, by name, what is missing or malformed and what our model does not implement."""
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise UserError(f"{where} {problem}: it is not a Llama config this model can take; {RESAVE}")

    archs = hf.get("architectures")
    need(archs is None or (isinstance(archs, list) and all(isinstance(a, str) for a in archs)),
         f"sets architectures={archs!r}, which is not a list of class names")
    arch = (archs or [hf.get("model_type", "?")])[0]
    if arch != "LlamaForCausalLM":
        raise UserError(f"{where} describes a {arch!s:.80}, not a LlamaForCausalLM: only the Llama architecture "
                        "maps onto this model")
    for name in _SIZES:
        need(name in hf, f"lacks {name}")
        need(_positive_int(hf[name]), f"sets {name}={hf[name]!r:.80}, which is not a positive integer")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else kv_heads
    need(_positive_int(kv_heads) and heads % kv_heads == 0,
         f"sets num_key_value_heads={kv_heads!r:.80}, which does not divide num_attention_heads={heads}")
    need(d % (2 * heads) == 0, f"sets hidden_size={d} and num_attention_heads={heads}: this model needs an even "
         "head size (hidden_size a multiple of 2 x num_attention_heads)")
    rope = hf.get("rope_parameters") or {}
    need(isinstance(rope, dict), f"sets rope_parameters={rope!r:.80}, which is not an object")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    need(_positive_number(theta), f"sets rope_theta={theta!r:.80}, which is not a positive number")
    tie = hf.get("tie_word_embeddings")
    need(tie is None or isinstance(tie, bool), f"sets tie_word_embeddings={tie!r:.80}, which is not true or false")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "rope_scaling": (hf.get("rope_scaling"), None),
        "rope_parameters.rope_type": (rope.get("rope_type", "default"), "default"),
        "rms_norm_eps": (hf.get("rms_norm_eps", NORM_EPS), NORM_EPS),
        "head_dim": (hf.get("head_dim") or d // heads, d // heads),
    }
    for name, (value, ours) in unsupported.items():
        if value != ours:
            raise UserError(f"{where} sets {name}={value!r:.80}, which this model does not implement (it has "
                            f"{name}={ours!r}): only plain Llama layers import")
    return {"d_model": d, "n_layers": hf["num_hidden_layers"], "n_heads": heads, "n_kv_heads": kv_heads,
            "mlp_dim": hf["intermediate_size"], "tie_embeddings": bool(tie), "rope_theta": float(theta)}


def mtp_heads(mtp: dict, where: str) -> tuple[int, str] | None:
    """(n, head type) of the heads an mtp_jax.json says its folder holds, or None, every field
    this reads checked."""
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise UserError(f"{where} {problem}: export the model again with python -m mtp_jax.export")

    version = mtp.get("format", FORMAT)
    need(_positive_int(version), f"sets format={version!r:.80}, which is not a format version")
    if version > FORMAT:
        raise UserError(f"{where} has format {version} and this mtp_jax reads format {FORMAT}: a newer mtp_jax "
                        "wrote it; update mtp_jax")
    tokenizer = mtp.get("tokenizer")
    need(tokenizer is None or isinstance(tokenizer, str), f"sets tokenizer={tokenizer!r:.80}, which is not a name")
    use_mtp = mtp.get("use_mtp", False)
    need(isinstance(use_mtp, bool), f"sets use_mtp={use_mtp!r:.80}, which is not true or false")
    n = mtp.get("mtp_n_tokens", 1) if use_mtp else 1
    need(_positive_int(n), f"sets mtp_n_tokens={n!r:.80}, which is not a positive integer")
    if n == 1:
        return None
    head_type = mtp.get("mtp_head_type")
    need(head_type in HEAD_TYPES, f"sets mtp_head_type={head_type!r:.80}, which is not one of "
         f"{', '.join(HEAD_TYPES)}")
    return n, head_type


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# ---------------------------------------------------------------------------------------------
# Reading a folder: every file checked before use
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where a safetensors header puts one tensor, checked to lie inside its file."""
    file: pathlib.Path
    dtype: str  # safetensors' name for it: F32, BF16, ...
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file
    end: int


@dataclasses.dataclass(frozen=True)
class Folder:
    path: pathlib.Path
    config: dict  # config.json
    fields: dict  # config.model's shape fields from it (model_fields)
    mtp: dict  # mtp_jax.json ({} for a folder transformers saved)
    heads: tuple[int, str] | None  # (n, head type) of the heads the folder holds (mtp_heads)
    tensors: dict[str, Tensor]  # every tensor of its weight files, from their headers

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as the header describes it (a float type; its bytes read only now)."""
        tensor = self.tensors[name]
        if tensor.dtype not in FLOAT_DTYPES:
            raise UserError(f"tensor {name} in {tensor.file} is {tensor.dtype}: only float tensors "
                            f"({', '.join(FLOAT_DTYPES)}) import; save the model in float32 or bfloat16")
        with tensor.file.open("rb") as f:
            f.seek(tensor.begin)
            data = f.read(tensor.end - tensor.begin)
        if len(data) != tensor.end - tensor.begin:
            raise _damaged(tensor.file, "became shorter while it was read")
        return np.frombuffer(data, FLOAT_DTYPES[tensor.dtype]).reshape(tensor.shape)


def open_folder(path: str | os.PathLike) -> Folder:
    """Reads and checks config.json, mtp_jax.json, the index and every weight file's header; one
    line naming the file and what is wrong if any is missing or malformed. No tensor is read."""
    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"init_from={str(path)!r} is not a folder: pass one written by python -m mtp_jax.export "
                        "or by transformers' save_pretrained")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: pass a folder written by python -m mtp_jax.export or by "
                        "transformers' save_pretrained")
    config = read_json(path / "config.json")
    fields = model_fields(config, str(path / "config.json"))
    files = weight_files(path)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path} has no weights ({', '.join(missing)} missing): save them as safetensors "
                        "(save_pretrained's default; pytorch_model.bin is not read)")
    mtp = read_json(path / MTP_FILE) if (path / MTP_FILE).is_file() else {}
    heads = mtp_heads(mtp, str(path / MTP_FILE))
    tensors: dict[str, Tensor] = {}
    for file in files:
        for name, tensor in read_header(file).items():
            if name in tensors:
                raise UserError(f"{path} holds tensor {name!r:.80} twice ({tensors[name].file.name} and {file.name}): "
                                f"its weight files do not belong together; {RESAVE}")
            tensors[name] = tensor
    # The layers config.json claims, found in the headers before a model of them is built.
    check_tensor(path, tensors, f"model.layers.{fields['n_layers'] - 1}.mlp.gate_proj.weight",
                 (fields["mlp_dim"], fields["d_model"]))
    return Folder(path, config, fields, mtp, heads, tensors)


def check_tensor(path: pathlib.Path, tensors: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> None:
    """Refuses a folder whose weights lack tensor `name` or hold it in another shape than `shape`."""
    if name not in tensors:
        raise UserError(f"{path} has no tensor {name}, which its config.json implies: the weights and the "
                        "config do not belong together")
    if tensors[name].shape != tuple(shape):
        raise UserError(f"tensor {name} in {path} has shape {list(tensors[name].shape)} but its config.json "
                        f"implies {list(shape)}: the weights and the config do not belong together")


def weight_files(path: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """The safetensors files of the folder: those its index names, or model.safetensors."""
    if not (path / INDEX).is_file():
        return (path / WEIGHTS,)
    weight_map = read_json(path / INDEX).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise UserError(f"{path / INDEX} has no weight_map from tensor names to file names: {RESAVE}")
    names = sorted(set(weight_map.values()))
    outside = [name for name in names if name in ("", ".", "..") or pathlib.PurePath(name).name != name]
    if outside:
        raise UserError(f"{path / INDEX} names weight files outside the folder ({outside[0]!r:.80}): only files "
                        f"in the folder are read; {RESAVE}")
    return tuple(path / name for name in names)


def read_json(file: pathlib.Path) -> dict:
    """The JSON object in `file`; one line naming the file when it cannot be read, is not JSON, or
    holds something other than an object."""
    try:
        value = json.loads(file.read_bytes())
    except OSError as e:
        raise UserError(f"cannot read {file} ({e.strerror or e}): check that it is a readable file") from None
    except (ValueError, RecursionError) as e:  # not JSON, or not UTF-8; nested too deeply to parse
        raise UserError(f"{file} is not JSON ({' '.join(str(e).split())[:120]}): {RESAVE}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(type(value),
                                                                                                 "a number")
        raise UserError(f"{file} holds {kind}, not a JSON object: {RESAVE}")
    return value


def read_header(file: pathlib.Path) -> dict[str, Tensor]:
    """The tensors a safetensors file's header describes, every claim checked against the file's
    size before anything is read or allocated from it."""
    try:
        size = file.stat().st_size
        if size < 8:
            raise _damaged(file, f"has {size} bytes, fewer than the 8 that give its header's length")
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length > size - 8:
                raise _damaged(file, f"claims a header of {length} bytes but holds {size - 8} after the length")
            raw = f.read(length)
    except OSError as e:
        raise UserError(f"cannot read {file} ({e.strerror or e}): check that it is a readable file") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise _damaged(file, "has a header that is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(file, "has a header that is not a JSON object")
    start, tensors = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str) and _sizes(info.get("shape"))
                and _sizes(info.get("data_offsets")) and len(info["data_offsets"]) == 2):
            raise _damaged(file, f"describes tensor {name!r:.80} without a dtype, a shape and two offsets")
        begin, end = info["data_offsets"]
        if not begin <= end <= size - start:
            raise _damaged(file, f"puts tensor {name!r:.80} at bytes {begin} to {end} of its data, which holds "
                                 f"{size - start} bytes")
        item = _ITEM_BYTES.get(info["dtype"])
        if item is not None and math.prod(info["shape"]) * item != end - begin:
            raise _damaged(file, f"gives tensor {name!r:.80} ({info['dtype']}, shape {info['shape']}) "
                                 f"{end - begin} bytes")
        tensors[name] = Tensor(file, info["dtype"], tuple(info["shape"]), start + begin, start + end)
    return tensors


def _sizes(value) -> bool:
    """A JSON list of non-negative integers (a shape, or offsets)."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _damaged(file: pathlib.Path, problem: str) -> UserError:
    return UserError(f"{file} {problem}: the file is truncated or not safetensors; copy or save it again")


def tokenizer_problem(folder: Folder, data) -> str | None:
    """Why the data's tokenizer cannot feed the folder's model, or None."""
    vocab = folder.config["vocab_size"]
    ours = data.meta.get("tokenizer")
    tokenizer_file = folder.path / "tokenizer.json"
    theirs = "bpe" if tokenizer_file.is_file() else folder.mtp.get("tokenizer")
    if tokenizer_file.is_file():
        tokenizer = read_tokenizer(tokenizer_file)
        if tokenizer.get_vocab_size() != vocab:
            return (f"the tokenizer in {folder.path} has {tokenizer.get_vocab_size()} tokens but its config.json's "
                    f"vocab_size is {vocab}: the folder's tokenizer does not belong to its model")
        same = ours == "bpe" and read_tokenizer(data.directory / "tokenizer.json").get_vocab() == tokenizer.get_vocab()
        if not same:
            return (f"the tokenizer in {folder.path} differs from the data's ({ours!r}, vocabulary "
                    f"{data.vocab_size}): set --config.data.tokenizer and data.vocab_size as the model was trained")
    elif theirs is not None and theirs != ours:
        return (f"the model in {folder.path} reads {theirs!r} tokens but the data's tokenizer is {ours!r}: "
                f"set --config.data.tokenizer={theirs}")
    if vocab != data.vocab_size:
        return (f"the model in {folder.path} has a vocabulary of {vocab} but the data's {ours!r} tokenizer has "
                f"{data.vocab_size}: set --config.data.tokenizer and data.vocab_size to the model's")
    return None


def read_tokenizer(file: pathlib.Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 — the tokenizers library raises plain Exceptions
        raise UserError(f"{file} is not a tokenizer the tokenizers library reads "
                        f"({' '.join(str(e).split())[:120]}): {RESAVE}") from None


def configure(config):
    """A copy of config whose model shape is the init_from folder's (config.json)."""
    folder = open_folder(config.init_from)
    config = config.copy_and_resolve_references()
    for name, value in folder.fields.items():
        config.model[name] = value
    return config


def read_for_training(config, data) -> dict:
    """The init_from folder's parameters for config's model (numpy, pure dict; see read_params),
    once the data's tokenizer is known to feed it."""
    folder = open_folder(config.init_from)
    problem = tokenizer_problem(folder, data)
    if problem:
        raise UserError(problem)
    model = nnx.eval_shape(lambda: build_model(config, data.vocab_size, seed=0))
    n = len(loss_weights(config))  # one weight per token predicted
    return read_params(folder, nnx.to_pure_dict(nnx.state(model, nnx.Param)), n, config.mtp_head_type)


def read_params(folder: Folder, like: dict, n: int, head_type: str) -> dict:
    """The folder's parameters as numpy arrays shaped and typed like `like` (our parameter tree,
    pure dict) at the paths the folder holds: the trunk, and the heads when it holds n heads of
    head_type. A missing tensor, a shape that differs from config.json or a value that is not
    finite is one clear line, every name and shape checked before any tensor is read."""
    heads = folder.heads
    if heads is not None and n > 1 and heads != (n, head_type):
        raise UserError(f"{folder.path} holds n={heads[0]} {heads[1]!r} heads but the config asks for n={n} "
                        f"{head_type!r}: set --config.mtp_n_tokens={heads[0]} --config.mtp_head_type={heads[1]}")
    rows = layout(folder.fields["n_layers"], folder.fields["tie_embeddings"], n, head_type, heads is not None)
    for name, path, kind in rows:
        check_tensor(folder.path, folder.tensors, name, hf_shape(kind, _get(like, path).shape))
    out: dict = {}
    for name, path, kind in rows:
        value = folder.read(name)
        if not np.isfinite(value).all():
            raise UserError(f"tensor {name} in {folder.tensors[name].file} holds NaN or infinite values: the "
                            "weights are damaged; import a folder saved from a model whose weights are finite")
        target = _get(like, path)
        _set(out, path, from_hf(value, kind, target.shape).astype(target.dtype))
    return out


def with_imported(params: dict, loaded: dict) -> dict:
    """params (sharded arrays, pure dict) with every array `loaded` holds (read_params) in place of
    its own, on the same sharding: each process puts its own shards from its host copy."""
    flat = dict(_flatten(loaded))

    def put(path, x):
        value = flat.get(tuple(k.key for k in path))
        return x if value is None else jax.make_array_from_callback(x.shape, x.sharding, lambda index: value[index])

    return jax.tree_util.tree_map_with_path(put, params)


# ---------------------------------------------------------------------------------------------
# Writing a folder
# ---------------------------------------------------------------------------------------------


def write_folder(out: pathlib.Path, params: dict, shape, config, *, data_dir: pathlib.Path | None,
                 tokenizer: str | None) -> None:
    """Writes the folder for `params` (pure dict) atomically: built beside `out`, renamed into
    place, so a failure leaves nothing at `out`, nor a parent folder it made. Its files get the
    modes the user's umask gives new files. An `out` that cannot be written (under a file, in a
    folder without write permission, on a disk without room) is one line."""
    out = pathlib.Path(out)
    weights, head_type = list(loss_weights(config)), config.mtp_head_type
    n = len(weights)  # one weight per token predicted
    tensors = {name: to_hf(np.asarray(_get(params, path), np.float32), kind)
               for name, path, kind in layout(shape.n_layers, shape.tie_embeddings, n, head_type)}
    eos = (tokenizers.Tokenizer.from_file(str(data_dir / "tokenizer.json")).token_to_id(EOT)
           if tokenizer == "bpe" else None)
    mtp = {"format": FORMAT, "use_mtp": n > 1, "mtp_n_tokens": n, "mtp_head_type": head_type,
           "mtp_weight": config.mtp_weight, "mtp_loss_weights": config.mtp_loss_weights,
           "loss_weights": weights, "tokenizer": tokenizer,
           "heads": [name for name, path, _ in layout(shape.n_layers, shape.tie_embeddings, n, head_type)
                     if path[0] == "heads"]}
    made, tmp, done = new_folders(out.parent), None, False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        need, free = sum(t.nbytes for t in tensors.values()), shutil.disk_usage(tmp).free
        if need > free:
            raise UserError(f"cannot write {out}: its weights need {need / 2**20:.1f} MiB and the disk has "
                            f"{free / 2**20:.1f} MiB free; free space or choose a folder on another disk "
                            "(nothing was written)")
        safetensors.numpy.save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(llama_config(shape, config.seq_len, eos), indent=2) + "\n")
        (tmp / MTP_FILE).write_text(json.dumps(mtp, indent=2) + "\n")
        if tokenizer == "bpe":
            shutil.copyfile(data_dir / "tokenizer.json", tmp / "tokenizer.json")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT}, indent=2) + "\n")
        elif tokenizer == "byte":
            (tmp / "TOKENIZER.md").write_text(BYTE_NOTE)
        mask = umask()  # safetensors writes its file 0600; mkdtemp makes its folder 0700
        for file in tmp.iterdir():
            file.chmod(0o666 & ~mask)
        tmp.chmod(0o777 & ~mask)
        if out.exists():
            out.rmdir()  # empty (export checks): rename cannot replace a directory
        tmp.rename(out)
        done = True
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot write {out}: {write_problem(out, e)} (nothing was written)") from None
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            remove_empty(made)


def write_problem(out: pathlib.Path, error: Exception) -> str:
    """Why writing `out` failed, and the fix, from the error of the write."""
    above = next(parent for parent in out.parents if parent.exists())
    if not above.is_dir():
        return f"{above} is a file, not a folder; choose a path in a folder"
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
    else:  # safetensors reports an I/O error as 'Error while serializing: I/O error: <reason> (os error N) …'
        found = re.search(r"I/O error: (.+?) \(os error", str(error))
        reason = found.group(1) if found else " ".join(str(error).split())[:160]
    return f"{reason}; choose a folder you can write to, on a disk with room for the model"


def umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


BYTE_NOTE = """# Tokenizer: UTF-8 bytes

This model reads raw UTF-8 bytes: token id = byte value (0-255), vocab_size 256, no special
tokens. There is no tokenizer file; encode and decode with

    ids = list(text.encode("utf-8"))
    text = bytes(ids).decode("utf-8", errors="replace")
"""


# ---------------------------------------------------------------------------------------------
# Nested pure dicts
# ---------------------------------------------------------------------------------------------


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flatten(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value
