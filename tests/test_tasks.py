"""Synthetic tasks (mtp_jax/data/tasks.py): generators checked by independent solvers, held-out sets that
never leak into training, packing and the loss mask, task accuracy, and a task run through the
same training, sharding, checkpoint and resume paths as text."""

import collections
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mtp_jax import config as config_lib
from mtp_jax import data, decoding, evaluate, train, workdir
from mtp_jax.data import tasks
from mtp_jax.errors import UserError
from mtp_jax.metrics import read_metrics
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel, cross_entropy, mtp_loss
from tests.util import ROOT, load_config

SHAPE = ModelShape(vocab_size=256, d_model=32, n_layers=2, n_heads=4, mlp_dim=48)


def task_config(source, **task):
    fields = dict(
        num_train=200,
        seed=0,
        example_len=0,
        eval_problems=8,
        max_train_ops=5,
        max_eval_ops=8,
        degree=3,
        arm_length=4,
        num_labels=40,
        teacherless=False,
    )
    return ml_collections.ConfigDict(dict(source=source, split_seed=0, task={**fields, **task}))


POLYARITH = tasks.from_config(task_config("task:polyarith"))
PATHSTAR = tasks.from_config(task_config("task:pathstar"))


# ------------------------------------------------------------------------------- independent solvers


def parse_polynomial_expression(text: str) -> np.ndarray:
    """Evaluate an expression over F7[X]/(X^5) with numpy coefficient arrays (c0 … c4)."""

    def mul(p, q):
        return np.convolve(p, q)[:5] % 7  # truncation at X^5 is the quotient by X^5

    def compose(p, q):
        out = np.zeros(5, np.int64)
        for i, c in enumerate(p):  # sum_i c_i q^i
            power = np.array([1, 0, 0, 0, 0])
            for _ in range(i):
                power = mul(power, q)
            out = (out + c * power) % 7
        return out

    def expr(i):
        if text[i] == "-":
            value, i = expr(i + 1)
            return (-value) % 7, i
        if text[i] == "(":
            left, i = expr(i + 1)
            op = text[i]
            right, i = expr(i + 1)
            assert text[i] == ")"
            return {"+": lambda: (left + right) % 7, "*": lambda: mul(left, right), "@": lambda: compose(left, right)}[
                op
            ](), i + 1
        return np.array([int(c) for c in text[i : i + 5]]), i + 5

    value, end = expr(0)
    assert end == len(text)
    return value


def bfs_path(prompt: str) -> list[str]:
    """The start-to-goal path found by breadth-first search over the parsed edge list."""
    edges, query = prompt.rstrip("=").split("/")
    start, goal = query.split(",")
    neighbours = collections.defaultdict(list)
    for edge in edges.split(","):
        u, v = edge.split(">")
        neighbours[u].append(v)
        neighbours[v].append(u)
    parent, frontier = {start: None}, collections.deque([start])
    while frontier:
        node = frontier.popleft()
        for nxt in neighbours[node]:
            if nxt not in parent:
                parent[nxt] = node
                frontier.append(nxt)
    path = [goal]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return path[::-1]


# ------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", [POLYARITH, PATHSTAR], ids=lambda t: t.name)
def test_generators_are_deterministic_in_their_seed(task):
    as_text = lambda problems: [(p.prompt, p.answer, p.difficulty) for g in problems.values() for p in g]  # noqa: E731
    assert as_text(tasks.held_out(task, 8, split_seed=0)) == as_text(tasks.held_out(task, 8, split_seed=0))
    assert len(set(as_text(tasks.held_out(task, 8, 0))) & set(as_text(tasks.held_out(task, 8, 1)))) == 0
    kw = dict(num_train=100, num_val=10, eval_problems=4, split_seed=0)
    a, b, c = (tasks.splits(task, seed=s, **kw) for s in (0, 0, 1))
    assert as_text(a) == as_text(b)
    assert a["val"] == c["val"]  # held-out problems depend on split_seed only
    assert sum(x != y for x, y in zip(a["train"], c["train"])) > 90


