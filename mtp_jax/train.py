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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from mtp_jax import data as data_lib
from mtp_jax import evaluate as evaluate_lib
from mtp_jax import hf, sharding, tasks
from mtp_jax.checkpoint import Checkpointer, abstract_like, check_writable
from mtp_jax.config import validate
from mtp_jax.errors import UserError
from mtp_jax.metrics import MetricWriter, log
from mtp_jax.mtp import build_model, mtp_loss, n_tokens
from mtp_jax.schedules import head_weights, mtp_weight

# Config fields that fix the shape of the parameters (or of the optimizer state, 'train'): a
# checkpoint only restores if they match.
MODEL_SIGNATURE = ("use_mtp", "mtp_n_tokens", "mtp_head_type", "model.d_model", "model.n_layers",
                   "model.n_heads", "model.mlp_dim", "model.tie_embeddings", "model.param_dtype",
                   "model.n_kv_heads", "train",
                   "model.scan_layers")  # stacked and per-layer parameters are different trees
# What a signature field meant in a workdir saved before the field existed.
SIGNATURE_DEFAULTS = {"model.n_kv_heads": 0, "train": "all", "model.scan_layers": False}


def itstime(step: int, every: int, total: int) -> bool:
    """Whether to log/evaluate/save after `step` steps: every `every` steps and after the last."""
    return step % every == 0 or step == total


def total_steps(config, data) -> int:
    if config.num_epochs > 0:
        per_epoch = data_lib.steps_per_epoch(len(data.train), window_len=config.seq_len + n_tokens(config),
                                             batch_size=config.batch_size, align=data.example_len)
        return config.num_epochs * per_epoch
    return config.num_train_steps


def make_optimizer(config, steps: int):
    """AdamW with linear warm-up then cosine decay to 10 % of the peak, and global-norm clipping.

    No weight decay on vectors (norm scales) or on the embedding table."""
    warmup = min(config.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(steps, warmup + 1),
                                                  end_value=0.1 * config.learning_rate)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim >= 2 and "embedding" not in jax.tree_util.keystr(path), params)

    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay,
                    mask=decay_mask),
    )
    return schedule, tx


def trainable(params: dict, train: str) -> dict:
    """The part of the parameters the optimizer updates (and holds state for): all of them, or
    under train='heads' only `heads` (heads 2 … n; for 'parallel' heads head 1's block is the
    decoder's last layer, so it stays frozen with the rest of the decoder)."""
    return {"heads": params["heads"]} if train == "heads" else params


def train_step(graphdef, tx, schedule, weights_at, chunk_size, compute_shardings, train, state, window, mask=None,
               inputs=None):
    """One optimizer step. A non-finite loss or gradient leaves the parameters untouched and is
    counted, so no NaN ever reaches the parameters (or a checkpoint); nan_policy decides on the
    host whether the run stops. weights_at(step) gives each head's loss weight [n] (schedules.py).
    A task's batch adds its loss mask and model inputs (mtp_loss).

    Only the trainable parameters are differentiated: the frozen ones enter as constants, so
    no gradient (and, when nothing trainable precedes them, no backward pass) is computed for
    them and they come out bit-identical."""
    step = state["step"]
    weights = weights_at(step)

    def loss_fn(trained):
        params = jax.lax.with_sharding_constraint({**state["params"], **trained}, compute_shardings)
        return mtp_loss(nnx.merge(graphdef, params), window, weights, chunk_size, mask, inputs)

    trained = trainable(state["params"], train)
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
        "first_nonfinite_step": jnp.where((state["first_nonfinite_step"] < 0) & ~finite, step + 1,
                                          state["first_nonfinite_step"]),
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
    abstract_state: dict            # ShapeDtypeStructs with shardings
    state_shardings: dict
    param_shardings: dict
    n_params: int
    # (state, window [B, T + n] int32 [, a task's mask and inputs, same shape]) -> (state, metrics); donates state
    step_fn: jax.stages.Compiled


