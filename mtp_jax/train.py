"""Training: data → mesh → model and optimizer → shardings → jitted steps → restore → loop.

`run(config, workdir)` reads top to bottom in that order. The train state is a plain pytree
{'params', 'opt_state', 'step', 'nonfinite_steps', 'first_nonfinite_step'}; everything that
varies over a run (learning rate, batch, the decision to skip a bad update) is a function of the
step, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from mtp_jax import data as data_lib
from mtp_jax import hf, mtp, sharding, trunk_cache
from mtp_jax.checkpoint import Checkpointer, abstract_like, check_writable
from mtp_jax.config import validate
from mtp_jax.data import tasks
from mtp_jax.decoding import sample
from mtp_jax.errors import UserError
from mtp_jax.evaluate import Evaluator
from mtp_jax.metrics import MetricWriter, log
from mtp_jax.mtp import TrunkOutputs, build_model, mtp_loss, n_predict
from mtp_jax.schedules import head_weights, mtp_weight
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


def make_optimizer(config, steps: int):
    """AdamW with linear warm-up then cosine decay to 10 % of the peak, and global-norm clipping.

    No weight decay on vectors (norm scales) or on the embedding table."""
    warmup = min(config.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(steps, warmup + 1), end_value=0.1 * config.learning_rate
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim >= 2 and "embedding" not in jax.tree_util.keystr(path), params
        )

    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay, mask=decay_mask),
    )
    return schedule, tx


def trainable_part(params: dict, trainable: str) -> dict:
    """The part of the parameters the optimizer updates (and holds state for): all of them, or
    under trainable='heads' only `heads` (heads 2 … n; for 'parallel' heads head 1's block is the
    decoder's last layer, so it stays frozen with the rest of the decoder). A draft vocabulary's
    token ids are never trained."""
    return (
        {"heads": params["heads"]} if trainable == "heads" else {k: v for k, v in params.items() if k != "draft_vocab"}
    )


def train_step(
    graphdef,
    tx,
    schedule,
    weights_at,
    chunk_size,
    compute_shardings,
    trainable,
    eot_id,
    targets,
    state,
    window,
    mask=None,
    inputs=None,
    trunk=None,
):
    """One optimizer step. A non-finite loss or gradient leaves the parameters untouched and is
    counted, so no NaN ever reaches the parameters (or a checkpoint); nan_policy decides on the
    host whether the run stops. weights_at(step) gives each head's loss weight [n] (schedules.py).
    A task's batch adds its loss mask and model inputs (mtp_loss); trunk_cache, the trunk's outputs.

    Only the trainable parameters are differentiated: the frozen ones enter as constants, so
    no gradient (and, when nothing trainable precedes them, no backward pass) is computed for
    them and they come out bit-identical."""
    step = state["step"]
    weights = weights_at(step)

    def loss_fn(trained):
        params = jax.lax.with_sharding_constraint({**state["params"], **trained}, compute_shardings)
        return mtp_loss(nnx.merge(graphdef, params), window, weights, chunk_size, mask, inputs, eot_id, targets, trunk)

    trained = trainable_part(state["params"], trainable)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], trained)
    params = {**state["params"], **optax.apply_updates(trained, updates)}
    finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)
    keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = {
        "params": keep_old(params, state["params"]),
        "opt_state": keep_old(opt_state, state["opt_state"]),
        "step": step + 1,
        "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (state["first_nonfinite_step"] < 0) & ~finite, step + 1, state["first_nonfinite_step"]
        ),
    }
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(step)}
    if len(weights) > 1:
        metrics.update({f"head_weight_{k}": weights[k - 1] for k in range(2, len(weights) + 1)})
    return new_state, metrics


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a run (or the benchmark) needs to initialise a state and take compiled steps."""

    graphdef: nnx.GraphDef
    init_state: Callable[[], dict]  # () -> a fresh train state; jit it with out_shardings=state_shardings
    abstract_state: dict  # ShapeDtypeStructs with shardings
    state_shardings: dict
    param_shardings: dict
    n_params: int
    # (state, window [B, T + n] int32 [, a task's mask and inputs, same shape] [, TrunkOutputs])
    # -> (state, metrics); donates state
    step_fn: jax.stages.Compiled


def make_train_step(
    config, vocab_size: int, mesh, steps: int, batch_arrays: int = 1, eot_id: int | None = None
) -> TrainSetup:
    """Model, optimizer and shardings for `config`, and the train step compiled once for `mesh`.

    batch_arrays: 1 (window) for text, 3 (window, mask, inputs; all [B, T + n]) for a task.
    eot_id: data.document_mask's end-of-text id (data.document_eot_id), None when off.
    With config.trunk_cache the step also takes the frozen trunk's TrunkOutputs."""

    def make_model():
        return build_model(config, vocab_size, seed=config.seed, platform=mesh.devices.flat[0].platform)

    graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    axes = sharding.logical_axes(abstract_params)
    schedule, tx = make_optimizer(config, steps)

    def init_state():
        params = nnx.to_pure_dict(nnx.split(make_model(), nnx.Param)[1])
        return {
            "params": params,
            "opt_state": tx.init(trainable_part(params, config.trainable)),
            "step": jnp.zeros((), jnp.int32),
            "nonfinite_steps": jnp.zeros((), jnp.int32),
            "first_nonfinite_step": -jnp.ones((), jnp.int32),
        }

    abstract_state = jax.eval_shape(init_state)
    param_shardings = sharding.param_shardings(abstract_state["params"], axes, mesh)
    state_shardings = sharding.state_shardings(abstract_state, param_shardings, mesh)
    abstract_state = abstract_like(abstract_state, state_shardings)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))

    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = jax.ShapeDtypeStruct(
        (config.batch_size, config.seq_len + n_predict(config)), jnp.int32, sharding=batch_sharding
    )
    step = functools.partial(
        train_step,
        graphdef,
        tx,
        schedule,
        functools.partial(head_weights, config, steps=steps),
        config.loss_chunk_size,
        sharding.compute_shardings(param_shardings),
        config.trainable,
        eot_id,
        config.mtp_targets,
    )
    batch, batch_shardings = (abstract_batch,) * batch_arrays, (batch_sharding,) * batch_arrays
    if config.trunk_cache:  # the step takes (state, window, the frozen trunk's outputs)
        batch += (trunk_cache.abstract_outputs(config, batch_sharding),)
        batch_shardings += (TrunkOutputs(*(batch_sharding,) * 3),)
        step = functools.partial(trunk_cache.with_outputs, step)
    step_fn = (
        jax.jit(
            step,
            in_shardings=(state_shardings, *batch_shardings),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )
        .lower(abstract_state, *batch)
        .compile()
    )
    return TrainSetup(graphdef, init_state, abstract_state, state_shardings, param_shardings, n_params, step_fn)


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


