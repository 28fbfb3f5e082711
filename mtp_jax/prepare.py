"""A large text corpus -> token shards in the llm.c format, tokenized in parallel, resumable.

    python -m mtp_jax.prepare --source='corpus/*.jsonl' --tokenizer=bpe --out=DIR --workers=8

reads text files (one document each), JSONL files (a document per line, its text under
--text_field) and parquet files (a --text_field column, read in record batches), in sorted path
order. The first --val_docs documents go to DIR/val_000000.bin …, the rest to
DIR/train_000000.bin …; every shard but a split's last holds --shard_tokens tokens, and every
document ends with <|endoftext|> when the tokenizer has it. Each shard is written under a
temporary name and renamed when complete, and DIR/progress.json records where it ends in the
documents, so a rerun after an interruption skips what is done and writes the same shards as an
uninterrupted run. DIR/meta.json, written last, holds the vocabulary, the end-of-text id and the
counts. Train with --config.data.source='DIR/train_*.bin' --config.data.val_source='DIR/val_*.bin'.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
from collections.abc import Iterator

import numpy as np
import tokenizers
import tqdm

from mtp_jax.cli import ArgumentParser, fail
from mtp_jax.corpus import brief, check_documents, documents, source_files
from mtp_jax.data import shards as shards_lib
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.errors import UserError
from mtp_jax.folders import new_folders, remove_empty

PROGRESS, META, TOKENIZER = "progress.json", "meta.json", "tokenizer.json"
_CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough to amortise the transfer


@dataclasses.dataclass(frozen=True)
class Settings:
    source: str
    tokenizer: str  # 'byte' | 'bpe' | a path to a tokenizer.json
    out: pathlib.Path
    text_field: str = "text"
    shard_tokens: int = 100_000_000
    val_docs: int = 1000
    vocab_size: int = 8192  # of --tokenizer=bpe
    bpe_docs: int = 100_000
    workers: int = 1

    def identity(self, files: list[pathlib.Path]) -> dict:
        """What fixes the shards' contents (not --workers): a rerun resumes only if it matches."""
        stat = lambda p: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]  # noqa: E731
        tokenizer_file = None if self.tokenizer in ("byte", "bpe") else stat(pathlib.Path(self.tokenizer))
        return dict(
            files=[stat(p) for p in files],
            tokenizer_file=tokenizer_file,
            tokenizer=self.tokenizer,
            text_field=self.text_field,
            shard_tokens=self.shard_tokens,
            val_docs=self.val_docs,
            vocab_size=self.vocab_size,
            bpe_docs=self.bpe_docs,
        )


def parse_args(argv: list[str]) -> Settings:
    p = ArgumentParser(prog="python -m mtp_jax.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, help="a glob of .txt, .jsonl or .parquet files (quote it)")
    p.add_argument("--tokenizer", required=True, help="'byte', 'bpe' (trained here), or a tokenizer.json file")
    p.add_argument("--out", required=True, help="the folder for the shards (a rerun resumes in it)")
    p.add_argument("--text_field", default="text", help="the JSONL key or parquet column holding the text")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--val_docs", type=int, default=1000, help="documents in the validation shards")
    p.add_argument("--vocab_size", type=int, default=8192, help="vocabulary of --tokenizer=bpe")
    p.add_argument("--bpe_docs", type=int, default=100_000, help="training documents --tokenizer=bpe learns from")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes, one core each")
    a = p.parse_args(argv)
    return Settings(
        a.source,
        a.tokenizer,
        pathlib.Path(a.out).expanduser(),
        a.text_field,
        a.shard_tokens,
        a.val_docs,
        a.vocab_size,
        a.bpe_docs,
        a.workers,
    )


def check(settings: Settings) -> None:
    for name in ("shard_tokens", "val_docs", "workers", "bpe_docs"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name}={getattr(settings, name)} must be at least 1")
    if settings.tokenizer == "bpe" and settings.vocab_size < tokenizer_lib.BPE_MIN_VOCAB:
        raise UserError(
            f"--vocab_size={settings.vocab_size} is too small for --tokenizer=bpe: use at least "
            f"{tokenizer_lib.BPE_MIN_VOCAB}, e.g. 8192"
        )
    if settings.tokenizer not in ("byte", "bpe"):
        check_tokenizer_file(settings.tokenizer)


def check_tokenizer_file(path: str) -> None:
    """Raises UserError unless `path` holds a tokenizer.json that this process can read."""
    try:
        text = pathlib.Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"--tokenizer={path!r} is not 'byte', 'bpe' or an existing tokenizer.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"--tokenizer={path!r} cannot be read ({getattr(e, 'strerror', None) or e}): pass a "
            "tokenizer.json you can read"
        ) from None
    try:
        tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 — tokenizers raises a bare Exception for a file it cannot parse
        raise UserError(
            f"--tokenizer={path!r} is not a tokenizer.json ({brief(e)}): pass "
            "the tokenizer.json of a Hugging Face tokenizer"
        ) from None