def test_polyarith_answers_match_a_numpy_solver():
    problems = tasks.held_out(POLYARITH, 40, split_seed=3)
    assert list(problems) == [f"m{m}" for m in range(1, 9)]
    for difficulty, group in problems.items():
        for p in group:
            expression = p.prompt[:-1]
            assert p.prompt.endswith("=") and sum(expression.count(op) for op in "-+*@") == int(difficulty[1:])
            expected = parse_polynomial_expression(expression)
            assert p.answer == "".join(map(str, expected)), p


def test_pathstar_answers_match_breadth_first_search():
    ((difficulty, group),) = tasks.held_out(PATHSTAR, 200, split_seed=3).items()
    assert difficulty == "d3_l4"
    for p in group:
        assert p.answer.split(",") == bfs_path(p.prompt), p
        edges = p.prompt.split("/")[0].split(",")
        labels = {x for e in edges for x in e.split(">")}
        assert len(edges) == 3 * 4 and len(labels) == 1 + 3 * 4 and all(len(x) == 2 and int(x) < 40 for x in labels)
        start = p.answer.split(",")[0]
        assert sum(e.startswith(start + ">") for e in edges) == 3  # the start node has degree d
    assert len({p.prompt for p in group}) == 200


def test_train_and_held_out_problems_never_overlap():
    # A tiny problem space (4 starts x 6 ordered pairs of edges x 2 goals = 48 prompts), so that
    # the training sampler draws held-out prompts often and must skip them.
    task = tasks.from_config(task_config("task:pathstar", degree=2, arm_length=1, num_labels=4))
    held = {p.prompt for g in tasks.held_out(task, 10, split_seed=0).values() for p in g}
    split = tasks.splits(task, num_train=2000, num_val=10, eval_problems=10, seed=0, split_seed=0)
    val, train_prompts = {p.prompt for p in split["val"]}, [p.prompt for p in split["train"]]
    assert len(held) == 10 and len(val) == 10 and not held & val
    assert not (held | val) & set(train_prompts)
    assert len(set(train_prompts)) == 48 - 20  # every other prompt, repeated (training is i.i.d.)
    with pytest.raises(UserError, match="too few problems"):
        tasks.splits(task, num_train=10, num_val=40, eval_problems=10, seed=0, split_seed=0)


def test_packing_puts_each_problem_in_one_fixed_length_example_with_its_answer_masked_in():
    problems = tasks.held_out(POLYARITH, 3, split_seed=0)["m2"]
    length = tasks.example_len(POLYARITH, 64)
    tokens, mask = tasks.pack(problems, length)
    assert tokens.shape == mask.shape == (3 * 64,)
    for i, p in enumerate(problems):
        row, row_mask = bytes(tokens[i * 64 : (i + 1) * 64]).decode(), mask[i * 64 : (i + 1) * 64]
        assert row == (p.prompt + p.answer + "\n").ljust(64)
        assert np.flatnonzero(row_mask).tolist() == list(range(len(p.prompt), len(p.prompt) + 6))
    assert tasks.example_len(POLYARITH, 0) == POLYARITH.max_len == 52  # 6 leaves, 5 x "(op)", "=", 5 + "\n"
    with pytest.raises(UserError, match="example_len=40 is shorter"):
        tasks.example_len(POLYARITH, 40)


