"""What is measured on a model rather than trained: validation losses, draft acceptance, the
code probes (probes.py) and a task's answer accuracy.

    python -m mtp_jax.evaluate --workdir=DIR --probe=induction|parse_rate|task [--json]

Training builds one Evaluator before its first step and calls it at every evaluation; the
command line runs one probe on a workdir's newest checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mtp_jax import data as data_lib
from mtp_jax import probes, sharding, workdir
from mtp_jax.acceptance import teacher_forced_acceptance
from mtp_jax.cli import ArgumentParser, fail
from mtp_jax.compilation_cache import use_compilation_cache
from mtp_jax.data import tasks
from mtp_jax.decoding import Generator
from mtp_jax.errors import UserError
from mtp_jax.metrics import log
from mtp_jax.mtp import MTPModel, mtp_loss, n_predict
from mtp_jax.schedules import head_weights


def eval_step(
    graphdef, chunk_size, compute_shardings, eot_id, targets, params, weights, window, mask=None, inputs=None
):
    params = jax.lax.with_sharding_constraint(params, compute_shardings)  # see sharding.compute_shardings
    return mtp_loss(nnx.merge(graphdef, params), window, weights, chunk_size, mask, inputs, eot_id, targets)[1]


class Evaluator:
    """Everything measured at a training evaluation, prepared once before the first step (so a
    bad probe setting fails before training), called as evaluator(params, step) -> scalars:

    - eval/loss_k, eval/accuracy_k, eval/total_loss on eval_batches fixed validation batches
      (total_loss with the head weights of `step`), and eval/bits_per_byte;
    - generate/acceptance_k, generate/mean_accepted (n > 1): teacher-forced draft acceptance;
    - eval/induction_accuracy, eval/parse_rate, … (probes.py) when the corpus has Python files;
    - eval/task_accuracy, eval/task_accuracy_<difficulty> for a task source.

    It owns the decoders of the probes and tasks: compiled at the first evaluation, reused after.
    Every process calls it with the sharded params; decoding runs on one device per process."""

    def __init__(self, config, data: data_lib.TokenData, graphdef, mesh, *, param_shardings, steps: int):
        self.config, self.graphdef, self.mesh, self.steps = config, graphdef, mesh, steps
        self.bytes_per_token, self.n = data.bytes_per_token, n_predict(config)
        windows = functools.partial(
            data_lib.eval_windows,
            window_len=config.seq_len + self.n,
            batch_size=config.batch_size,
            num_batches=config.eval_batches,
            align=data.example_len,
        )
        self.teacherless = bool(config.data.task.teacherless)
        self.windows = windows(data.val)
        self.masks = windows(data.val_mask) if data.val_mask is not None else [None] * len(self.windows)
        local_rows = config.batch_size // jax.process_count()
        self.rows = slice(jax.process_index() * local_rows, (jax.process_index() + 1) * local_rows)
        batch_arrays = 1 if data.val_mask is None else 3
        self.losses = jax.jit(
            functools.partial(
                eval_step,
                graphdef,
                config.loss_chunk_size,
                sharding.compute_shardings(param_shardings),
                data_lib.document_eot_id(config.data, data),
                config.get("mtp_targets", "data"),
            ),
            in_shardings=(param_shardings, None) + (sharding.batch_sharding(mesh),) * batch_arrays,
        )
        self.induction, self.prompts, self.tokenizer = self.probe_inputs(config, data)
        self.problems = held_out_problems(config) if data.val_mask is not None else None
        self.generators: dict[int, Generator] = {}

    @staticmethod
    def probe_inputs(config, data):
        """(induction windows, parse-rate prompts, tokenizer); None where a probe is off."""
        wanted = config.induction_batches > 0 or config.parse_rate_prompts > 0
        files = probes.validation_python_files(config.data) if wanted else []
        if not files:
            if wanted:
                log(
                    f"induction and parse-rate probes skipped: data.source={config.data.source!r} has no Python "
                    "files in its validation split"
                )
            return None, None, None
        tokenizer = data_lib.load_tokenizer(data.directory)
        return (
            probes.induction_inputs(config, files, tokenizer) if config.induction_batches else None,
            probes.parse_rate_inputs(config, files, tokenizer) if config.parse_rate_prompts else None,
            tokenizer,
        )

    def __call__(self, params, step: int) -> dict[str, float]:
        result = self.validation_losses(params, step)
        if self.n > 1:  # how well the heads would draft for self-speculative decoding
            per_batch = jax.device_get(
                [
                    teacher_forced_acceptance(self.graphdef, self.config.loss_chunk_size, params, self.to_device(batch))
                    for batch in self.windows
                ]
            )
            result.update({f"generate/{k}": float(np.mean([b[k] for b in per_batch])) for k in per_batch[0]})
        if self.induction is not None:
            result["eval/induction_accuracy"] = probes.induction_accuracy(
                self.graphdef,
                params,
                self.induction,
                batch_size=self.config.batch_size,
                chunk_size=self.config.loss_chunk_size,
                to_device=self.to_device,
            )
        if self.prompts is not None:
            local = jax.device_put(multihost_utils.process_allgather(params, tiled=True), jax.local_devices()[0])
            metrics = probes.parse_rate(
                self.generator(self.config.seq_len, local),
                self.prompts,
                self.tokenizer,
                new_tokens=self.config.parse_rate_tokens,
            )
            result.update({f"eval/{k}": v for k, v in metrics.items()})
        if self.problems is not None:
            host = (
                multihost_utils.process_allgather(params, tiled=True)
                if jax.process_count() > 1
                else jax.device_get(params)
            )
            generator = None if self.teacherless else self.generator(answer_capacity(self.problems), host)
            accuracy = task_accuracy(nnx.merge(self.graphdef, host), self.config, self.problems, generator)
            result.update({f"eval/{k}": v for k, v in accuracy.items()})
        return result

    def validation_losses(self, params, step: int) -> dict[str, float]:
        totals, weights = None, np.asarray(head_weights(self.config, step, self.steps))
        for window, mask in zip(self.windows, self.masks):
            m = self.losses(
                params, weights, *(self.to_device(a) for a in tasks.batch_rows(window, mask, self.teacherless))
            )
            totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
        result = {f"eval/{k}": float(v) / len(self.windows) for k, v in jax.device_get(totals).items()}
        if self.bytes_per_token:
            result["eval/bits_per_byte"] = result["eval/loss_1"] / math.log(2) / self.bytes_per_token
        return result

    def to_device(self, batch: np.ndarray) -> jax.Array:
        """This process's rows of a global batch → the global array, sharded over the mesh."""
        return sharding.global_batch(batch[self.rows], self.mesh)

    def generator(self, capacity: int, params) -> Generator:
        """The decoder with a cache of `capacity` positions, compiled at its first use, with params."""
        if capacity not in self.generators:
            self.generators[capacity] = Generator(nnx.merge(self.graphdef, params), capacity)
        self.generators[capacity].use(params)
        return self.generators[capacity]