def memory_per_device(memory) -> int:
    """Bytes a compiled step needs on each device (its memory analysis describes one shard of the
    SPMD program); the donated state's buffers are reused for the new state, so counted once."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
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
    checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
    check_workdir(workdir, config, data.vocab_size, checkpointer.latest_step() is not None)
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
        # The training set's size turns steps into epochs (where a data-constrained run overfits).
        writer.write(0, {"model/param_count": setup.n_params, "data/train_tokens": len(data.train)})
    if is_main:
        log_setup(config, setup, mesh, steps)

    # ----------------------------------------------------------------------------- Evaluation
    evaluator = Evaluator(config, data, setup.graphdef, mesh, param_shardings=setup.param_shardings, steps=steps)

    # ----------------------------------------------------------------------------- Loop
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
                log(
                    f"eval at step {done}: "
                    + "  ".join(
                        f"{k.split('/')[1]} {v:.4f}" for k, v in final_eval.items() if "loss" in k or "bits" in k
                    )
                )
        stopping = stop.agreed(done, config.log_every)  # once per step: a signal may land any time
        if itstime(done, config.checkpoint_every, steps) or stopping:
            check_finite(state, config.nan_policy, checkpointer)
            checkpointer.save(done, state)
        if stopping:
            break
    stop.release()
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    if stopping:
        writer.close()
        log(
            f"stopped by {stop.signal} after step {done}: checkpoint saved in {workdir / 'checkpoints'}; "
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


class StepTimer:
    """Seconds per step since the previous reading (the host has waited for the step)."""

    def __init__(self, step: int, tokens_per_step: int):
        self.time, self.step, self.tokens_per_step = time.perf_counter(), step, tokens_per_step

    def read(self, done: int) -> float:
        now = time.perf_counter()
        seconds, self.time, self.step = (now - self.time) / (done - self.step), now, done
        return seconds


def train_scalars(config, metrics: dict, timer: StepTimer, step: int, steps: int) -> dict:
    """The train/… scalars logged after `step` from the step's metrics."""
    step_time = timer.read(step + 1)
    scalars = {f"train/{k}": v for k, v in metrics.items()}
    if n_predict(config) > 1:
        scalars["train/mtp_weight"] = float(mtp_weight(config, step, steps))
    scalars.update(
        {
            "train/step_time_s": step_time,
            "train/tokens_per_sec": timer.tokens_per_step / step_time,
            "train/tokens_seen": (step + 1) * timer.tokens_per_step,
        }
    )
    return scalars


