"""What a `data.source` names, and the settings that go with it.

A source is the Python standard library (or one package of it), a directory, a glob, a text
file, a JSONL file with a 'text' field per line, a file of token ids, a glob of token shards
(every match a .bin file; shards.py), or a synthetic task (tasks.py). `resolve_source` turns the
string into a `Source`; `check_settings` validates the rest of the data config against it;
`split_documents` yields the train and validation documents of a text source.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import pathlib
import re
import sysconfig
from typing import Any

import numpy as np

from mtp_jax.data import shards as shards_lib
from mtp_jax.data import tasks
from mtp_jax.data.tokenizer import BPE_MIN_VOCAB, BYTE_VOCAB, EOT, read_given
from mtp_jax.errors import UserError

TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}

Document = pathlib.Path | str  # a file to read, or text already in memory


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # 'files' | 'jsonl' | 'text' | 'bin' | 'shards' | 'task'
    name: str  # human part of the cache directory name
    description: str
    paths: tuple[pathlib.Path, ...]  # 'files', 'shards': the files in order; else the one file
    fingerprint: tuple  # cheap identity of the contents: (path, size, mtime_ns) per file


def resolve_source(source: str, field: str = "data.source") -> Source:
    """What `source` names; `field` is the config field that holds it, for the errors."""
    name = tasks.task_name(source)
    if name is not None:
        return Source("task", f"task-{name}", source, (), ())
    if source == "stdlib" or source.startswith("stdlib/"):
        return _stdlib_source(source, field)
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise UserError(f"{field}={source!r} contains no files: pass a directory with text files")
        return _files_source(path.name, f"directory:{path.resolve()}", path, files)
    if path.is_file():
        kind = {".bin": "bin", ".jsonl": "jsonl"}.get(path.suffix, "text")
        stat = path.stat()
        return Source(
            kind,
            path.stem,
            f"{kind}:{path.resolve()}",
            (path,),
            ((str(path.resolve()), stat.st_size, stat.st_mtime_ns),),
        )
    if globlib.has_magic(source):
        files = [pathlib.Path(p) for p in globlib.glob(os.path.expanduser(source), recursive=True)]
        files = [p for p in files if p.is_file()]
        if not files:
            raise UserError(f"{field}={source!r} matches no files: fix the glob pattern")
        if all(p.suffix == ".bin" for p in files):
            shards = _files_source(path.stem, f"shards:{source}", pathlib.Path("/"), [p.resolve() for p in files])
            return dataclasses.replace(shards, kind="shards")
        return _files_source("glob", f"glob:{source}", pathlib.Path("/"), [p.resolve() for p in files])
    if path.is_symlink():
        raise UserError(f"{field}={source!r} is a broken symlink or a symlink loop: point it at the data")
    raise UserError(
        f"{field}={source!r} does not exist: pass an existing directory, file, glob, 'stdlib' or 'stdlib/PACKAGE'"
    )


def _stdlib_source(source: str, field: str) -> Source:
    """'stdlib': the Python standard library; 'stdlib/email': one package of it, a small fixed
    corpus every Python has (for many epochs); 'stdlib/email,json': several packages."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    packages = source.removeprefix("stdlib").strip("/")
    roots = [stdlib / name for name in packages.split(",")] if packages else [stdlib]
    for root in roots:
        if not root.is_dir():
            raise UserError(
                f"{field}={source!r}: the standard library has no package {root.name!r} "
                f"(in {stdlib}): name its directories, e.g. stdlib/email or stdlib/email,json"
            )
    files = [
        p
        for root in roots
        for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
    ]
    root, description = (roots[0], f"stdlib:{roots[0]}") if len(roots) == 1 else (stdlib, f"stdlib:{stdlib}/{packages}")
    return _files_source(source.replace("/", "-").replace(",", "+"), description, root, files)


