"""The files of a Hugging Face model folder, read as untrusted input and written atomically.

Reading checks every claim a file makes before anything is read or allocated from it: JSON files
must hold an object, a safetensors header's offsets and sizes must fit its file, an index may only
name files inside its folder, and a tensor's bytes are read only when asked for. Every problem is
one line naming the file and the fix. Writing builds the folder beside its destination and renames
it into place, with the modes the user's umask gives. What the files mean (tensor names, shapes,
config.json's fields) is hf.py's.
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

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers
from safetensors import SafetensorError

from mtp_jax.errors import UserError
from mtp_jax.folders import new_folders, remove_empty

WEIGHTS, INDEX, MTP_FILE = "model.safetensors", "model.safetensors.index.json", "mtp_jax.json"
RESAVE = "save the folder again (python -m mtp_jax.export or transformers' save_pretrained)"
# safetensors' dtypes: bytes per element; weights import from the float ones.
_ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = {"F16": np.dtype("<f2"), "BF16": np.dtype(jnp.bfloat16), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where a safetensors header puts one tensor, checked to lie inside its file."""

    file: pathlib.Path
    dtype: str  # safetensors' name for it: F32, BF16, ...
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file
    end: int

    def read(self) -> np.ndarray:
        """The tensor as the header describes it (one of FLOAT_DTYPES: Folder.read checks), its bytes
        read only now."""
        with self.file.open("rb") as f:
            f.seek(self.begin)
            data = f.read(self.end - self.begin)
        if len(data) != self.end - self.begin:
            raise _damaged(self.file, "became shorter while it was read")
        return np.frombuffer(data, FLOAT_DTYPES[self.dtype]).reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Folder:
    """A model folder (or GGUF file) whose files have been checked (hf.open_folder), its tensors
    not yet read."""

    path: pathlib.Path
    config: dict  # config.json
    fields: dict  # config.model's shape fields from it (hf_config.model_fields)
    mtp: dict  # mtp_jax.json ({} for a folder transformers saved)
    heads: tuple[int, str] | None  # (n, head type) of the heads the folder holds (hf.mtp_heads)
    tensors: dict  # every tensor of its weight files, from their headers (gguf.GGUFTensor for a GGUF file)

    def read(self, name: str) -> np.ndarray:
        """Tensor `name`, read only now."""
        tensor = self.tensors[name]
        if isinstance(tensor, Tensor) and tensor.dtype not in FLOAT_DTYPES:
            raise UserError(
                f"tensor {name} in {tensor.file} is {tensor.dtype}: only float tensors "
                f"({', '.join(FLOAT_DTYPES)}) import; save the model in float32 or bfloat16"
            )
        return tensor.read()


def weight_files(path: pathlib.Path) -> tuple[pathlib.Path, ...]:
    """The safetensors files of the folder, each checked to exist: those its index names, or
    model.safetensors."""
    files = (path / WEIGHTS,)
    if (path / INDEX).is_file():
        weight_map = read_json(path / INDEX).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise UserError(f"{path / INDEX} has no weight_map from tensor names to file names: {RESAVE}")
        names = sorted(set(weight_map.values()))
        outside = [name for name in names if name in ("", ".", "..") or pathlib.PurePath(name).name != name]
        if outside:
            raise UserError(
                f"{path / INDEX} names weight files outside the folder ({outside[0]!r:.80}): only "
                f"files in the folder are read; {RESAVE}"
            )
        files = tuple(path / name for name in names)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"{path} has no weights ({', '.join(missing)} missing): save them as safetensors "
            "(save_pretrained's default; pytorch_model.bin is not read)"
        )
    return files


def read_headers(path: pathlib.Path, files: tuple[pathlib.Path, ...]) -> dict[str, Tensor]:
    """Every tensor the folder's weight files hold (read_header), each name held once."""
    tensors: dict[str, Tensor] = {}
    for file in files:
        for name, tensor in read_header(file).items():
            if name in tensors:
                raise UserError(
                    f"{path} holds tensor {name!r:.80} twice ({tensors[name].file.name} and {file.name}): "
                    f"its weight files do not belong together; {RESAVE}"
                )
            tensors[name] = tensor
    return tensors


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
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}.get(
            type(value), "a number"
        )
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
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and _sizes(info.get("shape"))
            and _sizes(info.get("data_offsets"))
            and len(info["data_offsets"]) == 2
        ):
            raise _damaged(file, f"describes tensor {name!r:.80} without a dtype, a shape and two offsets")
        begin, end = info["data_offsets"]
        if not begin <= end <= size - start:
            raise _damaged(
                file,
                f"puts tensor {name!r:.80} at bytes {begin} to {end} of its data, which holds {size - start} bytes",
            )
        item = _ITEM_BYTES.get(info["dtype"])
        if item is not None and math.prod(info["shape"]) * item != end - begin:
            raise _damaged(
                file, f"gives tensor {name!r:.80} ({info['dtype']}, shape {info['shape']}) {end - begin} bytes"
            )
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
        if tokenizer.get_vocab_size() > vocab:
            return (
                f"the tokenizer in {folder.path} has {tokenizer.get_vocab_size()} tokens but its config.json's "
                f"vocab_size is {vocab}: the folder's tokenizer does not belong to its model"
            )
        same = ours == "bpe" and read_tokenizer(data.directory / "tokenizer.json").get_vocab() == tokenizer.get_vocab()
        if not same:
            return (
                f"the tokenizer in {folder.path} differs from the data's ({ours!r}, vocabulary "
                f"{data.vocab_size}): leave data.tokenizer at 'byte' or 'bpe' (the model's own is used), or "
                f"set --config.data.tokenizer={tokenizer_file}"
            )
    elif theirs is not None and theirs != ours:
        return (
            f"the model in {folder.path} reads {theirs!r} tokens but the data's tokenizer is {ours!r}: "
            f"set --config.data.tokenizer={theirs}"
        )
    if vocab != data.vocab_size:
        return (
            f"the model in {folder.path} has a vocabulary of {vocab} but the data's {ours!r} tokenizer has "
            f"{data.vocab_size}: set --config.data.tokenizer and data.vocab_size to the model's"
        )
    return None


def read_tokenizer(file: pathlib.Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 — the tokenizers library raises plain Exceptions
        raise UserError(
            f"{file} is not a tokenizer the tokenizers library reads ({' '.join(str(e).split())[:120]}): {RESAVE}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_atomically(
    out: pathlib.Path, tensors: dict[str, np.ndarray], texts: dict[str, str], copies: dict[str, pathlib.Path]
) -> None:
    """Writes the folder `out`: `tensors` in model.safetensors, `texts` (file name → text) and
    `copies` (file name → the file copied there). It is built beside `out` and renamed into place,
    so a failure leaves nothing at `out`, nor a parent folder it made. Its files get the modes the
    user's umask gives new files. An `out` that cannot be written (under a file, in a folder
    without write permission, on a disk without room) is one line."""
    made, tmp, done = new_folders(out.parent), None, False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        need, free = sum(t.nbytes for t in tensors.values()), shutil.disk_usage(tmp).free
        if need > free:
            raise UserError(
                f"cannot write {out}: its weights need {need / 2**20:.1f} MiB and the disk has "
                f"{free / 2**20:.1f} MiB free; free space or choose a folder on another disk "
                "(nothing was written)"
            )
        safetensors.numpy.save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        for name, text in texts.items():
            (tmp / name).write_text(text)
        for name, source in copies.items():
            shutil.copyfile(source, tmp / name)
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
