"""Corpus -> token files -> batches.

`prepare` turns a source (the Python stdlib, a directory, glob, text file, JSONL file, an
existing token file, or a synthetic task of mtp_jax.tasks) into `train.bin` / `val.bin` (flat
little-endian ids) plus `meta.json` in a cache directory, and memory-maps them; a task also
writes `train_mask.bin` / `val_mask.bin` (uint8, 1 where a token is a loss target). The batch
functions below are pure functions of `(seed, step, process_index)`, so resuming at step s
reproduces the run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import glob as globlib
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import tokenizers
import tqdm

from mtp_jax import tasks
from mtp_jax.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: text files are decoded without newline translation
EOT = "<|endoftext|>"
_TMP_PREFIX = ".tmp-"
_BYTE_VOCAB = 256
_BPE_MIN_VOCAB = _BYTE_VOCAB + 1  # the byte alphabet plus <|endoftext|>
_TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}
_CHUNK_DOCS = 64  # documents per batch-encode call: large enough to use all cores
_CHUNK_TOKENS = 1 << 24  # tokens per read when copying / scanning a token file


# ---------------------------------------------------------------------------------------------
# Prepared data and tokenizers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class TokenData:
    train: np.ndarray  # [n_train_tokens] memmap of train.bin
    val: np.ndarray  # [n_val_tokens] memmap of val.bin
    meta: dict
    directory: pathlib.Path
    train_mask: np.ndarray | None = None  # [n_train_tokens] uint8 loss mask of a task; None: all targets
    val_mask: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def example_len(self) -> int:
        """Windows start at multiples of this: a task's packed problem length (1 for text)."""
        return self.meta.get("example_len", 1)

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per validation token: converts loss per token into bits per byte."""
        if self.meta["val_bytes"] is None or not self.meta["n_val_tokens"]:
            return None
        return self.meta["val_bytes"] / self.meta["n_val_tokens"]


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    vocab_size = _BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BpeTokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        # Keep <|endoftext|> visible: it marks where one sampled document ends.
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer that produced the token files in `directory` (a prepared cache)."""
    directory = pathlib.Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} does not exist: pass a directory made by data.prepare")
    meta = json.loads(meta_path.read_text())
    if meta["tokenizer"] == "byte":
        return ByteTokenizer()
    if meta["tokenizer"] == "bpe":
        return BpeTokenizer(
            tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")), meta["vocab_size"]
        )
    raise UserError(
        f"{directory} was prepared from the token file {meta['source']}: there is no tokenizer "
        "for a token-file dataset; prepare from text to encode or decode"
    )


# ---------------------------------------------------------------------------------------------
# prepare: source -> cache directory
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    kind: str  # 'files' | 'jsonl' | 'text' | 'bin' | 'task'
    name: str  # human part of the cache directory name
    description: str
    paths: tuple[pathlib.Path, ...]  # 'files': the corpus files in split order; else the one file
    fingerprint: tuple  # cheap identity of the contents: (path, size, mtime_ns) per file


def prepare(data_cfg: Any, *, show_progress: bool = True) -> TokenData:
    """Builds (or reuses) the token cache for `data_cfg` and memory-maps it.

    Text is decoded as UTF-8 for both tokenizers; files that are not valid UTF-8 are skipped
    and counted in one log line. Hidden files and directories (names starting with '.') under
    a directory source are skipped, so a `.git` folder does not become training data.
    The cache lives in `cache_dir/<source>-<tokenizer>-<hash>/`; it is built in a temporary
    directory and renamed into place only when complete.
    """
    source = _resolve_source(str(data_cfg.source))
    settings = _check_settings(data_cfg, source)
    key = json.dumps([FORMAT_VERSION, source.description, source.fingerprint, settings])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache_dir = pathlib.Path(str(data_cfg.cache_dir)).expanduser()
    final = cache_dir / f"{source.name}-{settings['tokenizer'] or 'tokens'}-{digest}"

    if final.exists():
        problem = _cache_problem(final)
        if problem is None:
            return _load(final)
        log.warning("Rebuilding data cache %s: %s", final, problem)

    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(cache_dir, final.name)
    tmp = pathlib.Path(
        tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}-{os.getpid()}-", dir=cache_dir)
    )
    tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by others
    try:
        if source.kind == "bin":
            meta = _build_from_tokens(source, settings, tmp)
        elif source.kind == "task":
            meta = _build_task(data_cfg, source, settings, tmp)
        else:
            meta = _build_from_text(source, settings, tmp, show_progress)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(final)


