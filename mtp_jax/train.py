"""Training: data → mesh → model and optimizer → shardings → jitted steps → restore → loop.

`run(config, workdir)` reads top to bottom in that order. The train state is a plain pytree
{'params', 'opt_state', 'step', 'nonfinite_steps', 'first_nonfinite_step'}; everything that
varies over a run (learning rate, batch, the decision to skip a bad update) is a function of the
step, so a resumed run reproduces an uninterrupted one exactly.
The compiled step is train_step.py's; what the run prints, train_report.py's.
"""

from __future__ import annotations

import functools
import json
import pathlib
import signal
import sys
import threading

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from mtp_jax import data as data_lib
from mtp_jax import hf, mtp, sharding, trunk_cache
from mtp_jax.checkpoint import Checkpointer, check_writable, has_checkpoints
from mtp_jax.config import validate
from mtp_jax.data import tasks
from mtp_jax.errors import UserError
from mtp_jax.evaluate import Evaluator
from mtp_jax.metrics import MetricWriter, log
from mtp_jax.mtp import n_predict
from mtp_jax.train_report import (
    StepTimer,
    log_eval,
    log_setup,
    print_sample,
    print_summary,
    report_progress,
    train_scalars,
)
from mtp_jax.train_step import TrainSetup, make_train_step
from mtp_jax.workdir import save_run_files

# Config fields that fix the shape of the parameters (or of the optimizer state, 'trainable'): a
# checkpoint only restores if they match.
MODEL_SIGNATURE = (
    "use_mtp",
    "mtp_n_tokens",
    "mtp_head_type",
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.mlp_dim",
    "model.tie_embeddings",
    "model.param_dtype",
    "model.n_kv_heads",
    "trainable",
    "mtp_draft_vocab",
    "model.scan_layers",
)  # stacked and per-layer parameters are different trees


def itstime(step: int, every: int, total: int) -> bool:
    """Whether to log/evaluate/save after `step` steps: every `every` steps and after the last."""
    return step % every == 0 or step == total


def total_steps(config, data) -> int:
    if config.num_epochs > 0:
        per_epoch = data_lib.steps_per_epoch(
            data_lib.lengths(data.train),
            window_len=config.seq_len + n_predict(config),
            batch_size=config.batch_size,
            align=data.example_len,
        )
        return config.num_epochs * per_epoch
    return config.num_train_steps


def check_workdir(workdir: pathlib.Path, config, vocab_size: int, has_checkpoints: bool) -> None:
    """Refuse to resume checkpoints of a differently shaped model (before anything is written)."""
    saved_path = workdir / "config.json"
    if not (has_checkpoints and saved_path.exists()):
        return
    saved = json.loads(saved_path.read_text())
    ours = json.loads(config.to_json_best_effort())

    def get(c, key):
        return functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, key.split("."), c)

    diffs = [
        f"{key} {get(saved, key)!r} -> {get(ours, key)!r}"
        for key in MODEL_SIGNATURE
        if get(saved, key) != get(ours, key)
    ]
    if saved.get("vocab_size") not in (None, vocab_size):
        diffs.append(f"vocab_size {saved['vocab_size']} -> {vocab_size}")
    if diffs:
        raise UserError(
            f"workdir {workdir} holds checkpoints of a different model ({'; '.join(diffs)}): "
            "use a new --workdir, or the settings it was trained with"
        )


