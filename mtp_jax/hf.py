"""The one mapping between our parameter tree and the Hugging Face Llama layout, and the folder
that holds it. `export.py` writes such folders; `--config.init_from` (train.py) reads them, ours or
any saved by transformers' `save_pretrained` for a Llama, Mistral or Qwen2 model (hf_config.py
reads their config.json), or a llama.cpp GGUF file, which gguf.py presents under the same names.
hf_files.py reads the folder's files, checking each before use, and writes them.

A folder holds
  config.json              a LlamaForCausalLM's config (Qwen2ForCausalLM's for a model with query, key and
                           value biases): transformers loads the folder with no code of ours
  model.safetensors        every tensor, float32 (a transformers folder may shard them, with an index)
  mtp_jax.json             what transformers cannot express: head type, n, loss weights, tokenizer,
                           the heads' draft vocabulary (draft_vocab: token ids) when they have one
  tokenizer.json           BPE models (with tokenizer_config.json); byte-level models get TOKENIZER.md

Tensor names (L = num_hidden_layers; D, V, M = hidden, vocabulary and MLP sizes; N, N_kv, H =
query heads, key/value heads, head size; head k >= 2 is stored at i = k - 2). HF Linear weights
are [out, in], ours [in, out]:
  model.embed_tokens.weight                         [V, D]      decoder.embedding
  model.layers.{l}.input_layernorm.weight           [D]         blocks[l].attn_norm.scale
  model.layers.{l}.self_attn.q_proj.weight          [N·H, D]    blocks[l].attn.wq [D, N, H]
  model.layers.{l}.self_attn.{k,v}_proj.weight      [N_kv·H, D] blocks[l].attn.wk, wv [D, N_kv, H]
  model.layers.{l}.self_attn.o_proj.weight          [D, N·H]    blocks[l].attn.wo [N, H, D]
  model.layers.{l}.self_attn.{q,k,v}_proj.bias      [N·H], …    blocks[l].attn.bq, bk, bv [N, H], … (qkv_bias)
  model.layers.{l}.post_attention_layernorm.weight  [D]         blocks[l].mlp_norm.scale
  model.layers.{l}.mlp.{gate,up,down}_proj.weight   [M, D], [M, D], [D, M]   blocks[l].mlp.w_*
  model.norm.weight                                 [D]         decoder.final_norm.scale (every head's)
  lm_head.weight                                    [V, D]      decoder.unembedding (absent when tied)
The heads, which transformers ignores (each head type's hf_rows in heads.py):
  linear      extra_heads.{i}.weight                [V, D]      (Meta's multi-token models' name)
  parallel    extra_heads.{i}.<a layer's names>     one decoder layer each, named as model.layers.{l}
  medusa      extra_heads.{i}.linear.{weight,bias}  [D, D], [D]: the residual block (Medusa's ResBlock)
  sequential  model.layers.{L+i}.<a layer's names>, .enorm.weight, .hnorm.weight [D] and
              .eh_proj.weight [D, 2D]: DeepSeek-V3's MTP modules. As there, eh_proj reads
              [enorm(embedding); hnorm(hidden)] (our `merge` reads the halves the other way round).
              The embedding, final norm and output head are the model's own, so DeepSeek's
              per-module copies (embed_tokens, shared_head) are not written.

RoPE needs no permutation: model.rope rotates the two halves of each head as HF's rotate_half
does, with the same frequencies theta^(-2i/H) (tests/test_hf.py checks the logits).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import numpy as np
import tokenizers
from flax import nnx

from mtp_jax import data as data_lib
from mtp_jax import gguf
from mtp_jax import heads as heads_lib
from mtp_jax.data.tokenizer import BYTE_VOCAB, EOT, read_given
from mtp_jax.errors import UserError
from mtp_jax.hf_config import attention_window, config_json, model_fields, positive_int
from mtp_jax.hf_files import (
    MTP_FILE,
    Folder,
    Tensor,
    read_headers,
    read_json,
    tokenizer_problem,
    weight_files,
    write_atomically,
)
from mtp_jax.model import stack_layers, unstack_layers
from mtp_jax.mtp import build_model, loss_weights

FORMAT = 1  # mtp_jax.json's format version
# One decoder layer: (HF name under the layer's prefix, path under our block, layout). Layouts:
# 'same' is stored as is; 'linear' is a Linear weight whose first dimension is its input and
# 'linear2' one whose first two are ([N, H, D] → [D, N·H]); 'flat' is stored flattened ([N, H] →
# [N·H]); 'merge' is eh_proj (see above).
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
_BIASES = tuple((f"self_attn.{x}_proj.bias", ("attn", f"b{x}"), "flat") for x in "qkv")  # model.qkv_bias


def layout(
    n_layers: int, tie_embeddings: bool, n: int, head_type: str, with_heads: bool = True, qkv_bias: bool = False
):
    """[(HF tensor name, path in our parameter tree, layout)] for a model; with_heads=False: the
    trunk only (embedding, layers, final norm, unembedding)."""

    def layer(prefix: str, path: tuple):
        return [(f"{prefix}.{name}", path + sub, kind) for name, sub, kind in _LAYER + (_BIASES if qkv_bias else ())]

    rows = [("model.embed_tokens.weight", ("decoder", "embedding"), "same")]
    for i in range(n_layers):
        rows += layer(f"model.layers.{i}", ("decoder", "blocks", i))
    rows.append(("model.norm.weight", ("decoder", "final_norm", "scale"), "same"))
    if not tie_embeddings:
        rows.append(("lm_head.weight", ("decoder", "unembedding"), "linear"))
    head = heads_lib.get(head_type)
    for i in range(n - 1 if with_heads else 0):
        rows += head.hf_rows(i, n_layers, layer)
    return rows


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """Our array → the HF tensor (an exact permutation of its elements)."""
    if kind == "same":
        return x
    if kind == "flat":
        return x.reshape(-1)
    if kind == "merge":  # ours: [hidden; embedding] rows; DeepSeek's eh_proj: [embedding; hidden] columns
        x = np.concatenate(np.split(x, 2)[::-1])
    n_in = 2 if kind == "linear2" else 1
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)


def from_hf(y: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The HF tensor → our array of `shape` (the inverse of to_hf)."""
    if kind in ("same", "flat"):
        return y.reshape(shape)
    x = y.T.reshape(shape)
    return np.concatenate(np.split(x, 2)[::-1]) if kind == "merge" else x


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape to_hf gives an array of our `shape`."""
    if kind == "same":
        return tuple(shape)
    if kind == "flat":
        return (math.prod(shape),)
    n_in = 2 if kind == "linear2" else 1
    return math.prod(shape[n_in:]), math.prod(shape[:n_in])


# ---------------------------------------------------------------------------------------------
# mtp_jax.json
# ---------------------------------------------------------------------------------------------


def mtp_heads(mtp: dict, where: str) -> tuple[int, str] | None:
    """(n, head type) of the heads an mtp_jax.json says its folder holds, or None, every field
    this reads checked."""

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise UserError(f"{where} {problem}: export the model again with python -m mtp_jax.export")

    version = mtp.get("format", FORMAT)
    need(positive_int(version), f"sets format={version!r:.80}, which is not a format version")
    if version > FORMAT:
        raise UserError(
            f"{where} has format {version} and this mtp_jax reads format {FORMAT}: a newer mtp_jax "
            "wrote it; update mtp_jax"
        )
    tokenizer = mtp.get("tokenizer")
    need(tokenizer is None or isinstance(tokenizer, str), f"sets tokenizer={tokenizer!r:.80}, which is not a name")
    use_mtp = mtp.get("use_mtp", False)
    need(isinstance(use_mtp, bool), f"sets use_mtp={use_mtp!r:.80}, which is not true or false")
    n = mtp.get("mtp_n_tokens", 1) if use_mtp else 1
    need(positive_int(n), f"sets mtp_n_tokens={n!r:.80}, which is not a positive integer")
    if n == 1:
        return None
    head_type = mtp.get("mtp_head_type")
    need(
        head_type in heads_lib.HEAD_TYPES,
        f"sets mtp_head_type={head_type!r:.80}, which is not one of {', '.join(heads_lib.HEAD_TYPES)}",
    )
    return n, head_type


# ---------------------------------------------------------------------------------------------
# Reading a folder
# ---------------------------------------------------------------------------------------------


def open_folder(path: str | os.PathLike) -> Folder:
    """Reads and checks config.json, mtp_jax.json, the index and every weight file's header, or a
    GGUF file's metadata and tensor list (gguf.read_model); one line naming the file and what is
    wrong if any is missing or malformed. No tensor is read."""
    path = pathlib.Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        config, tensors = gguf.read_model(path)
        fields, mtp, heads = model_fields(config, str(path)), {}, None
    else:
        if not path.is_dir():
            raise UserError(
                f"init_from={str(path)!r} is neither a folder nor a .gguf file: pass a folder written by "
                "python -m mtp_jax.export or by transformers' save_pretrained, or a GGUF file"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} has no config.json: pass a folder written by python -m mtp_jax.export or by "
                "transformers' save_pretrained"
            )
        config = read_json(path / "config.json")
        fields = model_fields(config, str(path / "config.json"))
        files = weight_files(path)
        mtp = read_json(path / MTP_FILE) if (path / MTP_FILE).is_file() else {}
        heads = mtp_heads(mtp, str(path / MTP_FILE))
        tensors = read_headers(path, files)
    # The layers the config claims, found among the tensors before a model of them is built.
    check_tensor(
        path,
        tensors,
        f"model.layers.{fields['n_layers'] - 1}.mlp.gate_proj.weight",
        (fields["mlp_dim"], fields["d_model"]),
    )
    return Folder(path, config, fields, mtp, heads, tensors)


def check_tensor(path: pathlib.Path, tensors: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> None:
    """Refuses a folder whose weights lack tensor `name` or hold it in another shape than `shape`."""
    if name not in tensors:
        raise UserError(
            f"{path} has no tensor {name}, which its config.json implies: the weights and the "
            "config do not belong together"
        )
    if tensors[name].shape != tuple(shape):
        raise UserError(
            f"tensor {name} in {path} has shape {list(tensors[name].shape)} but its config.json "
            f"implies {list(shape)}: the weights and the config do not belong together"
        )


def configure(config):
    """A copy of config whose model shape is the init_from folder's (config.json) or GGUF file's,
    and whose text data is tokenized with the model's tokenizer, unless data.tokenizer names one
    (a path); refuses a model whose sliding attention window is shorter than seq_len."""
    folder = open_folder(config.init_from)
    window = attention_window(folder.config)
    if window is not None and window < config.seq_len:
        raise UserError(
            f"{folder.path} describes attention over a sliding window of {window} tokens, shorter than "
            f"seq_len={config.seq_len}, and this model attends to every earlier position: set "
            f"--config.seq_len={window} or less"
        )
    config = config.copy_and_resolve_references()
    for name, value in folder.fields.items():
        config.model[name] = value
    tokenizer = None
    if str(config.data.tokenizer) in ("byte", "bpe") and reads_text(config.data):
        tokenizer = model_tokenizer(folder)
    if tokenizer is not None:
        config.data.tokenizer = tokenizer
        config.data.vocab_size = BYTE_VOCAB if tokenizer == "byte" else folder.config["vocab_size"]
    return config


def reads_text(data_cfg) -> bool:
    """Whether data_cfg's source is text to tokenize (not token files or a task)."""
    return data_lib.resolve_source(str(data_cfg.source)).kind not in ("bin", "shards", "task")


