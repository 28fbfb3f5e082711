"""Synthetic tasks on which the literature says MTP wins: problems, answers, loss masks, difficulty.

Every problem is generated from a seed (no download) as plain text for the byte tokenizer, so the
data, decoding and printing paths are the ones text uses:

  polyarith  Gloeckle et al. 2024 (arXiv 2404.19737) §4.2: arithmetic in F7[X]/(X^5). A
             polynomial is its 5 coefficients c0 … c4 as digits, lowest degree first ("30021" is
             3 + 2X^3 + X^4). An expression with m operations nests negation `-p`, addition
             `(p+q)`, multiplication `(p*q)` and composition `(p@q)` = p(q(X)), each on the
             reduced representatives and truncated at X^5:
                 prompt  ((30021*-11000)@04000)=      answer  42052
             Training draws m ~ U{1 … max_train_ops}; accuracy is also measured out of domain up
             to max_eval_ops. Difficulty label: `m3`.
  pathstar   Bachmann & Nagarajan 2024 (arXiv 2403.06963): a start node with `degree` arms of
             `arm_length` nodes each, labels drawn without replacement from 0 … num_labels-1 and
             written with a fixed width; the edges `u>v` are shuffled, then start and goal (the
             end of one arm); the answer is the path from start to goal:
                 prompt  3>8,0>3,8>1,0>6,6>2,2>4/0,4=   answer  0,6,2,4
             Difficulty label: `d2_l3`. Next-token training tends to stay at chance, 1/degree.

Packing. A problem is one example of exactly `example_len` bytes: prompt, answer, '\\n', then
spaces. A split is a stream of such examples, and windows start only at multiples of example_len
(data.global_batch_starts' `align`), so with seq_len a multiple of example_len a window's inputs
hold seq_len / example_len whole problems; its n extra tokens are the start of the next problem's
prompt. The loss mask is 1 on the answer and its '\\n' (the targets) and 0 on prompt and padding.
Head k's target at t is x[t + k], so its mask at t is the mask of token t + k: near an answer's
end the later heads' targets fall on padding and are masked out, and since mtp_n_tokens may not
exceed the shortest prompt, no head ever reaches into the next problem's answer.

Teacherless (Bachmann & Nagarajan's baseline objective, path-star only): the inputs at answer
positions are replaced by '$', so the model must produce the whole answer from the prompt alone;
it is then also decoded that way (prompt plus '$'s, one forward pass).

Held-out problems (the accuracy set and the validation stream) depend only on data.split_seed;
training problems on data.task.seed. Training never contains a held-out prompt (deduplicated by
text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from mtp_jax.errors import UserError

PAD, END, HIDDEN = " ", "\n", "$"  # padding, end of an answer, a hidden (teacherless) answer input
_P, _DEGREE = 7, 5  # the field F7 and the quotient X^5


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # without the END that follows it in an example
    difficulty: str  # e.g. 'm3', 'd2_l5': the key of eval/task_accuracy_<difficulty>


@dataclasses.dataclass(frozen=True)
class Task:
    """One task with its parameters: how to draw a problem of a given difficulty."""

    name: str
    params: dict  # the task's own config fields, validated
    train_difficulties: tuple[str, ...]  # drawn uniformly for training problems
    eval_difficulties: tuple[str, ...]  # reported by eval/task_accuracy_<difficulty>
    max_len: int  # longest prompt + answer + END of a training problem: what packing must hold
    min_prompt_len: int
    draw: Callable[[np.random.Generator, str], Problem]


# ---------------------------------------------------------------------------------------------
# polyarith: F7[X]/(X^5)
# ---------------------------------------------------------------------------------------------


def _add(p: list[int], q: list[int]) -> list[int]:
    return [(a + b) % _P for a, b in zip(p, q)]


def _mul(p: list[int], q: list[int]) -> list[int]:
    out = [0] * _DEGREE
    for i, a in enumerate(p):
        for j, b in enumerate(q[: _DEGREE - i]):
            out[i + j] = (out[i + j] + a * b) % _P
    return out


def _compose(p: list[int], q: list[int]) -> list[int]:
    out = [0] * _DEGREE  # Horner: p(q) = (…(c4 q + c3) q + …) q + c0
    for c in reversed(p):
        out = _add(_mul(out, q), [c] + [0] * (_DEGREE - 1))
    return out


_BINARY = {"+": _add, "*": _mul, "@": _compose}


def _expression(rng: np.random.Generator, ops: int) -> tuple[str, list[int]]:
    """A random expression with `ops` operations: (text, value's coefficients)."""
    if ops == 0:
        value = rng.integers(0, _P, _DEGREE).tolist()
        return "".join(map(str, value)), value
    op = "-+*@"[rng.integers(4)]
    if op == "-":
        text, value = _expression(rng, ops - 1)
        return "-" + text, [-c % _P for c in value]
    left = int(rng.integers(ops))  # operations in the left operand: 0 … ops-1
    (lt, lv), (rt, rv) = _expression(rng, left), _expression(rng, ops - 1 - left)
    return f"({lt}{op}{rt})", _BINARY[op](lv, rv)


def _polyarith(max_train_ops: int, max_eval_ops: int) -> Task:
    if max_train_ops < 1:
        raise UserError(f"data.task.max_train_ops={max_train_ops} must be >= 1 (operations per expression)")
    if max_eval_ops < max_train_ops:
        raise UserError(
            f"data.task.max_eval_ops={max_eval_ops} must be >= data.task.max_train_ops="
            f"{max_train_ops} (accuracy is measured in domain and beyond)"
        )

    def draw(rng: np.random.Generator, difficulty: str) -> Problem:
        text, value = _expression(rng, int(difficulty[1:]))
        return Problem(text + "=", "".join(map(str, value)), difficulty)

    # Longest: m binary operations, m + 1 leaves, "(" op ")" each; then '=', answer and END.
    return Task(
        "polyarith",
        dict(max_train_ops=max_train_ops, max_eval_ops=max_eval_ops),
        tuple(f"m{m}" for m in range(1, max_train_ops + 1)),
        tuple(f"m{m}" for m in range(1, max_eval_ops + 1)),
        max_len=_DEGREE * (max_train_ops + 1) + 3 * max_train_ops + 1 + _DEGREE + 1,
        min_prompt_len=1 + _DEGREE + 1,
        draw=draw,
    )


# ---------------------------------------------------------------------------------------------
# pathstar
# ---------------------------------------------------------------------------------------------


def _pathstar(degree: int, arm_length: int, num_labels: int) -> Task:
    if degree < 2:
        raise UserError(f"data.task.degree={degree} must be >= 2 (with one arm there is nothing to plan)")
    if arm_length < 1:
        raise UserError(f"data.task.arm_length={arm_length} must be >= 1 (nodes per arm)")
    nodes = 1 + degree * arm_length
    if num_labels < nodes:
        raise UserError(
            f"data.task.num_labels={num_labels} is too few for degree={degree} x arm_length="
            f"{arm_length} arms plus the start ({nodes} distinct nodes): raise num_labels to >= {nodes} "
            "or shorten the arms"
        )
    width = len(str(num_labels - 1))
    label = f"{{:0{width}d}}".format
    difficulty = f"d{degree}_l{arm_length}"

    def draw(rng: np.random.Generator, _: str) -> Problem:
        labels = rng.choice(num_labels, nodes, replace=False)
        start, arms = labels[0], labels[1:].reshape(degree, arm_length)
        edges = [(start, arm[0]) for arm in arms] + [
            (arm[i], arm[i + 1]) for arm in arms for i in range(arm_length - 1)
        ]
        edges = [edges[i] for i in rng.permutation(len(edges))]
        path = [start, *arms[rng.integers(degree)]]
        prompt = ",".join(f"{label(u)}>{label(v)}" for u, v in edges) + f"/{label(start)},{label(path[-1])}="
        return Problem(prompt, ",".join(map(label, path)), difficulty)

    edges_len = degree * arm_length * (2 * width + 2) - 1  # "u>v" joined by ","
    prompt_len = edges_len + 1 + (2 * width + 1) + 1  # "/", "start,goal", "="
    return Task(
        "pathstar",
        dict(degree=degree, arm_length=arm_length, num_labels=num_labels),
        (difficulty,),
        (difficulty,),
        max_len=prompt_len + (arm_length + 1) * (width + 1),
        min_prompt_len=prompt_len,
        draw=draw,
    )


# name -> the task built from config.data.task's fields
TASKS: dict[str, Callable[..., Task]] = {
    "polyarith": lambda t: _polyarith(int(t.max_train_ops), int(t.max_eval_ops)),
    "pathstar": lambda t: _pathstar(int(t.degree), int(t.arm_length), int(t.num_labels)),
}


# ---------------------------------------------------------------------------------------------
# From the config; problems; packing
# ---------------------------------------------------------------------------------------------


def task_name(source: str) -> str | None:
    """'polyarith' for data.source='task:polyarith'; None for a source that is not a task."""
    if not source.startswith("task:"):
        return None
    name = source[len("task:") :]
    if name not in TASKS:
        raise UserError(
            f"data.source={source!r} names an unknown task: choose one of {', '.join('task:' + t for t in TASKS)}"
        )
    return name


def from_config(data_cfg) -> Task:
    """The task that data.source names, with its parameters from data.task (UserError if bad)."""
    t = data_cfg.task
    name = task_name(str(data_cfg.source))
    if name is None:
        raise UserError(f"data.source={data_cfg.source!r} is not a task: name one as task:NAME")
    task = TASKS[name](t)
    if t.teacherless and name != "pathstar":
        raise UserError(
            f"data.task.teacherless=True is defined for task:pathstar (fixed-length answers), not task:{name}: drop it"
        )
    for field in ("num_train", "eval_problems"):
        if t[field] < 1:
            raise UserError(f"data.task.{field}={t[field]} must be >= 1")
    return task


def example_len(task: Task, requested: int) -> int:
    """Bytes per packed problem: `requested` (data.task.example_len), or the longest problem's if 0."""
    if requested == 0:
        return task.max_len
    if requested < task.max_len:
        raise UserError(
            f"data.task.example_len={requested} is shorter than the task's longest training problem "
            f"({task.max_len} bytes with its answer): use >= {task.max_len}, or 0 for exactly that"
        )
    return requested


def check_config(config, n: int) -> None:
    """The task's parameters against the rest of the config, n the tokens predicted per position
    (called by config.validate)."""
    task = from_config(config.data)
    length = example_len(task, int(config.data.task.example_len))
    if config.seq_len % length:
        raise UserError(
            f"seq_len={config.seq_len} must be a multiple of the task's example length {length} "
            f"(so windows hold whole problems): use seq_len={-(-config.seq_len // length) * length}, "
            "or set data.task.example_len to a divisor of seq_len"
        )
    if n > task.min_prompt_len:
        raise UserError(
            f"mtp_n_tokens={n} exceeds the task's shortest prompt ({task.min_prompt_len} bytes): the "
            "heads would reach into the next problem's answer; use fewer heads"
        )


def draw_problems(
    task: Task,
    rng: np.random.Generator,
    count: int,
    difficulties: tuple[str, ...],
    exclude: frozenset[str] = frozenset(),
    distinct: bool = True,
) -> list[Problem]:
    """`count` problems whose prompts are not in `exclude` (and, if `distinct`, not repeated),
    difficulties drawn uniformly."""
    problems, seen = [], set(exclude)
    for _ in range(100 * count + 1000):
        if len(problems) == count:
            return problems
        problem = task.draw(rng, difficulties[rng.integers(len(difficulties))])
        if problem.prompt not in seen:
            if distinct:
                seen.add(problem.prompt)
            problems.append(problem)
    raise UserError(
        f"task:{task.name} with {task.params} has too few problems outside the held-out ones for "
        f"{count}: enlarge the task (e.g. data.task.num_labels) or lower data.task.eval_problems"
    )


def held_out(task: Task, per_difficulty: int, split_seed: int) -> dict[str, list[Problem]]:
    """The accuracy set: `per_difficulty` distinct problems of each eval difficulty, fixed by split_seed."""
    return {
        d: draw_problems(task, np.random.default_rng([split_seed, 1, i]), per_difficulty, (d,))
        for i, d in enumerate(task.eval_difficulties)
    }


def splits(
    task: Task, *, num_train: int, num_val: int, eval_problems: int, seed: int, split_seed: int
) -> dict[str, list[Problem]]:
    """Training and validation problems; neither the validation problems nor the accuracy set
    (`held_out(task, eval_problems, split_seed)`) ever appear in training."""
    held = {p.prompt for problems in held_out(task, eval_problems, split_seed).values() for p in problems}
    val = draw_problems(task, np.random.default_rng([split_seed, 2]), num_val, task.train_difficulties, frozenset(held))
    # Training problems are sampled i.i.d. (repeats allowed, as in the papers), held-out ones excluded.
    train = draw_problems(
        task,
        np.random.default_rng([seed, 3]),
        num_train,
        task.train_difficulties,
        frozenset(held | {p.prompt for p in val}),
        distinct=False,
    )
    return {"train": train, "val": val}


def pack(problems: list[Problem], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte tokens [len(problems) * length] (uint8) and their loss mask (uint8, 1 on answer + END)."""
    longest = max(len(p.prompt) + len(p.answer) + 1 for p in problems)
    if longest > length:
        raise ValueError(f"a problem of {longest} bytes does not fit examples of {length}")
    text = "".join((p.prompt + p.answer + END).ljust(length, PAD) for p in problems).encode("ascii")
    tokens = np.frombuffer(text, np.uint8)
    mask = np.zeros(len(tokens), np.uint8)
    starts = np.arange(len(problems)) * length
    for start, p in zip(starts, problems):
        mask[start + len(p.prompt) : start + len(p.prompt) + len(p.answer) + 1] = 1
    return tokens, mask


def model_inputs(window: np.ndarray, mask: np.ndarray, teacherless: bool) -> np.ndarray:
    """The tokens the model reads for a window: the window, or with answers hidden (teacherless)."""
    return np.where(mask > 0, ord(HIDDEN), window).astype(window.dtype) if teacherless else window


def batch_rows(window: np.ndarray, mask: np.ndarray | None, teacherless: bool) -> tuple[np.ndarray, ...]:
    """The arrays a step reads for rows of windows: (window,) for text; (window, loss mask, model
    inputs) for a task (mtp.mtp_loss)."""
    return (window,) if mask is None else (window, mask, model_inputs(window, mask, teacherless))
