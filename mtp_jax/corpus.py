"""The documents of a corpus for mtp_jax.prepare: text files (one document each), JSONL files (a
document per line, its text under a key) and parquet files (a text column, read in record
batches), in sorted path order; and the checks that refuse a bad file before anything is written.
"""

from __future__ import annotations

import codecs
import glob as globlib
import itertools
import os
import pathlib
from collections.abc import Iterator

from mtp_jax.data.sources import jsonl_text
from mtp_jax.errors import UserError

_PARQUET_ROWS = 1024  # rows per record batch read from a parquet file


def brief(error: Exception) -> str:
    """A library's error message on one line, cut to a readable length."""
    return " ".join(str(error).split())[:160]


def source_files(pattern: str) -> list[pathlib.Path]:
    files = sorted(
        p for p in map(pathlib.Path, globlib.glob(os.path.expanduser(pattern), recursive=True)) if p.is_file()
    )
    if not files:
        raise UserError(f"--source={pattern!r} matches no files: fix the glob pattern (and quote it)")
    return files


def documents(files: list[pathlib.Path], text_field: str) -> Iterator[str]:
    """Every document of `files` in order: a text file is one, a JSONL line one, a parquet row one."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield _text_document(path)


def check_documents(files: list[pathlib.Path], pattern: str, text_field: str, val_docs: int) -> None:
    """Reads the start of every file, and enough documents for both splits: what prepare refuses
    there it refuses before it writes anything (`pattern`: the --source the files match)."""
    for path in files:
        if path.suffix == ".parquet":
            _parquet_file(path, text_field)
        elif path.suffix == ".jsonl":
            next(_jsonl_documents(path, text_field), None)
        else:
            _text_document(path, head=1 << 16)
    n_docs = sum(1 for _ in itertools.islice(documents(files, text_field), val_docs + 1))
    if n_docs == 0:
        raise UserError(f"--source={pattern!r} holds no documents (its files are empty): pass files with text")
    if n_docs <= val_docs:
        raise UserError(
            f"--source={pattern!r} has {n_docs} documents, no more than --val_docs="
            f"{val_docs}: lower --val_docs to leave documents for training"
        )


def _text_document(path: pathlib.Path, head: int = -1) -> str:
    """The text file's text, or its first `head` bytes' (a character they cut short left out)."""
    with path.open("rb") as f:
        data = f.read(head)
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=head < 0)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: remove it from --source") from None


def _jsonl_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield jsonl_text(path, line_no, line, text_field, fix="fix that line, or pass --text_field")


def _parquet_file(path: pathlib.Path, text_field: str):
    """The pyarrow ParquetFile at `path`, checked to hold a text column `text_field`."""
    try:
        import pyarrow as pa  # optional dependency: the [parquet] extra
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path} is parquet, which needs pyarrow: pip install 'mtp_jax[parquet]'") from None
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a parquet file ({brief(e)}): remove it or fetch it again") from None
    schema = file.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path} has no column {text_field!r} (it has {', '.join(schema.names)}): pass --text_field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}'s column {text_field!r} holds {kind}, not text: pass --text_field")
    return file


def _parquet_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    """Each row's text; a null is an empty document."""
    import pyarrow as pa

    file = _parquet_file(path, text_field)
    try:
        for batch in file.iter_batches(batch_size=_PARQUET_ROWS, columns=[text_field]):
            yield from ("" if text is None else text for text in batch.column(0).to_pylist())
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} cannot be read ({brief(e)}): remove it or fetch it again") from None