def fetch(tree) -> dict:
    """Device scalars → Python floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def run(config, workdir, devices=None) -> dict:
    """Train (or resume) to the end on `devices` (default: all); returns the final metrics."""
    workdir, is_main = pathlib.Path(workdir), jax.process_index() == 0
    if config.init_from:
        config = hf.configure(config)  # the model's shape is the folder's
    validate(config)
    check_writable(workdir)  # before the data and the compile, not at the first save

    # ----------------------------------------------------------------------------- Data
    data = data_lib.prepare(config.data, show_progress=is_main and sys.stderr.isatty())
    window_len = config.seq_len + n_predict(config)
    data_lib.check_fits(data, window_len)
    eot_id = data_lib.document_eot_id(config.data, data)  # data.document_mask's; None when off
    # Read and checked before anything is written; used only if there is no checkpoint to resume.
    imported = hf.read_for_training(config, data) if config.init_from else None
    steps = total_steps(config, data)

    # ----------------------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(config.batch_size, mesh)

    # ----------------------------------------------------------------------------- Model, optimizer, step
    # A task's batch is (window, loss mask, model inputs), all at the same aligned starts.
    setup = make_train_step(
        config, data.vocab_size, mesh, steps, batch_arrays=1 if data.train_mask is None else 3, eot_id=eot_id
    )

    # ----------------------------------------------------------------------------- Restore or init
    check_workdir(workdir, config, data.vocab_size, has_checkpoints(workdir / "checkpoints"))
    checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
    start, state = checkpointer.restore_newest_good(setup.abstract_state)
    if start is None:
        start, state = 0, init_state(setup, imported, config.init_from, data)
    else:
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    del imported  # the host copy of an init_from model
    if is_main:
        save_run_files(workdir, config, data)
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
    if start == 0:
        # The training set's size turns steps into epochs (where a data-constrained run overfits);
        # an epochs run's steps per epoch give its length (num_epochs x them) to readers without the
        # data: experiments/sweep.py and report.py tell a finished run by it.
        first = {"model/param_count": setup.n_params, "data/train_tokens": len(data.train)}
        if config.num_epochs > 0:
            first["data/steps_per_epoch"] = steps // config.num_epochs
        writer.write(0, first)
    if is_main:
        log_setup(config, setup, mesh, steps)

    # ----------------------------------------------------------------------------- Evaluation
    evaluator = Evaluator(config, data, setup.graphdef, mesh, param_shardings=setup.param_shardings, steps=steps)

    # ----------------------------------------------------------------------------- Loop
    state, done, final_eval, last_scalars, stopped = train_loop(
        config, data, mesh, setup, state, start, steps, checkpointer, writer, evaluator, is_main
    )
    checkpointer.wait()
    checkpointer.close()
    if stopped is not None:
        writer.close()
        log(
            f"stopped by {stopped.signal} after step {done}: checkpoint saved in {workdir / 'checkpoints'}; "
            "rerun the same command to continue"
        )
        return last_scalars
    if not final_eval:  # resumed a run that had already finished: evaluate the restored state
        final_eval = evaluator(state["params"], steps)
        writer.write(steps, final_eval)
    writer.close()
    if is_main:
        print_summary(config, workdir, final_eval, last_scalars)
        if config.sample_tokens > 0 and data.meta.get("tokenizer") in ("byte", "bpe"):
            print_sample(config, data.directory, nnx.merge(setup.graphdef, jax.device_get(state["params"])))
    return {**final_eval, **last_scalars}


def train_loop(
    config,
    data: data_lib.TokenData,
    mesh,
    setup: TrainSetup,
    state: dict,
    start: int,
    steps: int,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    evaluator: Evaluator,
    is_main: bool,
) -> tuple[dict, int, dict, dict, StopRequest | None]:
    """Steps `start` … `steps` - 1, logging, evaluating and saving as the config says, until the end
    or a stop signal; returns (state, steps done, the last evaluation, the last train scalars, the
    StopRequest that stopped the run or None)."""
    bar = tqdm(
        total=steps, initial=start, disable=not (is_main and sys.stderr.isatty()), unit="step", dynamic_ncols=True
    )
    timer, stop = StepTimer(start, config.batch_size * config.seq_len), StopRequest()
    final_eval, last_scalars, stopping, done = {}, {}, False, start
    cache = trunk_cache.TrunkCache(config, data, setup.graphdef, mesh) if config.trunk_cache else None
    for step in range(start, steps):
        batch = train_batch(config, data, mesh, step)
        if cache is not None:
            batch += (cache.batch(state["params"], step, batch[0]),)
        state, metrics = setup.step_fn(state, *batch)
        done = step + 1
        bar.update(1)
        if itstime(done, config.log_every, steps):
            last_scalars = train_scalars(config, fetch(metrics), timer, step, steps)  # waits for the step
            check_finite(state, config.nan_policy, checkpointer, last_scalars)
            writer.write(done, last_scalars)
            report_progress(bar, is_main, done, steps, last_scalars)
        if itstime(done, config.eval_every, steps):
            final_eval = evaluator(state["params"], done)
            writer.write(done, final_eval)
            if is_main:
                log_eval(done, final_eval)
        stopping = stop.agreed(done, config.log_every)  # once per step: a signal may land any time
        if itstime(done, config.checkpoint_every, steps) or stopping:
            check_finite(state, config.nan_policy, checkpointer)
            checkpointer.save(done, state)
        if stopping:
            break
    stop.release()
    bar.close()
    return state, done, final_eval, last_scalars, stop if stopping else None


def init_state(setup: TrainSetup, imported: dict | None, init_from: str, data: data_lib.TokenData) -> dict:
    """A fresh train state on the mesh, with an init_from model's arrays in place of its own; a
    draft vocabulary that init_from does not hold is the training split's most frequent tokens."""
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    if "draft_vocab" in state["params"] and "draft_vocab" not in (imported or {}):
        size = state["params"]["draft_vocab"].shape[0]
        imported = {**(imported or {}), "draft_vocab": mtp.draft_vocabulary(data.train, data.vocab_size, size)}
    if imported is not None:
        state["params"] = hf.with_imported(state["params"], imported)
        if init_from:
            log(f"initialised {'the trunk and the heads' if 'heads' in imported else 'the trunk'} from {init_from}")
    return state