def report_progress(bar: tqdm, is_main: bool, done: int, steps: int, scalars: dict) -> None:
    bar.set_postfix(loss_1=f"{scalars['train/loss_1']:.3f}", tok_s=f"{scalars['train/tokens_per_sec']:.0f}")
    if bar.disable and is_main:
        log(
            f"step {done}/{steps}  loss_1 {scalars['train/loss_1']:.4f}  total {scalars['train/total_loss']:.4f}"
            f"  {scalars['train/tokens_per_sec']:.0f} tok/s"
        )


def log_setup(config, setup: TrainSetup, mesh, steps: int) -> None:
    mesh_desc = ", ".join(f"{a}={s}" for a, s in mesh.shape.items())
    log(
        f"{setup.n_params / 1e6:.2f}M parameters, {n_predict(config)} head(s) ({config.mtp_head_type}), mesh "
        f"{mesh_desc}, {steps} steps of {config.batch_size}x{config.seq_len} tokens"
    )
    memory = setup.step_fn.memory_analysis()
    if memory is not None:
        log(
            f"compiled train step needs {memory_per_device(memory) / 2**20:.1f} MiB per device: state and batch "
            f"{memory.argument_size_in_bytes / 2**20:.1f} MiB, temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB"
        )


def print_summary(config, workdir: pathlib.Path, final_eval: dict, train_scalars: dict) -> None:
    n = n_predict(config)
    lines = [f"{'head':>6} {'predicts':>9} {'eval loss':>10} {'accuracy':>9}"]
    lines += [
        f"{k:>6} {'t+' + str(k):>9} {final_eval[f'eval/loss_{k}']:>10.4f} {final_eval[f'eval/accuracy_{k}']:>9.3f}"
        for k in range(1, n + 1)
    ]
    if "eval/bits_per_byte" in final_eval:
        lines.append(f"head-1 bits per byte: {final_eval['eval/bits_per_byte']:.4f}")
    if n > 1:
        lines.append(
            "draft acceptance (teacher-forced): "
            + "  ".join(f"head {k} {final_eval[f'generate/acceptance_{k}']:.3f}" for k in range(2, n + 1))
            + f"; {final_eval['generate/mean_accepted']:.2f} tokens per verify pass"
        )
    if "train/tokens_per_sec" in train_scalars:
        lines.append(f"training throughput: {train_scalars['train/tokens_per_sec']:.0f} tokens/s")
    lines.append(f"outputs: {workdir / 'metrics.jsonl'}, {workdir / 'tensorboard'}, {workdir / 'checkpoints'}")
    print("\n".join(["", "== summary " + "=" * 40, *lines]), flush=True)


def print_sample(config, data_dir: pathlib.Path, model) -> None:
    tokenizer = data_lib.load_tokenizer(data_dir)
    prompt = tokenizer.encode(config.sample_prompt)
    ids = sample(model, prompt, max_new_tokens=config.sample_tokens, temperature=0.8, seed=0)
    print("== sample (temperature 0.8) " + "=" * 23 + f"\n{config.sample_prompt}{tokenizer.decode(ids)}", flush=True)


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