def check_fits(data: TokenData, window: int) -> None:
    """Raises UserError unless both splits hold at least one window of `window` tokens."""
    for split, tokens in (("train", data.train), ("validation", data.val)):
        _check_split_fits(len(tokens), window, split)


def _check_split_fits(n_tokens: int, window: int, split: str) -> None:
    if n_tokens < window:
        raise UserError(
            f"the {split} split has {n_tokens} tokens, fewer than one window of {window} tokens "
            "(seq_len + MTP tokens): use a smaller seq_len or more data (data.source)"
        )


def _resolve_source(source: str) -> _Source:
    name = tasks.task_name(source)
    if name is not None:
        return _Source("task", f"task-{name}", source, (), ())
    if source == "stdlib" or source.startswith("stdlib/"):
        # 'stdlib/email': one package of it, a small fixed corpus every Python has (for many epochs).
        stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        root = stdlib / source.removeprefix("stdlib").strip("/")
        if not root.is_dir():
            raise UserError(f"data.source={source!r}: the standard library has no package {root.name!r} "
                            f"(in {stdlib}): name one of its directories, e.g. stdlib/email")
        files = [
            p
            for p in root.rglob("*.py")
            if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
        ]
        return _files_source(source.replace("/", "-"), f"stdlib:{root}", root, files)
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise UserError(f"data.source={source!r} contains no files: pass a directory with text files")
        return _files_source(path.name, f"directory:{path.resolve()}", path, files)
    if path.is_file():
        kind = {".bin": "bin", ".jsonl": "jsonl"}.get(path.suffix, "text")
        stat = path.stat()
        return _Source(
            kind, path.stem, f"{kind}:{path.resolve()}", (path,),
            ((str(path.resolve()), stat.st_size, stat.st_mtime_ns),),
        )
    if globlib.has_magic(source):
        files = [pathlib.Path(p) for p in globlib.glob(os.path.expanduser(source), recursive=True)]
        files = [p for p in files if p.is_file()]
        if not files:
            raise UserError(f"data.source={source!r} matches no files: fix the glob pattern")
        return _files_source("glob", f"glob:{source}", pathlib.Path("/"), [p.resolve() for p in files])
    if path.is_symlink():
        raise UserError(f"data.source={source!r} is a broken symlink or a symlink loop: point it at the data")
    raise UserError(
        f"data.source={source!r} does not exist: pass an existing directory, file, glob, 'stdlib' or 'stdlib/PACKAGE'"
    )


def _files_source(name: str, description: str, root: pathlib.Path, files: list) -> _Source:
    # Sorted by path relative to the root, so the split is the same on every machine.
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    fingerprint = tuple(
        (p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)
        for p, st in ((p, p.stat()) for p in files)
    )
    return _Source("files", _safe_name(name), description, tuple(files), fingerprint)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "data"


def _check_settings(cfg: Any, source: _Source) -> dict:
    """The validated settings that, with the source, determine the cache contents."""
    val_fraction = float(cfg.val_fraction)
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction} must be in (0, 1): use e.g. 0.02")
    settings = dict(val_fraction=val_fraction, split_seed=int(cfg.split_seed))
    vocab_size = int(cfg.vocab_size)
    if source.kind == "task":
        return dict(settings, **_task_settings(cfg, vocab_size))
    if source.kind == "bin":
        dtype = str(cfg.token_dtype)
        if dtype not in _TOKEN_DTYPES:
            raise UserError(f"data.token_dtype={dtype!r} is not supported: use 'uint32' or 'uint16'")
        vocab_size = _token_file_vocab(source.paths[0], vocab_size, dtype)
        return dict(settings, tokenizer=None, vocab_size=vocab_size, token_dtype=dtype)
    tokenizer = str(cfg.tokenizer)
    if tokenizer == "byte":
        if vocab_size not in (0, _BYTE_VOCAB):
            raise UserError(
                f"data.vocab_size={vocab_size} is invalid for tokenizer='byte': use 256 (or 0 for auto)"
            )
        vocab_size = _BYTE_VOCAB
    elif tokenizer == "bpe":
        if vocab_size < _BPE_MIN_VOCAB:
            raise UserError(
                f"data.vocab_size={vocab_size} is invalid for tokenizer='bpe': use at least "
                f"{_BPE_MIN_VOCAB} (256 bytes + {EOT}), e.g. 8192"
            )
    else:
        raise UserError(f"data.tokenizer={tokenizer!r} is not supported: use 'byte' or 'bpe'")
    return dict(settings, tokenizer=tokenizer, vocab_size=vocab_size)


