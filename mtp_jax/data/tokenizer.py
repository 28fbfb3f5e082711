"""Tokenizers: UTF-8 bytes, a byte-level BPE trained on the training documents, or one a model
came with (data.tokenizer=PATH: read_given).

A prepared cache records which one made its tokens (meta.json, plus tokenizer.json for BPE);
`load_tokenizer` rebuilds it from there, so decoding never needs the corpus.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import tokenizers

from mtp_jax import gguf
from mtp_jax.errors import UserError

EOT = "<|endoftext|>"
BYTE_VOCAB = 256
BPE_MIN_VOCAB = BYTE_VOCAB + 1  # the byte alphabet plus <|endoftext|>


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    vocab_size = BYTE_VOCAB

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

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` and the character offset where each token starts."""
        encoding = self._tokenizer.encode(text)
        return encoding.ids, [start for start, _ in encoding.offsets]

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
        return BpeTokenizer(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")), meta["vocab_size"])
    raise UserError(
        f"{directory} was prepared from the token file {meta['source']}: there is no tokenizer "
        "for a token-file dataset; prepare from text to encode or decode"
    )


def read_given(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The tokenizer data.tokenizer=PATH names: a tokenizer.json, a model folder that holds one, or
    a GGUF file's own (gguf.read_tokenizer)."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.suffix == ".gguf" and path.is_file():
        return gguf.read_tokenizer(path)
    if not path.is_file():
        raise UserError(
            f"data.tokenizer={str(path)!r} is not supported: use 'byte', 'bpe', or the path of a "
            "tokenizer.json, a folder holding one or a .gguf file"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 — the tokenizers library raises plain Exceptions
        raise UserError(
            f"data.tokenizer={str(path)!r} is not a tokenizer the tokenizers library reads "
            f"({' '.join(str(e).split())[:120]}): name a tokenizer.json"
        ) from None


def bpe_eot_id(directory: str | os.PathLike) -> int:
    """The <|endoftext|> id of the BPE tokenizer in a prepared cache `directory`."""
    return tokenizers.Tokenizer.from_file(str(pathlib.Path(directory) / "tokenizer.json")).token_to_id(EOT)


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool, length: int) -> tokenizers.Tokenizer:
    """A byte-level BPE with <|endoftext|> as its one special token, trained on `texts`
    (`length` of them, for the progress bar)."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    bpe.train_from_iterator(texts, trainer, length=length)
    return bpe


def encode_bpe(bpe: tokenizers.Tokenizer, eot: int | None, texts: list[str]) -> list[np.ndarray]:
    # Each document ends with <|endoftext|> (or the given eot) so windows can tell where documents
    # meet; a tokenizer without one lets them abut.
    return [np.array(e.ids + ([] if eot is None else [eot])) for e in bpe.encode_batch_fast(texts)]


def encode_bytes(texts: list[str]) -> list[np.ndarray]:
    # 256 ids are all bytes: there is no spare id for a separator, so documents just abut.
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