# ---------------------------------------------------------------------------------------------
# Task accuracy
# ---------------------------------------------------------------------------------------------


def task_accuracy(
    model: MTPModel, config, problems: dict[str, list[tasks.Problem]] | None = None, generator: Generator | None = None
) -> dict[str, float]:
    """Exact-match accuracy of head 1's greedy answers on a task's held-out problems.

    `problems` maps a difficulty to its problems (default: tasks.held_out, data.task.eval_problems
    per difficulty, fixed by data.split_seed, never in training). An answer is right when the
    decoded bytes are the answer followed by its '\\n'. Returns 'task_accuracy' (over all
    problems) and 'task_accuracy_<difficulty>' (e.g. 'task_accuracy_m3', 'task_accuracy_d2_l5').
    generator: decodes the answers (the model's, with answer_capacity(problems) positions or
    more; default: a new one); a teacherless model answers in one forward pass instead."""
    problems = held_out_problems(config) if problems is None else problems
    flat = [p for group in problems.values() for p in group]
    if config.data.task.teacherless:
        answers = teacherless_answers(model, flat)
    else:
        answers = greedy_answers(generator or Generator(model, answer_capacity(problems)), flat)
    correct = iter(answer == p.answer + tasks.END for answer, p in zip(answers, flat))
    by_difficulty = {d: [next(correct) for _ in group] for d, group in problems.items()}
    result = {"task_accuracy": float(np.mean(sum(by_difficulty.values(), [])))}
    result.update({f"task_accuracy_{d}": float(np.mean(c)) for d, c in by_difficulty.items()})
    return result


def _encode(text: str) -> list[int]:
    return list(text.encode("ascii"))


def _decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("latin-1")  # any byte a model emits maps to one char


def held_out_problems(config) -> dict[str, list[tasks.Problem]]:
    """data.task.eval_problems held-out problems per difficulty, fixed by data.split_seed."""
    return tasks.held_out(
        tasks.from_config(config.data), int(config.data.task.eval_problems), int(config.data.split_seed)
    )


def answer_capacity(problems: dict[str, list[tasks.Problem]]) -> int:
    """Cache positions that greedy decoding of every problem's answer (and its '\\n') needs."""
    return max(len(p.prompt) + len(p.answer) + 1 for group in problems.values() for p in group)