def test_task_cache_holds_tokens_and_masks_keyed_by_the_task_parameters(tmp_path):
    def cfg(**task):
        c = load_config("mtp3", overrides={"data.cache_dir": str(tmp_path), "data.source": "task:pathstar"})
        c.data.task.update(dict(num_train=300, arm_length=3, **task))
        return c.data

    prepared = data.prepare(cfg(), show_progress=False)
    length = prepared.example_len
    assert length == 6 * 6 - 1 + 1 + 5 + 1 + 4 * 3 == 54  # 6 edges "uu>vv,", "/", "ss,gg", "=", 4 labels + "\n"
    assert len(prepared.train) == len(prepared.train_mask) == 300 * length
    problems = tasks.splits(tasks.from_config(cfg()), num_train=300, num_val=6, eval_problems=32, seed=0, split_seed=0)
    tokens, mask = tasks.pack(problems["train"], length)
    assert np.array_equal(prepared.train, tokens) and np.array_equal(prepared.train_mask, mask)
    assert data.prepare(cfg(), show_progress=False).directory == prepared.directory
    assert data.prepare(cfg(teacherless=True), show_progress=False).directory == prepared.directory
    assert data.prepare(cfg(degree=3), show_progress=False).directory != prepared.directory
    (prepared.directory / "val_mask.bin").unlink()  # a damaged cache is rebuilt, not used
    assert np.array_equal(data.prepare(cfg(), show_progress=False).val_mask, tasks.pack(problems["val"], length)[1])


def test_aligned_batch_starts_are_multiples_of_the_example_length():
    kw = dict(window_len=20, batch_size=64, seed=3, step=5)
    plain = data.global_batch_starts(1000, **kw)
    expected = np.random.default_rng([3, 5]).integers(0, 980, size=64, endpoint=True)
    assert np.array_equal(plain, expected)  # align=1 is the text sampler, unchanged
    aligned = data.global_batch_starts(1000, align=16, **kw)
    assert np.all(aligned % 16 == 0) and aligned.max() <= 980 and len(set(aligned)) > 20
    # Epoch mode: windows of 2 problems + 4 lookahead tokens; each problem is an input once.
    starts = np.concatenate(
        [
            data.global_batch_starts(16 * 40 + 4, window_len=36, batch_size=4, seed=0, step=s, num_epochs=1, align=16)
            for s in range(5)
        ]
    )
    assert sorted(starts.tolist()) == list(range(0, 16 * 40, 32))


# ------------------------------------------------------------------------------- the loss mask


def numpy_masked_cross_entropy(logits, targets, mask):
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    keep = mask > 0
    return nll[keep].mean(), (logits.argmax(-1) == targets)[keep].mean()


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_masked_cross_entropy_equals_numpy_reference(chunk_size):
    rng = np.random.default_rng(0)
    h, w = rng.normal(size=(2, 8, 16)).astype(np.float32), rng.normal(size=(16, 30)).astype(np.float32)
    targets, mask = rng.integers(0, 30, (2, 8)), rng.integers(0, 2, (2, 8)).astype(np.uint8)
    loss, accuracy = cross_entropy(jnp.asarray(h), jnp.asarray(w), jnp.asarray(targets), chunk_size, jnp.asarray(mask))
    expected_loss, expected_accuracy = numpy_masked_cross_entropy(h @ w, targets, mask)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(accuracy), expected_accuracy, atol=1e-7)


@pytest.fixture(scope="module")
def masked_batch():
    """A model with n = 3 linear heads and a packed polyarith window with its mask."""
    model = MTPModel(SHAPE, 3, "linear", rngs=nnx.Rngs(params=0))
    tokens, mask = tasks.pack(tasks.held_out(POLYARITH, 4, split_seed=0)["m1"], 24)
    return model, jnp.asarray(tokens.reshape(2, 48), jnp.int32), jnp.asarray(mask.reshape(2, 48))


def test_head_k_is_masked_by_the_mask_of_token_t_plus_k(masked_batch):
    model, window, mask = masked_batch
    t = window.shape[1] - 3
    graphdef, params = nnx.split(model)

    @jax.jit
    def loss_and_logits(params):
        model = nnx.merge(graphdef, params)
        h_trunk, _ = model.trunk(window[:, :t], jnp.broadcast_to(jnp.arange(t), (2, t)))
        matrices = [model.head_type.matrix(model, k) for k in (1, 2, 3)]
        logits = [model.decoder.final_norm(h_trunk) @ w for w in matrices]  # linear heads
        return mtp_loss(model, window, (1.0, 1.0, 1.0), mask=mask)[1], logits

    metrics, all_logits = loss_and_logits(params)
    for k, logits in zip((1, 2, 3), all_logits):
        logits = np.asarray(logits)
        expected, accuracy = numpy_masked_cross_entropy(
            logits, np.asarray(window[:, k : t + k]), np.asarray(mask[:, k : t + k])
        )
        np.testing.assert_allclose(float(metrics[f"loss_{k}"]), expected, rtol=1e-5)
        np.testing.assert_allclose(float(metrics[f"accuracy_{k}"]), accuracy, atol=1e-7)