def _token_file_vocab(path: pathlib.Path, vocab_size: int, dtype: str) -> int:
    """vocab_size for a token file: the given one or meta.json's, which must not contradict."""
    meta_path = path.parent / "meta.json"
    meta = _read_token_meta(meta_path) if meta_path.is_file() else {}
    if "dtype" in meta and meta["dtype"] != dtype:
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
            f"data.vocab_size=0 and no vocab_size in {meta_path} for token file {path}: "
            "set data.vocab_size"
        )
    return int(vocab_size)


def _read_token_meta(meta_path: pathlib.Path) -> dict:
    """meta.json beside a token file: a JSON object whose vocab_size, if any, is an integer."""
    try:
        meta = json.loads(meta_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}): fix or delete it and set data.vocab_size") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size", 0), int):
        raise UserError(f"{meta_path} must be a JSON object with an integer vocab_size: fix or delete it "
                        "and set data.vocab_size")
    return meta


def _task_settings(cfg: Any, vocab_size: int) -> dict:
    """What determines a task's cache: every task parameter but teacherless (an input transform)."""
    if str(cfg.tokenizer) != "byte" or vocab_size not in (0, _BYTE_VOCAB):
        raise UserError(f"data.source={cfg.source!r} is byte text: set data.tokenizer='byte' and "
                        f"data.vocab_size=256 (got {cfg.tokenizer!r}, {vocab_size})")
    task = tasks.from_config(cfg)
    return dict(tokenizer="byte", vocab_size=_BYTE_VOCAB, task=task.name, **task.params,
                num_train=int(cfg.task.num_train), seed=int(cfg.task.seed),
                eval_problems=int(cfg.task.eval_problems),
                example_len=tasks.example_len(task, int(cfg.task.example_len)))


def _build_task(cfg: Any, source: _Source, settings: dict, out: pathlib.Path) -> dict:
    """A task's problems packed into train/val token streams and their loss masks (tasks.pack)."""
    num_val = _n_val(settings["num_train"], settings["val_fraction"])
    problems = tasks.splits(tasks.from_config(cfg), num_train=settings["num_train"], num_val=num_val,
                            eval_problems=settings["eval_problems"], seed=settings["seed"],
                            split_seed=settings["split_seed"])
    checksums, counts, dtype = {}, {}, _out_dtype(settings["vocab_size"])
    for split, split_problems in problems.items():
        streams = tasks.pack(split_problems, settings["example_len"])
        for suffix, stream, stream_dtype in zip(("", "_mask"), streams, (dtype, "u1")):
            with _SplitWriter(out / f"{split}{suffix}.bin", stream_dtype) as writer:
                writer.write(stream)
            checksums[split + suffix] = writer.sha256
        counts[split] = len(streams[0])
    meta = _meta(settings, source, dtype, n_train_tokens=counts["train"], n_val_tokens=counts["val"],
                 n_train_docs=len(problems["train"]), n_val_docs=len(problems["val"]), val_bytes=None,
                 checksums=checksums)
    return dict(meta, example_len=settings["example_len"],
                task={k: v for k, v in settings.items() if k not in meta})


def _out_dtype(vocab_size: int) -> str:
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def _build_from_tokens(source: _Source, settings: dict, out: pathlib.Path) -> dict:
    """Copies a token file into train.bin (first tokens) and val.bin (last fraction)."""
    path, vocab_size = source.paths[0], settings["vocab_size"]
    in_dtype = np.dtype(_TOKEN_DTYPES[settings["token_dtype"]])
    size = path.stat().st_size
    if size % in_dtype.itemsize:
        raise UserError(
            f"token file {path} has {size} bytes, not a multiple of {in_dtype.itemsize} "
            f"({settings['token_dtype']}): check data.token_dtype or the file"
        )
    if size == 0:
        raise UserError(f"token file {path} is empty: pass a file with tokens")
    tokens = np.memmap(path, dtype=in_dtype, mode="r")
    top = max(int(tokens[i : i + _CHUNK_TOKENS].max()) for i in range(0, len(tokens), _CHUNK_TOKENS))
    if top >= vocab_size:
        raise UserError(
            f"token file {path} holds token id {top} >= vocab_size={vocab_size}: "
            "set data.vocab_size larger or check data.token_dtype"
        )
    n_val = _n_val(len(tokens), settings["val_fraction"])
    dtype = _out_dtype(vocab_size)
    checksums = {}
    for split, part in (("train", tokens[: len(tokens) - n_val]), ("val", tokens[len(tokens) - n_val :])):
        with _SplitWriter(out / f"{split}.bin", dtype) as writer:
            for i in range(0, len(part), _CHUNK_TOKENS):
                writer.write(part[i : i + _CHUNK_TOKENS])
        checksums[split] = writer.sha256
    return _meta(
        settings, source, dtype, n_train_tokens=len(tokens) - n_val, n_val_tokens=n_val,
        n_train_docs=None, n_val_docs=None, val_bytes=None, checksums=checksums,
    )


