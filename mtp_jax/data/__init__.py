"""Corpus -> token files -> batches.

sources.py   what a data.source names (stdlib, files, JSONL, token files, tasks) and its settings
tokenizer.py byte and BPE tokenizers, and loading the one a cache was made with
cache.py     tokenize once into a cache directory, publish it atomically, memory-map it
build.py     the files of a cache directory, written from each kind of source
shards.py    token shards in the llm.c format: headers, checks, lazily mapped reading
batches.py   the pure (seed, step, process) sampler: training batches and validation windows
tasks.py     synthetic tasks (task:polyarith, task:pathstar): problems, answers, loss masks
"""

from mtp_jax.data.batches import (
    check_fits,
    eval_windows,
    global_batch_starts,
    lengths,
    local_batch,
    num_windows,
    steps_per_epoch,
)
from mtp_jax.data.cache import TokenData, document_eot_id, prepare
from mtp_jax.data.shards import ShardedTokens
from mtp_jax.data.sources import read_text, resolve_source, split_documents
from mtp_jax.data.tokenizer import EOT, BpeTokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "EOT",
    "BpeTokenizer",
    "ByteTokenizer",
    "ShardedTokens",
    "TokenData",
    "Tokenizer",
    "check_fits",
    "document_eot_id",
    "eval_windows",
    "global_batch_starts",
    "lengths",
    "load_tokenizer",
    "local_batch",
    "num_windows",
    "prepare",
    "read_text",
    "resolve_source",
    "split_documents",
    "steps_per_epoch",
]