def test_a_masked_target_changes_no_gradient(masked_batch):
    model, window, mask = masked_batch
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def grads(targets):  # the model reads `window`; only the targets vary
        def loss(p):
            return mtp_loss(nnx.merge(graphdef, p), targets, (1.0, 0.5, 0.25), mask=mask, inputs=window)[0]

        return jax.grad(loss)(params)

    masked_out = np.flatnonzero(np.asarray(mask[0]) == 0)[4]
    masked_in = np.flatnonzero(np.asarray(mask[0]))[0]
    base = jax.tree.leaves(grads(window))
    same = jax.tree.leaves(grads(window.at[0, masked_out].set(7)))
    assert all(np.array_equal(a, b) for a, b in zip(base, same))
    moved = jax.tree.leaves(grads(window.at[0, masked_in].set(7)))
    assert any(not np.allclose(a, b) for a, b in zip(base, moved))


def test_an_all_ones_mask_equals_no_mask(masked_batch):
    model, window, _ = masked_batch
    graphdef, params = nnx.split(model)
    metrics = jax.jit(lambda p, mask: mtp_loss(nnx.merge(graphdef, p), window, (1.0, 0.5, 0.25), mask=mask)[1])
    plain, ones = metrics(params, None), metrics(params, jnp.ones_like(window))
    for key in plain:
        np.testing.assert_allclose(float(ones[key]), float(plain[key]), rtol=1e-6)


def test_teacherless_inputs_hide_exactly_the_answer():
    tokens, mask = tasks.pack(tasks.held_out(PATHSTAR, 2, split_seed=0)["d3_l4"], 96)
    hidden = tasks.model_inputs(tokens, mask, teacherless=True)
    assert np.array_equal(hidden == ord("$"), mask == 1)
    assert np.array_equal(hidden[mask == 0], tokens[mask == 0])
    assert tasks.model_inputs(tokens, mask, teacherless=False) is tokens


# ------------------------------------------------------------------------------- task accuracy


def test_greedy_answers_are_the_kv_cache_decodes_and_teacherless_is_one_forward_pass():
    model = MTPModel(SHAPE, 2, "linear", rngs=nnx.Rngs(params=2))
    problems = tasks.held_out(PATHSTAR, 3, split_seed=0)["d3_l4"]
    generator = decoding.Generator(model, 100)  # one compiled program: every prompt pads to 100
    answers = evaluate.greedy_answers(generator, problems)
    for p, answer in zip(problems, answers):
        ids = generator.generate(list(p.prompt.encode()), len(p.answer) + 1).tokens
        assert answer == bytes(ids).decode("latin-1")
    # Teacherless: the answer's j-th token is head 1's greedy choice after prompt + j '$'s.
    hidden = evaluate.teacherless_answers(model, problems)
    for p, answer in zip(problems, hidden):
        assert len(answer) == len(p.answer) + 1
        for j in (0, 5, len(p.answer)):
            ids = generator.generate(list((p.prompt + "$" * j).encode()), 1).tokens
            assert answer[j] == chr(ids[0])


def test_task_accuracy_is_exact_match_broken_down_by_difficulty(monkeypatch):
    problems = tasks.held_out(POLYARITH, 4, split_seed=0)
    problems = {"m1": problems["m1"], "m6": problems["m6"]}
    right = {p.prompt for p in problems["m1"][:3] + problems["m6"][:1]}

    def fake_decode(generator, flat):  # right answers; wrong ones: a digit off, or no '\n' after it
        return [
            p.answer + "\n" if p.prompt in right else (p.answer + " ", "0" + p.answer[1:] + "\n")[i % 2]
            for i, p in enumerate(flat)
        ]

    monkeypatch.setattr(evaluate, "greedy_answers", fake_decode)
    config = ml_collections.ConfigDict({"data": task_config("task:polyarith")})
    result = evaluate.task_accuracy(None, config, problems, generator="unused")
    assert result == {"task_accuracy": 4 / 8, "task_accuracy_m1": 3 / 4, "task_accuracy_m6": 1 / 4}