def _build_from_text(source: _Source, settings: dict, out: pathlib.Path, show_progress: bool) -> dict:
    train_docs, val_docs = _split_documents(source, settings["val_fraction"], settings["split_seed"])
    if settings["tokenizer"] == "bpe":
        bpe = _train_bpe(train_docs, settings["vocab_size"], show_progress)
        bpe.save(str(out / "tokenizer.json"))
        encode = functools.partial(_encode_bpe, bpe, bpe.token_to_id(EOT))
    else:
        encode = _encode_bytes
    dtype = _out_dtype(settings["vocab_size"])
    stats = {}
    bar = tqdm.tqdm(total=len(train_docs) + len(val_docs), unit="doc", desc="tokenizing",
                    disable=not show_progress)
    with bar:
        for split, docs in (("train", train_docs), ("val", val_docs)):
            stats[split] = _write_split(docs, encode, out / f"{split}.bin", dtype, bar)
    skipped = stats["train"].skipped + stats["val"].skipped
    if skipped:
        log.warning("Skipped %d files of %s that are not UTF-8 text", skipped, source.description)
    if stats["train"].n_tokens + stats["val"].n_tokens == 0:
        raise UserError(f"data.source {source.description} holds no text: pass UTF-8 text files")
    return _meta(
        settings, source, dtype,
        n_train_tokens=stats["train"].n_tokens, n_val_tokens=stats["val"].n_tokens,
        n_train_docs=stats["train"].n_docs, n_val_docs=stats["val"].n_docs,
        val_bytes=stats["val"].n_bytes,
        checksums={split: s.sha256 for split, s in stats.items()},
    )


Document = pathlib.Path | str  # a file to read, or text already in memory


def _split_documents(source: _Source, val_fraction: float, seed: int) -> tuple[list, list]:
    """Train and validation documents; by document, or by position for a single stream."""
    docs: list[Document]
    if source.kind == "files":
        docs = list(source.paths)
    elif source.kind == "jsonl":
        docs = _read_jsonl(source.paths[0])
    else:
        docs = [source.paths[0]]
    if len(docs) == 1:
        text = _read_text(docs[0])
        if not text:
            raise UserError(f"data.source {source.description} holds no UTF-8 text: pass a text file")
        cut = len(text) - _n_val(len(text), val_fraction)
        return [text[:cut]], [text[cut:]]
    n_val = min(len(docs) - 1, _n_val(len(docs), val_fraction))
    is_val = np.zeros(len(docs), bool)
    is_val[np.random.default_rng(seed).permutation(len(docs))[:n_val]] = True
    return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]


def _n_val(n: int, val_fraction: float) -> int:
    """Validation share of n items: at least one, so validation is never empty."""
    return min(n, max(1, round(n * val_fraction)))


def _read_jsonl(path: pathlib.Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8", errors="strict") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f"{path}:{line_no} is not a JSON object with a 'text' field ({e!r}): fix that line"
                ) from None
            docs.append(str(text))
    if not docs:
        raise UserError(f"{path} has no documents: pass a JSONL file with one {{'text': ...}} per line")
    return docs


