"""What is measured on a model rather than trained, during training (train.run's evaluation) and
on any checkpoint (load it with generate.load)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import tasks
from mtp_jax.generate import Generator
from mtp_jax.mtp import MTPModel

# ---------------------------------------------------------------------------------------------
# Task accuracy
# ---------------------------------------------------------------------------------------------


def task_accuracy(model: MTPModel, config, problems: dict[str, list[tasks.Problem]] | None = None
                  ) -> dict[str, float]:
    """Exact-match accuracy of head 1's greedy answers on a task's held-out problems.

    `problems` maps a difficulty to its problems (default: tasks.held_out, data.task.eval_problems
    per difficulty, fixed by data.split_seed, never in training). An answer is right when the
    decoded bytes are the answer followed by its '\\n'. Returns 'task_accuracy' (over all
    problems) and 'task_accuracy_<difficulty>' (e.g. 'task_accuracy_m3', 'task_accuracy_d2_l5')."""
    if problems is None:
        task = tasks.from_config(config.data)
        problems = tasks.held_out(task, int(config.data.task.eval_problems), int(config.data.split_seed))
    flat = [p for group in problems.values() for p in group]
    decode = _teacherless_answers if config.data.task.teacherless else _greedy_answers
    correct = iter(answer == p.answer + tasks.END for answer, p in zip(decode(model, flat), flat))
    by_difficulty = {d: [next(correct) for _ in group] for d, group in problems.items()}
    result = {"task_accuracy": float(np.mean(sum(by_difficulty.values(), [])))}
    result.update({f"task_accuracy_{d}": float(np.mean(c)) for d, c in by_difficulty.items()})
    return result


def _encode(text: str) -> list[int]:
    return list(text.encode("ascii"))


def _decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("latin-1")  # any byte a model emits maps to one char


# (graphdef, capacity) -> Generator: its compiled programs (one per prompt bucket) then serve every
# evaluation of a run instead of compiling again each time; only its params change.
_GENERATORS: dict[tuple[nnx.GraphDef, int], Generator] = {}


def _generator(model: MTPModel, capacity: int) -> Generator:
    graphdef, params = nnx.split(model)
    key = (graphdef, capacity)
    if key not in _GENERATORS:
        if len(_GENERATORS) >= 4:  # a process evaluating many different models: keep memory bounded
            _GENERATORS.clear()
        _GENERATORS[key] = Generator(model, capacity)
    _GENERATORS[key].params = params
    return _GENERATORS[key]


def _greedy_answers(model: MTPModel, problems: list[tasks.Problem]) -> list[str]:
    """Greedy decoding with the KV cache, as many tokens as the answer and its '\\n' have: a
    longer or shorter answer differs within them, so nothing past them can change the verdict."""
    generator = _generator(model, max(len(p.prompt) + len(p.answer) + 1 for p in problems))
    return [_decode(generator.generate(_encode(p.prompt), len(p.answer) + 1).tokens) for p in problems]


def _teacherless_answers(model: MTPModel, problems: list[tasks.Problem]) -> list[str]:
    """A teacherless model never read an answer token, only '$': it answers in one forward pass
    over the prompt and one '$' per answer token, reading head 1's argmax at each position."""
    tokens = np.array([_encode(p.prompt + tasks.HIDDEN * len(p.answer)) for p in problems])  # [N, L]
    graphdef, params = nnx.split(model)
    greedy = np.asarray(_head1_greedy(graphdef, params, tokens))  # [N, L]
    return [_decode(g[len(p.prompt) - 1:len(p.prompt) + len(p.answer)]) for g, p in zip(greedy, problems)]


@functools.partial(jax.jit, static_argnums=0)
def _head1_greedy(graphdef, params, tokens: jax.Array) -> jax.Array:
    """Head 1's argmax [B, L] at every position of tokens [B, L]."""
    model = nnx.merge(graphdef, params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h_trunk, _ = model.trunk(tokens, positions)
    h, _ = model.head_hidden(1, h_trunk, h_trunk, None, positions)
    return jnp.argmax(jnp.dot(model.decoder.final_norm(h), model.head_matrix(1),
                              preferred_element_type=jnp.float32), axis=-1)