def model_tokenizer(folder: Folder) -> str | None:
    """data.tokenizer for the folder's model: the path of the tokenizer it comes with (a GGUF
    file's own, or tokenizer.json), 'byte' for a byte-level model exported by mtp_jax, or None."""
    path = folder.path if folder.path.is_file() else folder.path / "tokenizer.json"
    if not path.is_file() or (path == folder.path and not gguf.embeds_tokenizer(path)):
        return "byte" if folder.mtp.get("tokenizer") == "byte" else None
    size, vocab = read_given(path).get_vocab_size(), folder.config["vocab_size"]
    if size > vocab:
        raise UserError(
            f"the tokenizer in {path} has {size} tokens but the model's vocab_size is {vocab}: the "
            "tokenizer does not belong to the model"
        )
    return str(path)


def read_for_training(config, data) -> dict:
    """The init_from folder's parameters for config's model (numpy, pure dict; see read_params),
    once the data's tokenizer is known to feed it. The mapping names one layer at a time: a model
    with model.scan_layers has its stacked layers read one by one, then stacked."""
    folder = open_folder(config.init_from)
    problem = tokenizer_problem(folder, data)
    if problem:
        raise UserError(problem)
    model = nnx.eval_shape(lambda: build_model(config, data.vocab_size, seed=0))
    like, n_stacked = nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.decoder.n_stacked
    n = len(loss_weights(config))  # one weight per token predicted
    params = read_params(folder, jax.eval_shape(unstack_layers, like) if n_stacked else like, n, config.mtp_head_type)
    return stack_layers(params, n_stacked) if n_stacked else params