def _read_text(doc: Document) -> str | None:
    """The document's text, or None for a file that is not UTF-8."""
    if isinstance(doc, str):
        return doc
    try:
        # Bytes as they are: read_text would turn '\r\n' and '\r' into '\n'.
        return doc.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def _train_bpe(docs: Sequence[Document], vocab_size: int, show_progress: bool) -> tokenizers.Tokenizer:
    """A byte-level BPE trained on the training documents only."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    texts = (t for t in map(_read_text, docs) if t)
    bpe.train_from_iterator(texts, trainer, length=len(docs))
    return bpe


def _encode_bpe(bpe: tokenizers.Tokenizer, eot: int, texts: list[str]) -> list[np.ndarray]:
    # Each document ends with <|endoftext|> so windows can tell where documents meet.
    return [np.array(e.ids + [eot]) for e in bpe.encode_batch_fast(texts)]


def _encode_bytes(texts: list[str]) -> list[np.ndarray]:
    # 256 ids are all bytes: there is no spare id for a separator, so documents just abut.
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]


@dataclasses.dataclass
class _SplitStats:
    n_tokens: int
    n_docs: int
    n_bytes: int
    skipped: int
    sha256: str


def _write_split(
    docs: Sequence[Document],
    encode: Callable[[list[str]], list[np.ndarray]],
    path: pathlib.Path,
    dtype: str,
    bar: tqdm.tqdm,
) -> _SplitStats:
    n_docs = n_bytes = skipped = 0
    with _SplitWriter(path, dtype) as writer:
        for i in range(0, len(docs), _CHUNK_DOCS):
            chunk = docs[i : i + _CHUNK_DOCS]
            texts = [_read_text(d) for d in chunk]
            skipped += sum(t is None for t in texts)
            texts = [t for t in texts if t]
            for ids in encode(texts):
                writer.write(ids)
            n_docs += len(texts)
            n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            bar.update(len(chunk))
    return _SplitStats(writer.n_tokens, n_docs, n_bytes, skipped, writer.sha256)


class _SplitWriter:
    """Appends token ids to a little-endian file, counting and hashing them on the way."""

    def __init__(self, path: pathlib.Path, dtype: str):
        self._file = path.open("wb")
        self._dtype = dtype
        self._hash = hashlib.sha256()
        self.n_tokens = 0
        self.sha256 = ""

    def write(self, ids: np.ndarray) -> None:
        data = np.asarray(ids).astype(self._dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.n_tokens += len(ids)

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self.sha256 = self._hash.hexdigest()


def _meta(settings: dict, source: _Source, dtype: str, *, checksums: dict, **counts) -> dict:
    return dict(
        format_version=FORMAT_VERSION,
        tokenizer=settings["tokenizer"],
        vocab_size=settings["vocab_size"],
        dtype=np.dtype(dtype).name,
        **counts,
        source=source.description,
        val_fraction=settings["val_fraction"],
        split_seed=settings["split_seed"],
        sha256={f"{split}.bin": digest for split, digest in checksums.items()},
    )


def _cache_problem(directory: pathlib.Path) -> str | None:
    """Why the cache in `directory` cannot be used, or None when it can."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return "meta.json is missing"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "meta.json is not valid JSON"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format_version={meta.get('format_version')} is not {FORMAT_VERSION}"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        expected = meta[f"n_{split}_tokens"] * itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            return f"{path.name} has {actual} bytes, meta.json implies {expected}"
        mask = directory / f"{split}_mask.bin"
        if "example_len" in meta and (mask.stat().st_size if mask.is_file() else None) != meta[f"n_{split}_tokens"]:
            return f"{mask.name} does not hold one byte per token"
    if meta["tokenizer"] == "bpe" and not (directory / "tokenizer.json").is_file():
        return "tokenizer.json is missing"
    return None