def greedy_answers(generator: Generator, problems: list[tasks.Problem]) -> list[str]:
    """Greedy decoding with the KV cache, as many tokens as the answer and its '\\n' have: a
    longer or shorter answer differs within them, so nothing past them can change the verdict."""
    return [_decode(generator.generate(_encode(p.prompt), len(p.answer) + 1).tokens) for p in problems]


def teacherless_answers(model: MTPModel, problems: list[tasks.Problem]) -> list[str]:
    """A teacherless model never read an answer token, only '$': it answers in one forward pass
    over the prompt and one '$' per answer token, reading head 1's argmax at each position."""
    tokens = np.array([_encode(p.prompt + tasks.HIDDEN * len(p.answer)) for p in problems])  # [N, L]
    graphdef, params = nnx.split(model)
    greedy = np.asarray(_head1_greedy(graphdef, params, tokens))  # [N, L]
    return [_decode(g[len(p.prompt) - 1 : len(p.prompt) + len(p.answer)]) for g, p in zip(greedy, problems)]


@functools.partial(jax.jit, static_argnums=0)
def _head1_greedy(graphdef, params, tokens: jax.Array) -> jax.Array:
    """Head 1's argmax [B, L] at every position of tokens [B, L]."""
    model = nnx.merge(graphdef, params)
    (h,) = model.hidden_states(tokens, tokens.shape[1], heads=1)
    return jnp.argmax(model.logits(1, h), axis=-1)


# ---------------------------------------------------------------------------------------------
# Probes by name, on a workdir's checkpoint
# ---------------------------------------------------------------------------------------------


def induction_probe(trained: workdir.Trained) -> dict:
    config = trained.config
    probe_set = probes.induction_inputs(config, probes.python_files(config.data, "induction"), trained.tokenizer())
    graphdef, params = nnx.split(trained.model, nnx.Param)
    return {
        "induction_accuracy": probes.induction_accuracy(
            graphdef, params, probe_set, batch_size=config.batch_size, chunk_size=config.loss_chunk_size
        )
    }


def parse_rate_probe(trained: workdir.Trained) -> dict:
    config, tokenizer = trained.config, trained.tokenizer()
    prompts = probes.parse_rate_inputs(config, probes.python_files(config.data, "parse-rate"), tokenizer)
    return probes.parse_rate(
        Generator(trained.model, config.seq_len), prompts, tokenizer, new_tokens=config.parse_rate_tokens
    )


def task_probe(trained: workdir.Trained) -> dict:
    source = str(trained.config.data.source)
    if tasks.task_name(source) is None:
        named = " or ".join(repr(f"task:{name}") for name in tasks.TASKS)
        raise UserError(
            f"--probe=task measures a model trained on a task (data.source={named}), and this one "
            f"was trained on data.source={source!r}: use --probe=induction or --probe=parse_rate"
        )
    return task_accuracy(trained.model, trained.config)


# name -> Trained -> {metric: value}; sizes come from the config's probe fields.
PROBES = {"induction": induction_probe, "parse_rate": parse_rate_probe, "task": task_probe}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m mtp_jax.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir (its newest checkpoint is used)")
    p.add_argument("--probe", required=True, choices=sorted(PROBES), help="what to measure")
    p.add_argument("--induction_batches", type=int, default=2, help="induction: batches of renamed windows")
    p.add_argument("--parse_rate_prompts", type=int, default=16, help="parse_rate: prompts sampled")
    p.add_argument(
        "--parse_rate_tokens",
        type=int,
        default=0,
        help="parse_rate: tokens sampled per prompt (0: half the trained seq_len)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for name in ("induction_batches", "parse_rate_prompts"):
        if getattr(args, name) < 1:
            fail(f"--{name}={getattr(args, name)} must be >= 1")
    if args.parse_rate_tokens < 0:
        fail(f"--parse_rate_tokens={args.parse_rate_tokens} must be >= 0 (0: half the trained seq_len)")
    return args


def run(args: argparse.Namespace) -> dict:
    trained = workdir.load(args.workdir)
    config = trained.config
    tokens = args.parse_rate_tokens or config.seq_len // 2
    if tokens >= config.seq_len:
        raise UserError(
            f"--parse_rate_tokens={tokens} must be below the trained seq_len={config.seq_len} "
            "(the rest of it is the prompt)"
        )
    # The flags, not the fields saved with the run (0 there means "off during training").
    config.induction_batches, config.parse_rate_prompts = args.induction_batches, args.parse_rate_prompts
    config.parse_rate_tokens = tokens
    return {"probe": args.probe, "workdir": str(args.workdir), "step": trained.step, **PROBES[args.probe](trained)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    use_compilation_cache()
    try:
        out = run(args)
    except UserError as e:
        fail(str(e))
    if args.json:
        print(json.dumps(out))
        return
    for key, value in out.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