def read_params(folder: Folder, like: dict, n: int, head_type: str) -> dict:
    """The folder's parameters as numpy arrays shaped and typed like `like` (our parameter tree,
    pure dict) at the paths the folder holds: the trunk, and the heads when it holds n heads of
    head_type. A missing tensor, a shape that differs from config.json or a value that is not
    finite is one clear line, every name and shape checked before any tensor is read."""
    heads = folder.heads
    if heads is not None and n > 1 and heads != (n, head_type):
        raise UserError(
            f"{folder.path} holds n={heads[0]} {heads[1]!r} heads but the config asks for n={n} "
            f"{head_type!r}: set --config.mtp_n_tokens={heads[0]} --config.mtp_head_type={heads[1]}"
        )
    rows = layout(
        folder.fields["n_layers"],
        folder.fields["tie_embeddings"],
        n,
        head_type,
        heads is not None,
        folder.fields["qkv_bias"],
    )
    for name, path, kind in rows:
        check_tensor(folder.path, folder.tensors, name, hf_shape(kind, _get(like, path).shape))
    out: dict = {}
    for name, path, kind in rows:
        value = folder.read(name)
        if not np.isfinite(value).all():
            raise UserError(
                f"tensor {name} in {folder.tensors[name].file} holds NaN or infinite values: the "
                "weights are damaged; import a folder saved from a model whose weights are finite"
            )
        target = _get(like, path)
        _set(out, path, from_hf(value, kind, target.shape).astype(target.dtype))
    if "draft_vocab" in like and heads is not None:
        out["draft_vocab"] = draft_vocab(folder, like["draft_vocab"].shape[0], like["decoder"]["embedding"].shape[0])
    return out