def _remove_dead_builds(cache_dir: pathlib.Path, name: str) -> None:
    """Removes temp dirs left by builds of `name` whose process is gone (e.g. kill -9)."""
    for tmp in cache_dir.glob(f"{_TMP_PREFIX}{name}-*"):
        match = re.fullmatch(rf"{re.escape(_TMP_PREFIX + name)}-(\d+)-.*", tmp.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Renames a complete build into place, replacing an invalid cache only after success."""
    old = None
    if final.exists():
        if _cache_problem(final) is None:
            return  # another process published the same cache while this one was building
        old = final.with_name(f"{_TMP_PREFIX}{final.name}-{os.getpid()}-old")
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        # Another process published between the check above and this rename: use its cache.
        if _cache_problem(final) is not None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load(directory: pathlib.Path) -> TokenData:
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")

    def tokens(split: str, suffix: str = "", dtype: np.dtype = dtype) -> np.ndarray:
        if meta[f"n_{split}_tokens"] == 0:  # np.memmap cannot map an empty file
            return np.zeros(0, dtype)
        return np.memmap(directory / f"{split}{suffix}.bin", dtype=dtype, mode="r")

    masks = ({split: tokens(split, "_mask", np.dtype(np.uint8)) for split in ("train", "val")}
             if "example_len" in meta else {"train": None, "val": None})
    return TokenData(train=tokens("train"), val=tokens("val"), meta=meta, directory=directory,
                     train_mask=masks["train"], val_mask=masks["val"])


# ---------------------------------------------------------------------------------------------
# Batches: pure functions of (seed, step, process_index)
# ---------------------------------------------------------------------------------------------


def _epoch_stride(window: int, align: int) -> int:
    # Text: non-overlapping windows. A task (window = whole problems + n lookahead tokens): the
    # next window starts at the next problem, so every problem is an input exactly once.
    return window // align * align


def num_windows(n_tokens: int, window: int, align: int = 1) -> int:
    """Epoch-mode windows, at starts 0, s, 2 * s, ... for the stride s (window when align = 1)."""
    stride = _epoch_stride(window, align)
    return (n_tokens - window) // stride + 1 if n_tokens >= window else 0


def steps_per_epoch(n_tokens: int, *, window: int, batch_size: int, align: int = 1) -> int:
    """Full batches per epoch; the last partial batch of windows is dropped."""
    return num_windows(n_tokens, window, align) // batch_size


def global_batch_starts(
    n_tokens: int, *, window: int, batch_size: int, seed: int, step: int, num_epochs: int = 0, align: int = 1
) -> np.ndarray:
    """Start positions [batch_size] (int64) of the global batch at `step`, multiples of `align`
    (a task's example length, so that windows begin with a whole problem).

    num_epochs == 0: uniform random starts in [0, n_tokens - window], seeded by (seed, step).
    num_epochs > 0: each epoch visits every window exactly once in a permutation seeded by
    (seed, epoch); how many epochs to run is the trainer's business.
    """
    _check_split_fits(n_tokens, window, "train")
    if num_epochs == 0:
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, (n_tokens - window) // align, size=batch_size, endpoint=True, dtype=np.int64) * align
    per_epoch = steps_per_epoch(n_tokens, window=window, batch_size=batch_size, align=align)
    if per_epoch == 0:
        raise UserError(
            f"the train split has {num_windows(n_tokens, window, align)} windows of {window} tokens, "
            f"fewer than batch_size={batch_size}: use a smaller batch_size or seq_len, or more data"
        )
    order = _epoch_order(seed, step // per_epoch, num_windows(n_tokens, window, align))
    i = step % per_epoch
    return order[i * batch_size : (i + 1) * batch_size] * _epoch_stride(window, align)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    # Cached because every step of an epoch needs the same permutation; read-only so callers
    # cannot corrupt the cache.
    order = np.random.default_rng([seed, epoch, 1]).permutation(n_windows).astype(np.int64)
    order.flags.writeable = False
    return order


def local_batch(
    tokens: np.ndarray,
    *,
    window: int,
    batch_size: int,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int = 0,
    align: int = 1,
) -> np.ndarray:
    """This process's rows [batch_size // process_count, window] (int32) of the global batch.

    `tokens` may be any per-token stream: a task's loss mask gathers at the same starts."""
    if batch_size % process_count:
        raise UserError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}: "
            "use a batch_size that is a multiple of the number of processes"
        )
    starts = global_batch_starts(
        len(tokens), window=window, batch_size=batch_size, seed=seed, step=step,
        num_epochs=num_epochs, align=align,
    )
    rows = batch_size // process_count
    return _gather(tokens, starts[process_index * rows : (process_index + 1) * rows], window)


def eval_windows(val_tokens: np.ndarray, *, window: int, batch_size: int, num_batches: int,
                 align: int = 1) -> np.ndarray:
    """A fixed validation subset [num_batches, batch_size, window] (int32): evenly spaced starts
    (multiples of `align`)."""
    _check_split_fits(len(val_tokens), window, "validation")
    last = (len(val_tokens) - window) // align
    starts = np.linspace(0, last, num_batches * batch_size).round().astype(np.int64) * align
    return _gather(val_tokens, starts, window).reshape(num_batches, batch_size, window)


def _gather(tokens: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    return np.asarray(tokens[starts[:, None] + np.arange(window)], dtype=np.int32)
