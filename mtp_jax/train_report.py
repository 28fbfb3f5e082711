"""What a training run tells the console: its set-up, progress, evaluations, summary and a sample."""

from __future__ import annotations

import pathlib
import time

from tqdm import tqdm

from mtp_jax import data as data_lib
from mtp_jax.decoding import sample
from mtp_jax.metrics import log
from mtp_jax.mtp import n_predict
from mtp_jax.schedules import mtp_weight
from mtp_jax.train_step import TrainSetup, memory_per_device


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


def log_eval(done: int, final_eval: dict) -> None:
    log(
        f"eval at step {done}: "
        + "  ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in final_eval.items() if "loss" in k or "bits" in k)
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