def chunks(docs: Iterator[str], skip: int) -> Iterator[list[str]]:
    """The documents after the first `skip`, in lists of about _CHUNK_CHARS characters."""
    chunk, size = [], 0
    for i, doc in enumerate(docs):
        if i < skip:
            continue
        chunk.append(doc)
        size += len(doc)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# Tokenizing, in worker processes
# ---------------------------------------------------------------------------------------------

_encode = None  # this worker's tokenizer, set once by _start_worker


def _start_worker(tokenizer_file: str | None) -> None:
    global _encode
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: --workers says how many
    if tokenizer_file is None:
        _encode = tokenizer_lib.encode_bytes
        return
    tok = tokenizers.Tokenizer.from_file(tokenizer_file)
    eot = tok.token_to_id(tokenizer_lib.EOT)
    if eot is None:
        _encode = lambda texts: [np.array(e.ids) for e in tok.encode_batch_fast(texts)]  # noqa: E731
    else:
        _encode = lambda texts: tokenizer_lib.encode_bpe(tok, eot, texts)  # noqa: E731


def _encode_chunk(texts: list[str]) -> list[tuple[np.ndarray, int]]:
    """Each document's (ids, UTF-8 bytes)."""
    return [(ids, len(text.encode("utf-8"))) for ids, text in zip(_encode(texts), texts)]


def encoded(
    settings: Settings, files: list[pathlib.Path], tokenizer_file: str | None, skip: int
) -> Iterator[tuple[np.ndarray, int]]:
    """(ids, bytes) of each document after the first `skip`, in order, tokenized by --workers
    processes with at most two chunks per worker in flight (so memory stays bounded)."""
    context = multiprocessing.get_context("spawn")  # no fork of a parent that may run JAX's threads
    with context.Pool(settings.workers, _start_worker, (tokenizer_file,)) as pool:
        pending = collections.deque()
        for chunk in chunks(documents(files, settings.text_field), skip):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * settings.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