def make_train_step(config, vocab_size: int, mesh, steps: int, batch_arrays: int = 1) -> TrainSetup:
    """Model, optimizer and shardings for `config`, and the train step compiled once for `mesh`.

    batch_arrays: 1 (window) for text, 3 (window, mask, inputs; all [B, T + n]) for a task."""
    def make_model():
        return build_model(config, vocab_size, seed=config.seed)

    graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    axes = sharding.logical_axes(abstract_params)
    schedule, tx = make_optimizer(config, steps)

    def init_state():
        params = nnx.to_pure_dict(nnx.split(make_model(), nnx.Param)[1])
        return {"params": params, "opt_state": tx.init(trainable(params, config.train)),
                "step": jnp.zeros((), jnp.int32), "nonfinite_steps": jnp.zeros((), jnp.int32),
                "first_nonfinite_step": -jnp.ones((), jnp.int32)}

    abstract_state = jax.eval_shape(init_state)
    param_shardings = sharding.param_shardings(abstract_state["params"], axes, mesh)
    state_shardings = sharding.state_shardings(abstract_state, param_shardings, mesh)
    abstract_state = abstract_like(abstract_state, state_shardings)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state["params"]))

    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + n_tokens(config)), jnp.int32,
                                          sharding=batch_sharding)
    step_fn = jax.jit(
        functools.partial(train_step, graphdef, tx, schedule, functools.partial(head_weights, config, steps=steps),
                          config.loss_chunk_size, sharding.compute_shardings(param_shardings), config.train),
        in_shardings=(state_shardings,) + (batch_sharding,) * batch_arrays, out_shardings=(state_shardings, None),
        donate_argnums=0,
    ).lower(abstract_state, *(abstract_batch,) * batch_arrays).compile()
    return TrainSetup(graphdef, init_state, abstract_state, state_shardings, param_shardings, n_params, step_fn)


def eval_step(graphdef, chunk_size, compute_shardings, params, weights, window, mask=None, inputs=None):
    params = jax.lax.with_sharding_constraint(params, compute_shardings)  # see sharding.compute_shardings
    return mtp_loss(nnx.merge(graphdef, params), window, weights, chunk_size, mask, inputs)[1]


def check_workdir(workdir: pathlib.Path, config, vocab_size: int, has_checkpoints: bool) -> None:
    """Refuse to resume checkpoints of a differently shaped model (before anything is written)."""
    saved_path = workdir / "config.json"
    if not (has_checkpoints and saved_path.exists()):
        return
    saved = json.loads(saved_path.read_text())
    ours = json.loads(config.to_json_best_effort())
    def get(c, key):
        value = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, key.split("."), c)
        return SIGNATURE_DEFAULTS.get(key) if value is None else value

    diffs = [f"{key} {get(saved, key)!r} -> {get(ours, key)!r}" for key in MODEL_SIGNATURE
             if get(saved, key) != get(ours, key)]
    if saved.get("vocab_size") not in (None, vocab_size):
        diffs.append(f"vocab_size {saved['vocab_size']} -> {vocab_size}")
    if diffs:
        raise UserError(f"workdir {workdir} holds checkpoints of a different model ({'; '.join(diffs)}): "
                        "use a new --workdir, or the settings it was trained with")