def _files_source(name: str, description: str, root: pathlib.Path, files: list) -> Source:
    # Sorted by path relative to the root, so the split is the same on every machine.
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    fingerprint = tuple(
        (p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns) for p, st in ((p, p.stat()) for p in files)
    )
    return Source("files", _safe_name(name), description, tuple(files), fingerprint)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "data"


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def check_settings(cfg: Any, source: Source, extra: Source | None) -> dict:
    """The validated settings that, with the source (and data.train_extra's, extra_training_source),
    determine the cache contents."""
    val_fraction = float(cfg.val_fraction)
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction} must be in (0, 1): use e.g. 0.02")
    settings = dict(val_fraction=val_fraction, split_seed=int(cfg.split_seed))
    vocab_size = int(cfg.vocab_size)
    if extra is not None:  # in the settings (so in the cache's key) only when set: other caches keep their keys
        settings["train_extra"] = [extra.description, extra.fingerprint]
    val_source = str(cfg.get("val_source") or "")
    if source.kind == "shards":
        return _shard_settings(cfg, source, val_source, vocab_size)
    if val_source:
        raise UserError(
            f"data.val_source={val_source!r} is only for a glob of token shards, and data.source="
            f"{cfg.source!r} is not one: leave data.val_source empty (data.val_fraction is held out)"
        )
    if source.kind == "task":
        return dict(settings, **_task_settings(cfg, vocab_size))
    if source.kind == "bin":
        dtype = str(cfg.token_dtype)
        if dtype not in TOKEN_DTYPES:
            raise UserError(f"data.token_dtype={dtype!r} is not supported: use 'uint32' or 'uint16'")
        # An llm.c header names its own dtype; data.token_dtype is for flat files.
        vocab_size = _token_file_vocab(
            source.paths[0], vocab_size, None if shards_lib.has_header(source.paths[0]) else dtype
        )
        return dict(settings, tokenizer=None, vocab_size=vocab_size, token_dtype=dtype)
    tokenizer = str(cfg.tokenizer)
    if tokenizer == "byte":
        if vocab_size not in (0, BYTE_VOCAB):
            raise UserError(f"data.vocab_size={vocab_size} is invalid for tokenizer='byte': use 256 (or 0 for auto)")
        vocab_size = BYTE_VOCAB
    elif tokenizer == "bpe":
        if vocab_size < BPE_MIN_VOCAB:
            raise UserError(
                f"data.vocab_size={vocab_size} is invalid for tokenizer='bpe': use at least "
                f"{BPE_MIN_VOCAB} (256 bytes + {EOT}), e.g. 8192"
            )
    else:
        return dict(settings, **given_tokenizer_settings(cfg, tokenizer, vocab_size))
    return dict(settings, tokenizer=tokenizer, vocab_size=vocab_size)


def given_tokenizer_settings(cfg: Any, path: str, vocab_size: int) -> dict:
    """The settings of data.tokenizer=PATH, a tokenizer a model came with (read_given): its file and
    contents' hash, the vocabulary (data.vocab_size, the model's, may exceed the tokenizer's) and
    the id that ends each document (data.eot_id, else <|endoftext|> where it has one)."""
    tokenizer = read_given(path)
    size = tokenizer.get_vocab_size()
    if vocab_size and vocab_size < size:
        raise UserError(
            f"data.vocab_size={vocab_size} is smaller than the {size} tokens of data.tokenizer={path!r}: "
            f"set data.vocab_size={size} or more (0: the tokenizer's)"
        )
    eot_id = int(cfg.get("eot_id", -1))
    eot_id = tokenizer.token_to_id(EOT) if eot_id < 0 else eot_id
    if eot_id is not None and eot_id >= (vocab_size or size):
        raise UserError(
            f"data.eot_id={eot_id} is not below vocab_size={vocab_size or size}: set the id that ends a "
            "document in this vocabulary"
        )
    return dict(
        tokenizer="bpe",
        tokenizer_file=str(pathlib.Path(path).expanduser().resolve()),
        tokenizer_sha256=hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        vocab_size=vocab_size or size,
        eot_id=eot_id,
    )