def make_tokenizer(settings: Settings, files: list[pathlib.Path]) -> tuple[str | None, int, int | None]:
    """(tokenizer.json in --out or None for bytes, vocab_size, end-of-text id or None)."""
    if settings.tokenizer == "byte":
        return None, tokenizer_lib.BYTE_VOCAB, None
    path = settings.out / TOKENIZER
    if settings.tokenizer == "bpe":
        if not path.is_file():  # a resumed run keeps the one its shards were made with
            docs = documents(files, settings.text_field)
            for _ in zip(range(settings.val_docs), docs):  # learn from training documents only
                pass
            texts = (d for _, d in zip(range(settings.bpe_docs), docs))
            bpe = tokenizer_lib.train_bpe(texts, settings.vocab_size, sys.stderr.isatty(), length=settings.bpe_docs)
            bpe.save(str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
    else:
        shutil.copyfile(settings.tokenizer, path)
    tok = tokenizers.Tokenizer.from_file(str(path))
    return str(path), tok.get_vocab_size(), tok.token_to_id(tokenizer_lib.EOT)


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


class ShardWriter:
    """Deals documents' ids into shards of shard_tokens, validation first, and records in
    progress.json, after each shard's rename, where in the documents it ends."""

    def __init__(self, out: pathlib.Path, dtype: str, settings: Settings, progress: dict):
        self.out, self.dtype, self.settings, self.progress = out, dtype, settings, progress
        self.parts: list[np.ndarray] = []
        self.size = 0

    def split_of(self, doc: int) -> str:
        return "val" if doc < self.settings.val_docs else "train"

    def add(self, doc: int, ids: np.ndarray, n_bytes: int, start: int = 0) -> None:
        """Document number `doc`, from its id `start` on (a resumed document's rest)."""
        if doc == self.settings.val_docs and start == 0:
            self.write("val", doc, 0)  # the validation split ends here
        split = self.split_of(doc)
        position = start
        while position < len(ids):
            take = min(len(ids) - position, self.settings.shard_tokens - self.size)
            self.parts.append(ids[position : position + take])
            self.size += take
            position += take
            if self.size == self.settings.shard_tokens:
                if position == len(ids):
                    self.progress["bytes"][split] += n_bytes
                    self.write(split, doc + 1, 0)
                    return
                self.write(split, doc, position)
        self.progress["bytes"][split] += n_bytes

    def write(self, split: str, doc: int, offset: int) -> None:
        """The buffered ids as the split's next shard, if any; the documents resume at (doc, offset)."""
        if self.parts:
            done = self.progress["shards"][split]
            name = f"{split}_{len(done):06d}.bin"
            tmp = self.out / f".{name}.tmp"
            with tmp.open("wb") as f:
                f.write(shards_lib.header(self.size, self.dtype))
                for part in self.parts:
                    f.write(np.asarray(part).astype(self.dtype).tobytes())
            tmp.rename(self.out / name)
            done.append([name, self.size])
            self.parts, self.size = [], 0
        self.progress["cursor"] = [doc, offset]
        write_json(self.out / PROGRESS, self.progress)


def write_json(path: pathlib.Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.rename(path)


def resumed_progress(settings: Settings, identity: dict) -> dict | None:
    """progress.json of an earlier run with the same settings, or None for a fresh start; refuses
    an --out that holds anything else. Writes nothing."""
    path = settings.out / PROGRESS
    if path.is_file():
        try:
            progress = json.loads(path.read_bytes())
        except (OSError, ValueError):  # ValueError: not UTF-8, not JSON
            progress = None
        if not isinstance(progress, dict) or not {"identity", "shards", "cursor", "complete"} <= progress.keys():
            raise UserError(
                f"{path} is not the record prepare writes (damaged or written by something else): delete "
                f"--out={settings.out} to start over, or pass a new --out (nothing was overwritten)"
            )
        if progress["identity"] != identity:
            raise UserError(
                f"--out={settings.out} holds shards prepared from other files or settings: pass the same "
                "settings to resume, or a new --out, or delete it to start over (nothing was overwritten)"
            )
        return progress
    if settings.out.exists() and (not settings.out.is_dir() or any(settings.out.iterdir())):
        raise UserError(
            f"--out={settings.out} exists and was not written by prepare: pass a new folder (nothing was overwritten)"
        )
    return None


def start_progress(settings: Settings, identity: dict) -> dict:
    """A fresh progress.json in --out (made here if missing): from now on a rerun resumes here
    (the BPE training included)."""
    progress = dict(
        identity=identity, shards={"val": [], "train": []}, bytes={"val": 0, "train": 0}, cursor=[0, 0], complete=False
    )
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
        write_json(settings.out / PROGRESS, progress)
    except OSError as e:
        raise UserError(
            f"cannot write --out={settings.out} ({e.strerror or e}): pass a folder you can write to"
        ) from None
    return progress


def prepare(settings: Settings, show_progress: bool = True) -> dict:
    """Writes (or completes) the shards of `settings` in --out; returns its meta.json. What can be
    checked before writing is; a fresh run refused later (a broken line deep in the corpus) leaves
    no --out behind."""
    check(settings)
    files = source_files(settings.source)
    identity = settings.identity(files)
    progress = resumed_progress(settings, identity)
    if progress is not None and progress["complete"]:
        return json.loads((settings.out / META).read_text())
    check_documents(files, settings.source, settings.text_field, settings.val_docs)
    if progress is not None:
        return write_shards(settings, files, progress, show_progress)
    made = new_folders(settings.out)
    try:
        return write_shards(settings, files, start_progress(settings, identity), show_progress)
    except UserError:  # what it wrote is removed: the fix of the input would leave it unusable
        for path in settings.out.iterdir() if settings.out.is_dir() else ():  # files only, and --out was empty
            path.unlink()
        remove_empty(made)
        raise


def write_shards(settings: Settings, files: list[pathlib.Path], progress: dict, show_progress: bool) -> dict:
    """Tokenizes the documents after progress.json's cursor into shards; returns meta.json."""
    tokenizer_file, vocab_size, eot_id = make_tokenizer(settings, files)
    dtype = "<u2" if vocab_size <= 1 << 16 else "<u4"
    writer = ShardWriter(settings.out, dtype, settings, progress)
    # Shards past the recorded ones are the leftovers of an interrupted run: rewritten below.
    first, offset = progress["cursor"]
    doc, tokens = first - 1, sum(n for split in progress["shards"].values() for _, n in split)
    bar = tqdm.tqdm(unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress, dynamic_ncols=True)
    with bar:
        for doc, (ids, n_bytes) in enumerate(encoded(settings, files, tokenizer_file, first), first):
            writer.add(doc, ids, n_bytes, offset if doc == first else 0)
            tokens += len(ids)
            bar.update(n_bytes)
            bar.set_postfix(documents=doc + 1, tokens=tokens, refresh=False)
    n_docs = max(doc + 1, first)  # check_documents saw more than --val_docs
    writer.write(writer.split_of(n_docs - 1), n_docs, 0)
    shard_lists = progress["shards"]
    meta = dict(
        format="llm.c",
        dtype=np.dtype(dtype).name,
        vocab_size=vocab_size,
        eot_id=eot_id,
        tokenizer="byte" if tokenizer_file is None else "bpe",
        source=settings.source,
        text_field=settings.text_field,
        shard_tokens=settings.shard_tokens,
        n_val_docs=settings.val_docs,
        n_train_docs=n_docs - settings.val_docs,
        **{f"n_{s}_tokens": sum(n for _, n in shard_lists[s]) for s in ("train", "val")},
        **{f"{s}_bytes": progress["bytes"][s] for s in ("train", "val")},
        shards={s: [name for name, _ in shard_lists[s]] for s in ("train", "val")},
    )
    write_json(settings.out / META, meta)
    progress["complete"] = True
    write_json(settings.out / PROGRESS, progress)
    return meta


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        meta = prepare(settings, show_progress=sys.stderr.isatty())
    except UserError as e:
        fail(str(e))
    print(
        f"wrote {len(meta['shards']['train'])} training and {len(meta['shards']['val'])} validation shards "
        f"({meta['n_train_tokens']:,} and {meta['n_val_tokens']:,} tokens) to {settings.out}; train with "
        f"--config.data.source='{settings.out}/train_*.bin' --config.data.val_source='{settings.out}/val_*.bin' "
        f"--config.data.vocab_size={meta['vocab_size']}"
    )


if __name__ == "__main__":
    main()