# ------------------------------------------------------------------------------- training


def tiny_task(cache_dir, **overrides):
    return load_config(
        "mtp3",
        overrides={
            "data.cache_dir": cache_dir,
            "data.source": "task:polyarith",
            "data.task.max_train_ops": 2,
            "data.task.max_eval_ops": 3,
            "data.task.example_len": 16 * 2,
            "data.task.num_train": 2000,
            "data.task.eval_problems": 4,
            "eval_batches": 2,
            "sample_tokens": 0,
            "num_train_steps": 8,
            "log_every": 1,
            "eval_every": 4,
            "checkpoint_every": 4,
            **overrides,
        },
    )


def test_a_task_trains_sharded_resumes_exactly_and_logs_task_accuracy(tmp_path):
    cache = str(tmp_path / "cache")
    config = tiny_task(cache, **{"mesh.data": 2, "mesh.fsdp": 4})
    final = train.run(config, tmp_path / "run")
    events = read_metrics(tmp_path / "run")
    accuracy_keys = {"eval/task_accuracy", "eval/task_accuracy_m1", "eval/task_accuracy_m2", "eval/task_accuracy_m3"}
    assert accuracy_keys <= set(final) and all(0 <= final[k] <= 1 for k in accuracy_keys)
    assert [e["step"] for e in events if "eval/task_accuracy" in e] == [4, 8]
    losses = {e["step"]: e["train/loss_1"] for e in events if "train/loss_1" in e}
    assert all(np.isfinite(list(losses.values()))) and 0 < final["eval/accuracy_1"] <= 1

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")  # as if killed after saving step 4
    train.run(config, resumed)
    again = {e["step"]: e["train/loss_1"] for e in read_metrics(resumed) if "train/loss_1" in e}
    np.testing.assert_allclose([again[s] for s in range(5, 9)], [losses[s] for s in range(5, 9)], rtol=1e-6)

    # On any checkpoint: the restored model scores what training logged at its last evaluation.
    loaded = workdir.load(tmp_path / "run")
    assert evaluate.task_accuracy(loaded.model, loaded.config) == {k[len("eval/") :]: final[k] for k in accuracy_keys}


def test_bad_task_parameters_get_one_line(tmp_path):
    cases = {
        "data.task.degree=1 must be >= 2": {"data.source": "task:pathstar", "data.task.degree": 1},
        "num_labels=10 is too few": {"data.source": "task:pathstar", "data.task.num_labels": 10},
        "unknown task": {"data.source": "task:sorting"},
        "seq_len=32 must be a multiple": {"data.task.example_len": 0},
        "teacherless=True is defined for task:pathstar": {"data.task.teacherless": True},
        "max_eval_ops=1 must be >= ": {"data.task.max_eval_ops": 1},
        "mtp_n_tokens=9 exceeds": {"mtp_n_tokens": 9, "seq_len": 64},
    }
    for expected, overrides in cases.items():
        with pytest.raises(UserError, match=expected) as error:
            config_lib.validate(tiny_task(str(tmp_path), **overrides))
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_bad_task_parameters_exit_2_from_main_creating_nothing(tmp_path):
    # One case: every UserError takes the same way out of main (the messages are pinned above).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_jax.main",
            "--config=configs/mtp3.py:tiny",
            f"--workdir={tmp_path / 'w'}",
            "--config.data.source=task:pathstar",
            f"--config.data.cache_dir={tmp_path / 'cache'}",
            "--config.data.task.degree=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "data.task.degree=1 must be >= 2" in errors[0], errors
    assert not (tmp_path / "w").exists() and not (tmp_path / "cache").exists()