def _token_file_vocab(path: pathlib.Path, vocab_size: int, dtype: str | None) -> int:
    """vocab_size for a token file: the given one or meta.json's, which must not contradict."""
    meta_path = path.parent / "meta.json"
    meta = _read_token_meta(meta_path) if meta_path.is_file() else {}
    if dtype is not None and "dtype" in meta and meta["dtype"] != dtype:
        raise UserError(
            f"{meta_path} says dtype={meta['dtype']!r} but data.token_dtype={dtype!r}: "
            "set data.token_dtype to match the token file"
        )
    if vocab_size and "vocab_size" in meta and meta["vocab_size"] != vocab_size:
        raise UserError(
            f"{meta_path} says vocab_size={meta['vocab_size']} but data.vocab_size={vocab_size}: "
            "set data.vocab_size to match (or 0 to read it from meta.json)"
        )
    vocab_size = vocab_size or meta.get("vocab_size", 0)
    if vocab_size <= 0:
        raise UserError(
            f"data.vocab_size=0 and no vocab_size in {meta_path} for token file {path}: set data.vocab_size"
        )
    return int(vocab_size)


def _shard_settings(cfg: Any, source: Source, val_source: str, vocab_size: int) -> dict:
    if not val_source:
        raise UserError(
            f"data.source={cfg.source!r} is a glob of token shards: name the validation shards with "
            "data.val_source (e.g. 'DIR/val_*.bin')"
        )
    val = resolve_source(val_source, "data.val_source")
    if val.kind not in ("shards", "bin"):
        raise UserError(
            f"data.val_source={val_source!r} is not token shards: pass a glob of .bin shards or a .bin file"
        )
    dtype = str(cfg.token_dtype)
    if dtype not in TOKEN_DTYPES:
        raise UserError(f"data.token_dtype={dtype!r} is not supported: use 'uint32' or 'uint16'")
    meta_path = source.paths[0].parent / "meta.json"  # mtp_jax.prepare writes one beside its shards
    known = _read_token_meta(meta_path).get("vocab_size", 0) if meta_path.is_file() else 0
    if vocab_size and vocab_size < known:
        raise UserError(
            f"data.vocab_size={vocab_size} is smaller than the shards' vocabulary ({known}, {meta_path}): "
            f"use at least {known} (or 0 to read it)"
        )
    if not (vocab_size or known):
        raise UserError(
            f"data.vocab_size=0 and no vocab_size in {meta_path} for the shards {cfg.source!r}: set "
            "data.vocab_size (50304 for GPT-2 shards: 50257 padded to a multiple of 64)"
        )
    return dict(
        tokenizer=None,
        vocab_size=vocab_size or known,
        token_dtype=dtype,
        val_source=val.description,
        val_paths=[str(p) for p in val.paths],
        val_fingerprint=val.fingerprint,
    )


def _read_token_meta(meta_path: pathlib.Path) -> dict:
    """meta.json beside a token file: a JSON object whose vocab_size, if any, is an integer."""
    try:
        meta = json.loads(meta_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}): fix or delete it and set data.vocab_size") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size", 0), int):
        raise UserError(
            f"{meta_path} must be a JSON object with an integer vocab_size: fix or delete it and set data.vocab_size"
        )
    return meta


def _task_settings(cfg: Any, vocab_size: int) -> dict:
    """What determines a task's cache: every task parameter but teacherless (an input transform)."""
    if str(cfg.tokenizer) != "byte" or vocab_size not in (0, BYTE_VOCAB):
        raise UserError(
            f"data.source={cfg.source!r} is byte text: set data.tokenizer='byte' and "
            f"data.vocab_size=256 (got {cfg.tokenizer!r}, {vocab_size})"
        )
    task = tasks.from_config(cfg)
    return dict(
        tokenizer="byte",
        vocab_size=BYTE_VOCAB,
        task=task.name,
        **task.params,
        num_train=int(cfg.task.num_train),
        seed=int(cfg.task.seed),
        eval_problems=int(cfg.task.eval_problems),
        example_len=tasks.example_len(task, int(cfg.task.example_len)),
    )