def memory_per_device(memory) -> int:
    """Bytes a compiled step needs on each device (its memory analysis describes one shard of the
    SPMD program); the donated state's buffers are reused for the new state, so counted once."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


def fetch(tree) -> dict:
    """Device scalars → Python floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def run(config, workdir, devices=None) -> dict:
    """Train (or resume) to the end on `devices` (default: all); returns the final metrics."""
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if config.init_from:
        config = hf.configure(config)  # the model's shape is the folder's
    validate(config)
    n = n_tokens(config)
    window = config.seq_len + n

    check_writable(workdir)  # before the data and the compile, not at the first save

    # ----------------------------------------------------------------------------- Data
    data = data_lib.prepare(config.data, show_progress=is_main and sys.stderr.isatty())
    data_lib.check_fits(data, window)
    # Read and checked before anything is written; used only if there is no checkpoint to resume.
    imported = hf.read_for_training(config, data) if config.init_from else None
    steps = total_steps(config, data)

    # ----------------------------------------------------------------------------- Mesh
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(config.batch_size, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    # A task's batch is (window, loss mask, model inputs), all at the same aligned starts.
    is_task = data.train_mask is not None
    batch_arrays = 3 if is_task else 1

    def to_batch(rows_of: Callable[[np.ndarray], np.ndarray], tokens, mask) -> tuple:
        """This process's rows of tokens (and of the mask) → the step's global batch arrays."""
        local = (rows_of(tokens),)
        if is_task:
            local_mask = rows_of(mask)
            local += (local_mask, tasks.model_inputs(local[0], local_mask, config.data.task.teacherless))
        return tuple(sharding.global_batch(a, mesh) for a in local)

    # ----------------------------------------------------------------------------- Model, optimizer, step
    setup = make_train_step(config, data.vocab_size, mesh, steps, batch_arrays)
    graphdef, init_state, step_fn = setup.graphdef, setup.init_state, setup.step_fn
    abstract_state, state_shardings = setup.abstract_state, setup.state_shardings
    n_params, memory = setup.n_params, step_fn.memory_analysis()
    local_rows = config.batch_size // jax.process_count()
    eval_fn = jax.jit(functools.partial(eval_step, graphdef, config.loss_chunk_size,
                                        sharding.compute_shardings(setup.param_shardings)),
                      in_shardings=(setup.param_shardings, None) + (batch_sharding,) * batch_arrays)

    # ----------------------------------------------------------------------------- Restore or init
    checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
    check_workdir(workdir, config, data.vocab_size, checkpointer.latest_step() is not None)
    start, state = checkpointer.restore_newest_good(abstract_state)
    if start is None:
        state = jax.jit(init_state, out_shardings=state_shardings)()
        start = 0
        if imported is not None:
            state["params"] = hf.with_imported(state["params"], imported)
            log(f"initialised {'the trunk and the heads' if 'heads' in imported else 'the trunk'} from "
                f"{config.init_from}")
    else:
        log(f"resumed from {workdir / 'checkpoints'} at step {start}")
    del imported  # the host copy of an init_from model
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        saved = json.loads(config.to_json_best_effort())
        (workdir / "config.json").write_text(json.dumps({**saved, "vocab_size": data.vocab_size}, indent=2))
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
    if start == 0:
        # The training set's size turns steps into epochs (where a data-constrained run overfits).
        writer.write(0, {"model/param_count": n_params, "data/train_tokens": len(data.train)})
    if is_main:
        mesh_desc = ", ".join(f"{a}={s}" for a, s in mesh.shape.items())
        log(f"{n_params / 1e6:.2f}M parameters, {n} head(s) ({config.mtp_head_type}), mesh {mesh_desc}, "
            f"{steps} steps of {config.batch_size}x{config.seq_len} tokens")
        if memory is not None:
            log(f"compiled train step needs {memory_per_device(memory) / 2**20:.1f} MiB per device: state and batch "
                f"{memory.argument_size_in_bytes / 2**20:.1f} MiB, "
                f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB")

    # ----------------------------------------------------------------------------- Evaluation
    eval_at = functools.partial(data_lib.eval_windows, window_len=window, batch_size=config.batch_size,
                                num_batches=config.eval_batches, align=data.example_len)
    eval_windows = eval_at(data.val)
    eval_masks = eval_at(data.val_mask) if is_task else [None] * len(eval_windows)
    rows = slice(jax.process_index() * local_rows, (jax.process_index() + 1) * local_rows)
    probes = evaluate_lib.training_probes(config, data)  # prepared now: a bad setting fails before training

    def evaluate(step: int) -> dict:
        totals, weights = None, np.asarray(head_weights(config, step, steps))  # total_loss as trained at `step`
        for batch, mask in zip(eval_windows, eval_masks):
            m = eval_fn(state["params"], weights, *to_batch(lambda a: a[rows], batch, mask))
            totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
        result = {f"eval/{k}": v / len(eval_windows) for k, v in fetch(totals).items()}
        if data.bytes_per_token:
            result["eval/bits_per_byte"] = result["eval/loss_1"] / math.log(2) / data.bytes_per_token
        if n > 1:  # how well the heads would draft for self-speculative decoding
            from mtp_jax.generate import teacher_forced_acceptance

            per_batch = jax.device_get([teacher_forced_acceptance(graphdef, config.loss_chunk_size, state["params"],
                                                                  sharding.global_batch(batch[rows], mesh))
                                        for batch in eval_windows])
            result.update({f"generate/{k}": float(np.mean([b[k] for b in per_batch])) for k in per_batch[0]})
        result.update(probes(graphdef, state["params"], lambda batch: sharding.global_batch(batch[rows], mesh)))
        if is_task:
            params = (multihost_utils.process_allgather(state["params"], tiled=True) if jax.process_count() > 1
                      else jax.device_get(state["params"]))
            result.update({f"eval/{k}": v for k, v in evaluate_lib.task_accuracy(nnx.merge(graphdef, params), config).items()})
        return result

    # ----------------------------------------------------------------------------- Loop
    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(total=steps, initial=start, disable=not (is_main and sys.stderr.isatty()), unit="step",
               dynamic_ncols=True)
    last_time, last_step, final_eval, last_scalars = time.perf_counter(), start, {}, {}
    stop, stopping = StopRequest(), False
    for step in range(start, steps):
        local_rows_at = functools.partial(
            data_lib.local_batch, window_len=window, batch_size=config.batch_size, seed=config.seed, step=step,
            process_index=jax.process_index(), process_count=jax.process_count(), num_epochs=config.num_epochs,
            align=data.example_len)
        state, metrics = step_fn(state, *to_batch(local_rows_at, data.train, data.train_mask))
        done = step + 1
        bar.update(1)
        if itstime(done, config.log_every, steps):
            scalars = fetch(metrics)  # waits for the step: the timing below is synchronised
            now = time.perf_counter()
            step_time = (now - last_time) / (done - last_step)
            last_time, last_step = now, done
            scalars = {f"train/{k}": v for k, v in scalars.items()}
            if n > 1:
                scalars["train/mtp_weight"] = float(mtp_weight(config, step, steps))
            scalars.update({"train/step_time_s": step_time, "train/tokens_per_sec": tokens_per_step / step_time,
                            "train/tokens_seen": done * tokens_per_step})
            check_finite(state, config.nan_policy, checkpointer, scalars)
            writer.write(done, scalars)
            last_scalars = scalars
            bar.set_postfix(loss_1=f"{scalars['train/loss_1']:.3f}", tok_s=f"{scalars['train/tokens_per_sec']:.0f}")
            if bar.disable and is_main:
                log(f"step {done}/{steps}  loss_1 {scalars['train/loss_1']:.4f}  total {scalars['train/total_loss']:.4f}"
                    f"  {scalars['train/tokens_per_sec']:.0f} tok/s")
        if itstime(done, config.eval_every, steps):
            final_eval = evaluate(done)
            writer.write(done, final_eval)
            if is_main:
                log(f"eval at step {done}: " + "  ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in final_eval.items()
                                                         if "loss" in k or "bits" in k))
        stopping = stop.agreed(done, config.log_every)  # once per step: a signal may land any time
        if itstime(done, config.checkpoint_every, steps) or stopping:
            check_finite(state, config.nan_policy, checkpointer)
            checkpointer.save(done, state)
        if stopping:
            break
    stop.release()
    bar.close()
    checkpointer.wait()
    if stopping:
        checkpointer.close()
        writer.close()
        log(f"stopped by {stop.signal} after step {done}: checkpoint saved in {workdir / 'checkpoints'}; "
            "rerun the same command to continue")
        return last_scalars
    checkpointer.close()
    if not final_eval:  # resumed a run that had already finished: evaluate the restored state
        final_eval = evaluate(steps)
        writer.write(steps, final_eval)
    writer.close()
    if is_main:
        print_summary(config, workdir, final_eval, last_scalars)
        if config.sample_tokens > 0 and data.meta.get("tokenizer") in ("byte", "bpe"):
            print_sample(config, data.directory, nnx.merge(graphdef, jax.device_get(state["params"])))
    return {**final_eval, **last_scalars}


def print_summary(config, workdir: pathlib.Path, final_eval: dict, train_scalars: dict) -> None:
    n = n_tokens(config)
    lines = [f"{'head':>6} {'predicts':>9} {'eval loss':>10} {'accuracy':>9}"]
    lines += [f"{k:>6} {'t+' + str(k):>9} {final_eval[f'eval/loss_{k}']:>10.4f} {final_eval[f'eval/accuracy_{k}']:>9.3f}"
              for k in range(1, n + 1)]
    if "eval/bits_per_byte" in final_eval:
        lines.append(f"head-1 bits per byte: {final_eval['eval/bits_per_byte']:.4f}")
    if n > 1:
        lines.append("draft acceptance (teacher-forced): " + "  ".join(
            f"head {k} {final_eval[f'generate/acceptance_{k}']:.3f}" for k in range(2, n + 1))
            + f"; {final_eval['generate/mean_accepted']:.2f} tokens per verify pass")
    if "train/tokens_per_sec" in train_scalars:
        lines.append(f"training throughput: {train_scalars['train/tokens_per_sec']:.0f} tokens/s")
    lines.append(f"outputs: {workdir / 'metrics.jsonl'}, {workdir / 'tensorboard'}, {workdir / 'checkpoints'}")
    print("\n".join(["", "== summary " + "=" * 40, *lines]), flush=True)


def print_sample(config, data_dir: pathlib.Path, model) -> None:
    from mtp_jax import generate  # decoding is only needed here, at the very end

    tokenizer = data_lib.load_tokenizer(data_dir)
    prompt = tokenizer.encode(config.sample_prompt)
    ids = generate.sample(model, prompt, max_new_tokens=config.sample_tokens, temperature=0.8, seed=0)
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
        raise UserError(f"the loss or gradients became non-finite at step {first}; the last good checkpoint is "
                        f"{'step ' + str(good) if good is not None else 'none'}: lower learning_rate, or set "
                        "nan_policy='skip' to skip such updates")
