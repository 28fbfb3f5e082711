"""Cheap drafts for a model you already have: Medusa heads, a draft vocabulary, self-distillation
targets and heads-only training on cached trunk outputs. Speculative decoding against plain greedy
decoding, draft logits against the full logits, targets against a numpy reference, and the cached
step's loss, gradients and updates against the step through the frozen trunk."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import sharding, train, train_step
from mtp_jax import workdir as workdir_lib
from mtp_jax.config import validate
from mtp_jax.data import TokenData
from mtp_jax.decoding import Generator
from mtp_jax.errors import UserError
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel, build_model, draft_vocabulary, mtp_loss
from mtp_jax.speculative import Tree
from mtp_jax.trunk_cache import TrunkCache, trunk_outputs
from tests.util import load_config, tiny_run, write_code

SHAPE = ModelShape(vocab_size=256, d_model=32, n_layers=2, n_heads=2, mlp_dim=64)
IDS = np.sort(np.random.default_rng(0).choice(256, 96, replace=False)).astype(np.int32)


def medusa_model(draft_vocab: int = 0, n: int = 4, seed: int = 0) -> MTPModel:
    """Medusa heads with random residual blocks (fresh ones are zero: every head would repeat head 1)."""
    model = MTPModel(SHAPE, n, "medusa", rngs=nnx.Rngs(params=seed), draft_vocab=draft_vocab)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 2 * (n - 1)))
    for head in model.heads:
        head.w[...] = 0.5 * jax.random.normal(next(keys), head.w.shape)
        head.b[...] = 0.5 * jax.random.normal(next(keys), head.b.shape)
    if draft_vocab:
        model.draft_vocab[...] = jnp.asarray(IDS[:draft_vocab])
    return model


@pytest.mark.parametrize("draft_vocab", [0, 96])
def test_speculative_with_medusa_heads_equals_greedy(draft_vocab):
    model = medusa_model(draft_vocab)
    generator = Generator(model, 48)
    tree = Tree(((0,), (1,), (0, 0), (2,), (0, 1), (0, 0, 0)))
    for prompt in ([7], [3, 1, 4, 1, 5, 9, 2, 6]):
        plain = generator.generate(prompt, 40).tokens
        assert generator.speculative(prompt, 40).tokens == plain
        assert generator.speculative(prompt, 40, tree=tree).tokens == plain


def test_draft_vocabulary_logits_are_the_full_logits_restricted_to_its_ids():
    full, restricted = medusa_model(0), medusa_model(96)  # the same parameters, one without the restriction
    h = jax.random.normal(jax.random.key(3), (2, 5, SHAPE.d_model))
    for k in (2, 3, 4):
        a, b = np.asarray(full.logits(k, h)), np.asarray(restricted.logits(k, h))
        np.testing.assert_allclose(b[..., IDS], a[..., IDS], rtol=1e-6, atol=1e-6)
        outside = np.setdiff1d(np.arange(SHAPE.vocab_size), IDS)
        assert np.all(b[..., outside] == -np.inf)
    np.testing.assert_array_equal(restricted.logits(1, h), full.logits(1, h))  # head 1 keeps every token


def test_a_model_prepared_for_decoding_drafts_as_the_model_does():
    model = medusa_model(96)
    prepared = model.for_decoding()  # what Generator decodes with: the draft columns gathered once
    np.testing.assert_array_equal(prepared.draft_matrix[...], np.asarray(model.decoder.unembedding_matrix())[:, IDS])
    assert not hasattr(model, "draft_matrix") and medusa_model(0).for_decoding().drafts_all_tokens
    h = jax.random.normal(jax.random.key(4), (2, 5, SHAPE.d_model))
    for k in (2, 3, 4):
        np.testing.assert_array_equal(prepared.logits(k, h), model.logits(k, h))
        np.testing.assert_array_equal(
            prepared.head_type.top_tokens(prepared, k, h, 3), model.head_type.top_tokens(model, k, h, 3)
        )


def test_self_distillation_targets_are_head_1s_argmax_at_t_plus_k_minus_1():
    """mtp_loss with targets='model': head k's loss is its cross-entropy against head 1's argmax
    at t + k - 1 (numpy, from each head's logits), over the positions where that exists and,
    with a draft vocabulary, lies in it."""
    model = medusa_model(96)
    window = jax.random.randint(jax.random.key(4), (2, 12 + 3), 0, 256)
    t = 12
    _, metrics = mtp_loss(model, window, (1.0, 1.0, 1.0, 1.0), targets="model")
    hidden = list(model.hidden_states(window, t))
    greedy = np.argmax(np.asarray(model.logits(1, hidden[0])), axis=-1)  # [B, T]
    for k in (2, 3, 4):
        logits = np.asarray(model.logits(k, hidden[k - 1]), np.float64)[:, : t - k + 1]  # [B, T - k + 1, V]
        targets = greedy[:, k - 1 :]
        keep = np.isin(targets, IDS)
        z = logits - logits.max(-1, keepdims=True)
        nll = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(metrics[f"loss_{k}"], nll[keep].mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics[f"accuracy_{k}"], (logits.argmax(-1) == targets)[keep].mean(), atol=1e-6)


@pytest.mark.parametrize("head_type", ["medusa", "sequential"])
def test_cached_trunk_outputs_give_the_same_loss_and_gradients(head_type):
    model = MTPModel(SHAPE, 3, head_type, rngs=nnx.Rngs(params=0), draft_vocab=96)
    graphdef, params = nnx.split(model, nnx.Param)
    window = jax.random.randint(jax.random.key(5), (2, 16 + 3), 0, 256)
    cached = trunk_outputs(graphdef, 0, params, window)

    def loss(heads, trunk):
        return mtp_loss(
            nnx.merge(graphdef, {**params, "heads": heads}), window, (1.0, 0.5, 0.25), targets="model", trunk=trunk
        )[0]

    through, grads = jax.value_and_grad(loss)(params["heads"], None)
    from_cache, cached_grads = jax.value_and_grad(loss)(params["heads"], cached)
    np.testing.assert_allclose(from_cache, through, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), cached_grads, grads)


def test_trunk_cache_runs_each_window_once_and_trains_as_the_trunk_would():
    """Two epochs of heads-only steps: with trunk_cache the trunk runs over each window once, and
    the parameters after every step equal those of the steps through the frozen trunk."""
    overrides = {
        "use_mtp": True,
        "mtp_n_tokens": 3,
        "mtp_head_type": "medusa",
        "mtp_targets": "model",
        "mtp_draft_vocab": 96,
        "trainable": "heads",
        "num_epochs": 2,
        "batch_size": 4,
    }
    plain, cached = (load_config("base", overrides={**overrides, "trunk_cache": c}) for c in (False, True))
    tokens = np.random.default_rng(6).integers(0, 256, 4 * (plain.seq_len + 3) * 2).astype(np.uint16)
    data = TokenData(tokens, tokens[:64], {"vocab_size": 256}, None)
    mesh = sharding.make_mesh(plain.mesh, jax.devices()[:1])
    steps = train.total_steps(plain, data)
    setups = [train_step.make_train_step(c, 256, mesh, steps) for c in (plain, cached)]
    states = [train.init_state(s, None, "", data) for s in setups]
    cache = TrunkCache(cached, data, setups[1].graphdef, mesh)
    for step in range(steps):
        (window,) = train.train_batch(plain, data, mesh, step)
        states[0], _ = setups[0].step_fn(states[0], window)
        states[1], _ = setups[1].step_fn(states[1], window, cache.batch(states[1]["params"], step, window))
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            *jax.device_get([s["params"] for s in states]),
        )
    assert steps == 4 and cache.computed == 8  # 2 epochs of 8 windows: each ran through the trunk once


def test_draft_vocabulary_is_the_most_frequent_tokens():
    tokens = np.array([5, 5, 5, 9, 9, 2, 2, 7, 1], np.uint16)
    np.testing.assert_array_equal(draft_vocabulary(tokens, 16, 3), [2, 5, 9])  # 2 beats 7 and 1 by count
    with pytest.raises(UserError, match="mtp_draft_vocab=17 exceeds"):
        draft_vocabulary(tokens, 16, 17)


def test_fresh_training_sets_the_draft_vocabulary_from_the_data():
    config = load_config(
        "base", overrides={"use_mtp": True, "mtp_n_tokens": 2, "mtp_head_type": "medusa", "mtp_draft_vocab": 4}
    )
    tokens = np.repeat(np.arange(8, dtype=np.uint16), [1, 9, 2, 8, 3, 7, 4, 6])
    data = TokenData(tokens, tokens, {"vocab_size": 256}, None)
    setup = train_step.make_train_step(config, 256, sharding.make_mesh(config.mesh, jax.devices()[:1]), 2)
    state = train.init_state(setup, None, "", data)
    np.testing.assert_array_equal(state["params"]["draft_vocab"], [1, 3, 5, 7])
    assert "draft_vocab" not in train_step.trainable_part(state["params"], "all")
    assert build_model(config, 256, seed=0).draft_vocab.shape == (4,)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mtp_targets": "teacher"}, "mtp_targets='teacher' is unknown"),
        ({"mtp_draft_vocab": 64}, "mtp_draft_vocab restricts the shared unembedding, which 'linear' heads do not use"),
        ({"mtp_draft_vocab": -1, "mtp_head_type": "medusa"}, "mtp_draft_vocab=-1 must be >= 0"),
        ({"trunk_cache": True, "num_epochs": 2}, "trunk_cache=True keeps a frozen trunk's outputs"),
        ({"trunk_cache": True, "trainable": "heads"}, "trunk_cache=True keeps a frozen trunk's outputs"),
    ],
)
def test_config_check_names_the_bad_field(overrides, message):
    config = load_config("mtp3", overrides=overrides)
    with pytest.raises(UserError, match=re.escape(message)):
        validate(config)


def test_heads_only_run_on_cached_trunk_outputs_trains_and_decodes(tmp_path):
    """The whole path: a run with every model and training option of configs/smollm2_heads.py on a
    tiny model (its data.train_extra: tests/test_data.py), then its workdir's heads draft with the
    saved draft vocabulary and reproduce greedy decoding."""
    corpus = write_code(tmp_path / "corpus.txt", body=lambda i: f"x + {i % 7}")
    config = load_config(
        "base",
        overrides={
            "use_mtp": True,
            "mtp_n_tokens": 3,
            "mtp_head_type": "sequential",
            "mtp_targets": "model",
            "mtp_draft_vocab": 40,
            "trainable": "heads",
            "trunk_cache": True,
            "num_epochs": 2,
            **tiny_run(corpus, tmp_path / "cache"),
        },
    )
    metrics = train.run(config, tmp_path / "run")
    assert np.isfinite(metrics["eval/loss_2"]) and "generate/mean_accepted" in metrics
    trained = workdir_lib.load(tmp_path / "run")
    tokens = np.asarray(trained.data().train)
    np.testing.assert_array_equal(trained.model.draft_vocab[...], draft_vocabulary(tokens, 256, 40))
    generator = Generator(trained.model, 64)
    prompt = tokens[:20].astype(int).tolist()
    assert generator.speculative(prompt, 40).tokens == generator.generate(prompt, 40).tokens