def draft_vocab(folder: Folder, size: int, vocab_size: int) -> np.ndarray:
    """The heads' draft vocabulary from mtp_jax.json, checked: `size` distinct ids below vocab_size."""
    ids = folder.mtp.get("draft_vocab")
    if not (
        isinstance(ids, list)
        and len(ids) == size
        and len(set(ids)) == size
        and all(type(i) is int and 0 <= i < vocab_size for i in ids)
    ):
        raise UserError(
            f"{folder.path / MTP_FILE} does not list the heads' {size} draft token ids (draft_vocab): "
            f"set --config.mtp_draft_vocab to the exported heads' size, or export the model again"
        )
    return np.asarray(ids, np.int32)


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


def write_folder(
    out: pathlib.Path, params: dict, shape, config, *, data_dir: pathlib.Path | None, tokenizer: str | None
) -> None:
    """Writes the folder for `params` (pure dict): its tensors, config.json, mtp_jax.json and the
    tokenizer's files, atomically (hf_files.write_atomically: a failure leaves nothing at `out`)."""
    weights, head_type = list(loss_weights(config)), config.mtp_head_type
    n = len(weights)  # one weight per token predicted
    rows = layout(shape.n_layers, shape.tie_embeddings, n, head_type, qkv_bias=shape.qkv_bias)
    tensors = {name: to_hf(np.asarray(_get(params, path), np.float32), kind) for name, path, kind in rows}
    eos = eos_token = None
    if tokenizer == "bpe":  # the id that ends a document: <|endoftext|>, or what a model's own tokenizer's meta says
        bpe = tokenizers.Tokenizer.from_file(str(data_dir / "tokenizer.json"))
        eos = read_json(data_dir / "meta.json").get("eot_id", bpe.token_to_id(EOT))
        eos_token = None if eos is None else bpe.id_to_token(eos)
    mtp = {
        "format": FORMAT,
        "use_mtp": n > 1,
        "mtp_n_tokens": n,
        "mtp_head_type": head_type,
        "mtp_weight": config.mtp_weight,
        "mtp_loss_weights": config.mtp_loss_weights,
        "loss_weights": weights,
        "tokenizer": tokenizer,
        "heads": [name for name, path, _ in rows if path[0] == "heads"],
    }
    if "draft_vocab" in params:  # the token ids the heads output (mtp.MTPModel.draft_vocab)
        mtp["draft_vocab"] = np.asarray(params["draft_vocab"]).tolist()
    texts = {"config.json": _json_text(config_json(shape, config.seq_len, eos)), MTP_FILE: _json_text(mtp)}
    copies = {}
    if tokenizer == "bpe":
        copies["tokenizer.json"] = data_dir / "tokenizer.json"
        texts["tokenizer_config.json"] = _json_text(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token}
        )
    elif tokenizer == "byte":
        texts["TOKENIZER.md"] = BYTE_NOTE
    write_atomically(pathlib.Path(out), tensors, texts, copies)


def _json_text(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"


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