# ---------------------------------------------------------------------------------------------
# Documents of a text source
# ---------------------------------------------------------------------------------------------


def split_documents(source: Source, val_fraction: float, seed: int) -> tuple[list, list]:
    """Train and validation documents; by document, or by position for a single stream."""
    docs: list[Document]
    if source.kind == "files":
        docs = list(source.paths)
    elif source.kind == "jsonl":
        docs = _read_jsonl(source.paths[0])
    else:
        docs = [source.paths[0]]
    if len(docs) == 1:
        text = read_text(docs[0])
        if not text:
            raise UserError(f"data.source {source.description} holds no UTF-8 text: pass a text file")
        cut = len(text) - val_count(len(text), val_fraction)
        return [text[:cut]], [text[cut:]]
    n_val = min(len(docs) - 1, val_count(len(docs), val_fraction))
    is_val = np.zeros(len(docs), bool)
    is_val[np.random.default_rng(seed).permutation(len(docs))[:n_val]] = True
    return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]


def extra_training_source(cfg: Any, source: Source) -> Source | None:
    """data.train_extra (None where it is empty): more training text (files: the standard library,
    a directory or a glob) beside data.source's, which keeps its split, so its held-out files stay
    the same."""
    extra = str(cfg.get("train_extra") or "")
    if not extra:
        return None
    extra_source = resolve_source(extra, "data.train_extra")
    if extra_source.kind != "files" or source.kind != "files":
        raise UserError(
            f"data.train_extra={extra!r} adds files to a source of files, and "
            f"{extra_source.description if extra_source.kind != 'files' else source.description} is not one: "
            "name the standard library, a directory or a glob of text files in both, or leave data.train_extra empty"
        )
    return extra_source


def extra_documents(extra: Source, source: Source) -> list[Document]:
    """extra's files that are not also source's (held-out files stay held out, none is read twice)."""
    own = {pathlib.Path(p).resolve() for p in source.paths}
    return [p for p in extra.paths if pathlib.Path(p).resolve() not in own]


def val_count(n: int, val_fraction: float) -> int:
    """Validation share of n items: at least one, so validation is never empty."""
    return min(n, max(1, round(n * val_fraction)))


def _read_jsonl(path: pathlib.Path) -> list[str]:
    with path.open("rb") as f:
        docs = [jsonl_text(path, line_no, line, "text") for line_no, line in enumerate(f, 1) if line.strip()]
    if not docs:
        raise UserError(f"{path} has no documents: pass a JSONL file with one {{'text': ...}} per line")
    return docs


_JSON_TYPES = {
    type(None): "null",
    bool: "true or false",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def jsonl_text(path: pathlib.Path, line_no: int, line: bytes, field: str, fix: str = "fix that line") -> str:
    """The text of one JSONL line: the string under `field` of the JSON object the line holds.
    Anything else (bytes that are not UTF-8, not JSON, no `field`, a value that is not a string)
    is a UserError naming the file and line; `fix` is its advice for a line without `field`."""
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text: {path.name} is not JSONL; remove it or fix the file") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{where} is not a JSON object with a {field!r} field (not JSON: {e.msg}): fix that line"
        ) from None
    if not isinstance(record, dict) or field not in record:
        has = (
            f"its fields: {', '.join(map(repr, record)) or 'none'}"
            if isinstance(record, dict)
            else f"the line holds {_JSON_TYPES[type(record)]}"
        )
        raise UserError(f"{where} is not a JSON object with a {field!r} field ({has}): {fix}")
    text = record[field]
    if not isinstance(text, str):
        raise UserError(f"{where}: its {field!r} is {_JSON_TYPES[type(text)]}, not a string: fix that line")
    return text


def read_text(doc: Document) -> str | None:
    """The document's text, or None for a file that is not UTF-8."""
    if isinstance(doc, str):
        return doc
    try:
        # Bytes as they are: read_text would turn '\r\n' and '\r' into '\n'.
        return doc.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
