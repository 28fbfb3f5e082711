"""What a training workdir holds, and loading a trained model from it.

    workdir/config.json          the resolved config, plus the data's vocab_size
    workdir/data/meta.json       the data's metadata: tokenizer, vocabulary, token counts, source
    workdir/data/tokenizer.json  a BPE tokenizer (a byte-level model needs none)
    workdir/data/val_windows.npy the validation windows a --tree_size tree is fitted on (models with heads)
    workdir/checkpoints/<step>   orbax checkpoints of the train state
    workdir/metrics.jsonl, workdir/tensorboard/

The trainer writes config.json and data/ before the first step, so `generate`, `evaluate` and
`export` read a model's tokenizer (and `generate --tree_size` its validation windows) from its
workdir, not from the corpus or its data cache. Workdirs written before val_windows.npy existed
fit trees on the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys

import ml_collections
import numpy as np
from flax import nnx

from mtp_jax import data as data_lib
from mtp_jax.acceptance import tree_windows
from mtp_jax.checkpoint import Checkpointer
from mtp_jax.errors import UserError
from mtp_jax.metrics import log
from mtp_jax.mtp import MTPModel, build_model, n_predict

DATA = "data"  # the workdir's copy of the data's metadata and tokenizer
TOKENIZER_FILES = ("meta.json", "tokenizer.json")
VAL_WINDOWS = "val_windows.npy"  # in data/: acceptance.tree_windows, in the smallest dtype that holds the ids


def save_run_files(workdir: pathlib.Path, config, data: data_lib.TokenData) -> None:
    """config.json and data/ (process 0's job): what loading the workdir needs besides checkpoints."""
    workdir.mkdir(parents=True, exist_ok=True)
    saved = json.loads(config.to_json_best_effort())
    (workdir / "config.json").write_text(json.dumps({**saved, "vocab_size": data.vocab_size}, indent=2))
    (workdir / DATA).mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (data.directory / name).is_file():
            shutil.copyfile(data.directory / name, workdir / DATA / name)
    if n_predict(config) > 1:  # a tree needs draft heads
        windows = tree_windows(config, data.val).astype(np.min_scalar_type(data.vocab_size - 1))
        partial = workdir / DATA / f".{VAL_WINDOWS}.partial"
        with open(partial, "wb") as f:  # renamed when complete: a kill mid-write leaves the old file
            np.save(f, windows)
        partial.replace(workdir / DATA / VAL_WINDOWS)


@dataclasses.dataclass(frozen=True)
class Trained:
    """A workdir's newest checkpoint, restored onto one device."""

    model: MTPModel
    config: ml_collections.ConfigDict
    step: int
    data_dir: pathlib.Path  # holds meta.json (and tokenizer.json): the workdir's data/, or the data cache

    @property
    def meta(self) -> dict:
        return json.loads((self.data_dir / "meta.json").read_text())

    def tokenizer(self) -> data_lib.Tokenizer:
        return data_lib.load_tokenizer(self.data_dir)

    def data(self) -> data_lib.TokenData:
        """The prepared corpus (its validation split feeds benchmarks): this one needs the corpus,
        or its data cache."""
        return data_lib.prepare(self.config.data, show_progress=sys.stderr.isatty())

    def tree_windows(self) -> np.ndarray:
        """The validation windows a tree (generate --tree_size) is fitted on: the workdir's own,
        else, for a workdir written before training kept them, the corpus's."""
        kept = self.data_dir / VAL_WINDOWS
        if kept.is_file():
            return read_windows(kept, self.config.seq_len + n_predict(self.config))
        try:
            return tree_windows(self.config, self.data().val)
        except UserError as e:
            raise UserError(
                f"a tree is fitted on validation windows, which this workdir does not keep (it has no "
                f"{DATA}/{VAL_WINDOWS}: training writes it) and its corpus cannot be read ({e}): "
                "drop --tree_size (a chain of drafts needs no windows), or make the corpus (or its "
                "data cache) readable again"
            ) from None


def read_windows(path: pathlib.Path, window_len: int) -> np.ndarray:
    """A kept VAL_WINDOWS file, int32, checked: [batches, batch, window_len] token ids."""
    try:
        windows = np.load(path, allow_pickle=False)
        ok = windows.ndim == 3 and windows.shape[2] == window_len and windows.dtype.kind == "u"
    except (OSError, ValueError, EOFError):
        ok = False
    if not ok:
        raise UserError(
            f"{path} is damaged (not [batches, batch, {window_len}] token ids): delete it, and the tree "
            "is fitted on the corpus's validation split again"
        )
    return windows.astype(np.int32)


def load(workdir: str | pathlib.Path) -> Trained:
    """The newest checkpoint in workdir that restores and matches its fingerprint, with its config
    and tokenizer. Damaged ones are reported, skipped and left in place; Trained.step says which
    step was loaded (the commands print it)."""
    workdir = pathlib.Path(workdir)
    checkpoints, config_path = workdir / "checkpoints", workdir / "config.json"
    checkpointer = Checkpointer(checkpoints, keep=None, read_only=True) if checkpoints.is_dir() else None
    newest = checkpointer.latest_step() if checkpointer else None
    if newest is None or not config_path.is_file():
        raise UserError(
            f"no checkpoint in {workdir}: train one first with "
            f"python -m mtp_jax.main --config=configs/mtp4.py --workdir={workdir}"
        )
    try:
        saved = json.loads(config_path.read_text())
        config = ml_collections.ConfigDict(saved)
        vocab_size = int(saved["vocab_size"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(
            f"{config_path} is not the config training writes ({type(e).__name__}: {e}): "
            "restore it from a copy, or train again"
        ) from None
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(config, vocab_size, seed=0)))
    try:  # the parameters and step counter as saved, onto one device, checked against their fingerprint
        step, state = checkpointer.restore_newest_good()
    finally:
        checkpointer.close()
    if step != newest:  # after the lines that say why each newer one was skipped
        log(f"using step {step} of {checkpoints}, the newest checkpoint that loads")
    data_dir = workdir / DATA
    if not (data_dir / "meta.json").is_file():
        raise UserError(
            f"{data_dir / 'meta.json'} is missing (training writes it with the tokenizer before the "
            "first step): restore the workdir's data/ folder from a copy"
        )
    # Orbax restores a list's indices as strings: as such, layer 10 would sort before layer 2.
    return Trained(nnx.merge(graphdef, nnx.restore_int_paths(state["params"])), config, step, data_dir)
