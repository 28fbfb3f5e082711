"""Loss-weight schedules and the head curriculum: closed-form values, bit-identity of the constant
schedule with fixed weights, and exact resume of a scheduled run."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import schedules, train
from mtp_jax.config import validate
from mtp_jax.errors import UserError
from mtp_jax.metrics import read_metrics
from mtp_jax.mtp import MTPModel, loss_weights, mtp_loss
from tests.test_mtp import SHAPE, random_window, split
from tests.util import load_config

STEPS = 100


def config_with(**fields):
    config = load_config("mtp4")
    config.update(fields)
    return config


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # mtp_weight 0.3 -> 0.1, switch 0.5 (step 50) of 100 steps.
        ("constant", {0: 0.3, 50: 0.3, 99: 0.3}),
        ("stepped", {0: 0.3, 49: 0.3, 50: 0.1, 99: 0.1}),
        ("linear", {0: 0.3, 50: 0.3, 75: 0.2, 90: 0.3 - 0.2 * 0.8, 100: 0.1}),
        ("cosine", {0: 0.3, 50: 0.3, 60: 0.3 - 0.2 * 0.5 * (1 - math.cos(0.2 * math.pi)), 75: 0.2, 100: 0.1}),
    ],
)
def test_mtp_weight_schedules_match_closed_form(schedule, expected):
    config = config_with(mtp_weight=0.3, mtp_weight_final=0.1, mtp_weight_switch=0.5, mtp_weight_schedule=schedule)
    traced = jax.jit(lambda s: schedules.head_weights(config, s, STEPS))
    for step, weight in expected.items():
        np.testing.assert_allclose(float(schedules.mtp_weight(config, step, STEPS)), weight, rtol=1e-6)
        # Geometric w_k = 0.5, 0.25, 0.125 on heads 2 … 4; eager and traced agree.
        np.testing.assert_allclose(
            np.asarray(traced(jnp.int32(step))), [1.0, 0.5 * weight, 0.25 * weight, 0.125 * weight], rtol=1e-6
        )


@pytest.mark.parametrize(
    "curriculum,first_step_on,last_step_on",
    [
        # n = 4, fraction 0.6 of 100 steps: three stages of 20 steps.
        ("forward", {2: 20, 3: 40, 4: 60}, {2: 99, 3: 99, 4: 99}),
        ("reverse", {2: 0, 3: 0, 4: 0}, {2: 59, 3: 39, 4: 19}),
        ("none", {2: 0, 3: 0, 4: 0}, {2: 99, 3: 99, 4: 99}),
    ],
)
def test_curriculum_switches_heads_on_and_off_in_order(curriculum, first_step_on, last_step_on):
    config = config_with(mtp_curriculum=curriculum, mtp_curriculum_fraction=0.6)
    on = np.stack([np.asarray(schedules.head_weights(config, s, STEPS)) > 0 for s in range(STEPS)])  # [steps, n]
    assert on[:, 0].all()  # head 1 always trains
    for k in (2, 3, 4):
        steps_on = np.flatnonzero(on[:, k - 1])
        assert (steps_on[0], steps_on[-1], len(steps_on)) == (
            first_step_on[k],
            last_step_on[k],
            last_step_on[k] - first_step_on[k] + 1,
        )


@pytest.mark.parametrize("scheme", ["mean", "0.7,0.2,0.1"])  # weights that round in float32
def test_constant_schedule_gives_todays_loss_and_gradients_bit_for_bit(scheme):
    config = config_with(mtp_weight=0.3, mtp_loss_weights=scheme, mtp_curriculum="none", mtp_weight_schedule="constant")
    graphdef, params = split(MTPModel(SHAPE, 4, "linear", rngs=nnx.Rngs(params=0)))
    window = random_window(4, seed=3)

    def fixed(p):
        return mtp_loss(nnx.merge(graphdef, p), window, loss_weights(config))[0]

    def scheduled(p, step):
        return mtp_loss(nnx.merge(graphdef, p), window, schedules.head_weights(config, step, STEPS))[0]

    loss, grads = jax.jit(jax.value_and_grad(fixed))(params)
    for step in (0, 57):
        loss_s, grads_s = jax.jit(jax.value_and_grad(scheduled))(params, jnp.int32(step))
        assert float(loss_s) == float(loss)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("mtp_weight_schedule", "exp", "mtp_weight_schedule='exp' is unknown"),
        ("mtp_curriculum", "sideways", "mtp_curriculum='sideways' is unknown"),
        ("mtp_weight_switch", 1.5, "mtp_weight_switch=1.5 must be a fraction"),
        ("mtp_curriculum_fraction", -0.1, "mtp_curriculum_fraction=-0.1 must be a fraction"),
        ("mtp_weight_final", -1.0, "mtp_weight_final=-1.0 must be >= 0"),
    ],
)
def test_bad_schedule_settings_are_refused_naming_the_field(field, value, message):
    with pytest.raises(UserError, match=message):
        validate(config_with(**{field: value}))


def test_scheduled_run_resumes_exactly_and_logs_the_weights(tmp_path):
    """A forward curriculum and a stepped weight, stopped after step 10 of 20 and resumed, log the
    losses and weights of the uninterrupted run; the logged weights are the closed-form ones."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)))
    config = load_config(
        "mtp3",
        overrides={
            "num_train_steps": 20,
            "log_every": 1,
            "eval_every": 20,
            "checkpoint_every": 10,
            "eval_batches": 1,
            "sample_tokens": 0,
            "data.cache_dir": str(tmp_path / "cache"),
            "data.source": str(corpus),
            "data.val_fraction": 0.1,
            "mtp_weight_schedule": "stepped",
            "mtp_weight_switch": 0.75,
            "mtp_curriculum": "forward",
            "mtp_curriculum_fraction": 0.5,
        },
    )
    workdir = tmp_path / "run"
    train.run(config, workdir)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")  # as if stopped after saving step 10
    train.run(config, resumed)

    def logged(run, key):
        return {e["step"]: e[key] for e in read_metrics(run) if key in e}

    for key in ("train/loss_1", "train/loss_3", "train/total_loss", "train/head_weight_2", "train/head_weight_3"):
        original, again = logged(workdir, key), logged(resumed, key)
        assert sorted(again) == list(range(1, 21))
        assert [again[s] for s in range(11, 21)] == [original[s] for s in range(11, 21)], key
    # The metrics at logged step s come from the update at step index s - 1. Head 2 joins at
    # round(5) = 5, head 3 at 10; mtp_weight 0.2 -> 0.1 at step 15; geometric w = 0.5, 0.25.
    weights = logged(workdir, "train/head_weight_2"), logged(workdir, "train/head_weight_3")
    expect = {
        s: (
            0.0 if s - 1 < 5 else 0.5 * (0.2 if s - 1 < 15 else 0.1),
            0.0 if s - 1 < 10 else 0.25 * (0.2 if s - 1 < 15 else 0.1),
        )
        for s in range(1, 21)
    }
    np.testing.assert_allclose(
        [(weights[0][s], weights[1][s]) for s in range(1, 21)], [expect[s] for s in range(1, 21)], rtol=1e-6
    )
    mtp_weight = logged(workdir, "train/mtp_weight")
    np.testing.assert_allclose([mtp_weight[s] for s in (15, 16)], [0.2, 0.1], rtol=1e-6)