def train_batch(config, data: data_lib.TokenData, mesh, step: int) -> tuple[jax.Array, ...]:
    """The global batch of `step`, built from this process's rows: (window,) for text, (window,
    loss mask, model inputs) for a task; each [B, T + n]."""
    rows_of = functools.partial(
        data_lib.local_batch,
        window_len=config.seq_len + n_predict(config),
        batch_size=config.batch_size,
        seed=config.seed,
        step=step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_epochs=config.num_epochs,
        align=data.example_len,
    )
    mask = None if data.train_mask is None else rows_of(data.train_mask)
    return tuple(
        sharding.global_batch(a, mesh)
        for a in tasks.batch_rows(rows_of(data.train), mask, config.data.task.teacherless)
    )


class StopRequest:
    """SIGTERM (preemption) or SIGINT (Ctrl-C) asks the loop to stop after the current step, with a
    checkpoint. A second signal gets the previous handler, so a stuck run can still be killed.

    With several processes, all must stop after the same step or the collective save deadlocks:
    they agree with one all-gather every `log_every` steps (where the host already waits for the
    step to log it); a single process stops after the very next step."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may install handlers; such a caller stops the run itself
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT in a background job: keep ignoring
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])

    def agreed(self, done: int, every: int) -> bool:
        """Whether to stop after step `done`: the same answer on every process."""
        if jax.process_count() == 1:
            return self.signal is not None
        if done % every:
            return False
        return bool(multihost_utils.process_allgather(np.array(self.signal is not None)).any())

    def release(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def check_finite(state, nan_policy: str, checkpointer: Checkpointer, scalars: dict | None = None) -> None:
    """Report skipped non-finite steps; under nan_policy='stop' end the run naming the first one."""
    skipped, first = (int(x) for x in jax.device_get((state["nonfinite_steps"], state["first_nonfinite_step"])))
    if scalars is not None:
        scalars["train/nonfinite_steps"] = skipped
    if skipped and nan_policy == "stop":
        checkpointer.wait()
        good = checkpointer.latest_step()
        raise UserError(
            f"the loss or gradients became non-finite at step {first}; the last good checkpoint is "
            f"{'step ' + str(good) if good is not None else 'none'}: lower learning_rate, or set "
            "nan_policy='skip' to skip such updates"
        )
