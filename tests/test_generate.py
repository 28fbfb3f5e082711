"""Decoding: KV-cache steps against full recomputation, sampling seeds, self-speculative decoding
against plain greedy decoding (token for token), teacher-forced acceptance, and the CLI."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import decoding, export, generate, train, workdir
from mtp_jax.acceptance import build_tree, teacher_forced_acceptance
from mtp_jax.errors import UserError
from mtp_jax.heads import HEAD_TYPES
from mtp_jax.model import ModelShape
from mtp_jax.mtp import MTPModel
from mtp_jax.speculative import Tree
from tests.util import load_config, tiny_run, write_code

SHAPE = ModelShape(vocab_size=256, d_model=32, n_layers=2, n_heads=2, mlp_dim=64)


def random_model(head_type: str, n: int = 3, seed: int = 0) -> MTPModel:
    return MTPModel(SHAPE, n, head_type, rngs=nnx.Rngs(params=seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny n=3 'sequential' model trained briefly on a small repetitive code corpus, so that its
    heads accept some drafts and reject others."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_code(root / "corpus.txt", 400, lambda i: f"x + {i}")
    config = load_config(
        "base",
        overrides={
            "use_mtp": True,
            "mtp_n_tokens": 3,
            "mtp_head_type": "sequential",
            "num_train_steps": 30,
            "log_every": 30,
            "eval_every": 30,
            "checkpoint_every": 30,
            **tiny_run(corpus, root / "cache"),
        },
    )
    workdir = root / "run"
    metrics = train.run(config, workdir)
    return workdir, metrics


def full_forward_logits(model: MTPModel, tokens: list[int]) -> np.ndarray:
    """Head 1's logits at every position [T, V], recomputed from scratch without a cache: by
    causality, position i's are the logits after the prefix tokens[:i + 1]."""
    x = jnp.asarray([tokens], jnp.int32)
    decoder = model.decoder
    h, _ = decoder.run_blocks(decoder.embed(x), jnp.arange(len(tokens))[None], range(decoder.shape.n_layers))
    return np.asarray(decoder.final_norm(h[0]) @ decoder.unembedding_matrix())


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cached_decode_equals_full_recompute(head_type):
    """Each sampled token's log-probability from the cached device loop equals the one a full
    forward pass over the whole sequence, recomputed from scratch, gives it."""
    model = random_model(head_type)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    result = decoding.Generator(model, 24).generate(prompt, 12, temperature=1.0, seed=3)
    tokens = prompt + result.tokens
    assert len(result.tokens) == 12
    logits = full_forward_logits(model, tokens)[len(prompt) - 1 : -1]  # the logits each token was drawn from
    recomputed = jax.nn.log_softmax(logits)[np.arange(12), result.tokens]
    np.testing.assert_allclose(result.logprobs, recomputed, rtol=1e-4, atol=1e-5)


def test_sampling_is_reproducible_and_seeded():
    generator = decoding.Generator(random_model("linear"), 48)
    draw = lambda seed, **kw: generator.generate([7, 8, 9], 40, temperature=1.0, seed=seed, **kw).tokens  # noqa: E731
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    # top_k=1 and a tiny nucleus both leave only the most likely token: greedy decoding.
    greedy = generator.generate([7, 8, 9], 40).tokens
    assert draw(5, top_k=1) == greedy
    assert draw(5, top_p=1e-6) == greedy


def test_decoding_never_recompiles_per_token():
    generator = decoding.Generator(random_model("parallel"), 64)
    generator.generate([1, 2, 3], 5)
    generator.speculative([1, 2, 3], 5)
    compiled = generator.compilations()
    generator.generate([4, 5, 6, 7], 50)
    generator.speculative([4, 5, 6, 7], 50)
    assert compiled == generator.compilations() == 2  # one program per mode (same prompt bucket)


def assert_speculative_matches_greedy(
    generator: decoding.Generator, prompts, lengths, tree=None, lookup=0
) -> list[int]:
    accepted = []
    for prompt in prompts:
        for new in lengths:
            plain = generator.generate(prompt, new).tokens
            fast = generator.speculative(prompt, new, tree=tree, lookup=lookup)
            assert fast.tokens == plain, (prompt, new)
            assert len(plain) == min(new, generator.capacity - len(prompt))
            assert fast.forward_passes == 1 + len(fast.accepted)
            accepted += fast.accepted
    return accepted


# A branching tree over 3 draft heads: head 2's top three, head 3's top two, one deeper node.
TREE = Tree(((0,), (1,), (0, 0), (2,), (0, 1), (1, 0), (0, 0, 0)))


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_speculative_equals_greedy_random_weights(head_type):
    rng = np.random.default_rng(0)
    # Lengths include drafts running past max_new_tokens (1, 2) and decoding up to the cache's end.
    prompts = [rng.integers(0, 256, size).tolist() for size in (1, 30)]
    generator = decoding.Generator(random_model(head_type, n=4), 40)
    assert_speculative_matches_greedy(generator, prompts, (1, 2, 40))
    assert_speculative_matches_greedy(generator, prompts, (1, 2, 40), tree=TREE)


def test_speculative_accepts_drafts_of_heads_that_copy_head_1():
    """Linear heads equal to the unembedding draft head 1's next token again; greedy decoding of a
    random model falls into repeats, so drafts are accepted there and rejected elsewhere."""
    model = random_model("linear", n=3, seed=2)
    for head in model.heads:
        head[...] = model.decoder.unembedding[...]
    generator = decoding.Generator(model, 96)
    accepted = assert_speculative_matches_greedy(generator, [[1, 2, 3], [200, 100]], (5, 90))
    assert 0 < np.mean(np.asarray(accepted) > 0) < 1
    shallow = Tree(tuple(path for path in TREE.paths if len(path) <= 2))  # two draft heads here
    in_tree = assert_speculative_matches_greedy(generator, [[1, 2, 3], [200, 100]], (5, 90), tree=shallow)
    assert np.mean(in_tree) >= np.mean(accepted)


@pytest.mark.parametrize("head_type", ["linear", "sequential"])
def test_context_drafts_equal_greedy_and_copy_past_the_heads(head_type):
    """With --lookup, passes whose context repeats verify copied drafts (a random model's greedy
    output falls into loops, and one prompt repeats itself), longer than the heads' chain, and
    after copies accepted whole in a row, copies of two and four times the rows."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, 30).tolist(), [5, 6, 7, 8] * 6, [9]]
    generator = decoding.Generator(random_model(head_type, n=3), 96)
    accepted = assert_speculative_matches_greedy(generator, prompts, (1, 2, 95), lookup=6)
    assert {6, 13, 27} <= set(accepted)  # whole copies of 7, 14 and 28 rows (two draft heads propose 2)
    with pytest.raises(UserError, match="verified greedily"):
        generator.speculative(prompts[0], 8, temperature=0.5, lookup=6)
    with pytest.raises(UserError, match="not a tree"):
        generator.speculative(prompts[0], 8, tree=TREE, lookup=6)


def test_speculative_equals_greedy_trained(trained):
    loaded = workdir.load(trained[0])
    model = loaded.model
    prompts = [list(b"def f1"), list(b"    return x"), list(b"\n\ndef f3")]
    generator = decoding.Generator(model, 32)
    accepted = assert_speculative_matches_greedy(generator, prompts, (3, 16, 32))
    assert np.mean(accepted) > 0  # the trained heads do get drafts accepted
    # The tree built from the heads' measured per-rank acceptance (Medusa's construction).
    tree = build_tree(model, loaded.tree_windows(), 6)
    assert tree.size == 7 and not tree.is_chain and tree.max_depth <= 2
    in_tree = assert_speculative_matches_greedy(generator, prompts, (3, 16, 32), tree=tree)
    assert np.mean(in_tree) > np.mean(accepted)
    assert_speculative_matches_greedy(generator, prompts, (3, 16, 32), lookup=4)


def test_teacher_forced_acceptance_matches_numpy():
    model = random_model("sequential", n=3, seed=1)
    window = jax.random.randint(jax.random.key(0), (2, 13), 0, 256)
    graphdef, params = nnx.split(model, nnx.Param)
    got = teacher_forced_acceptance(graphdef, 4, params, window)
    # Reference: each head's argmax from the (uncached) training forward, compared in numpy.
    t = 10
    positions = jnp.broadcast_to(jnp.arange(t), (2, t))
    h_trunk, _ = model.trunk(window[:, :t], positions)
    h, greedy = h_trunk, []
    for k in (1, 2, 3):
        h, _ = model.head_hidden(k, h_trunk, h, window[:, k - 1 : t + k - 1], positions)
        greedy.append(np.argmax(np.asarray(model.decoder.final_norm(h) @ model.head_type.matrix(model, k)), -1))
    a2 = greedy[1][:, :9] == greedy[0][:, 1:]
    a3 = greedy[2][:, :8] == greedy[0][:, 2:]
    np.testing.assert_allclose(float(got["acceptance_2"]), a2.mean(), atol=1e-6)
    np.testing.assert_allclose(float(got["acceptance_3"]), a3.mean(), atol=1e-6)
    np.testing.assert_allclose(float(got["mean_accepted"]), 1 + a2[:, :8].mean() + (a2[:, :8] & a3).mean(), atol=1e-6)


def test_training_logs_acceptance(trained):
    workdir, metrics = trained
    assert 0 <= metrics["generate/acceptance_2"] <= 1 and 0 <= metrics["generate/acceptance_3"] <= 1
    assert 1 <= metrics["generate/mean_accepted"] <= 3
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("generate/acceptance_3" in entry for entry in logged)


def test_cli_json_output(trained, capsys):
    workdir, _ = trained
    generate.main([f"--workdir={workdir}", "--prompt=def f1", "--max_new_tokens=12", "--speculative", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 12 and len(out["acceptance"]) == 2
    assert out["forward_passes"] <= 12 and out["mean_accepted"] >= 1
    generate.main([f"--workdir={workdir}", "--prompt=def f1", "--max_new_tokens=12", "--json"])
    plain = json.loads(capsys.readouterr().out)
    assert plain["text"] == out["text"] and plain["mean_accepted"] == 1.0 and plain["forward_passes"] == 12
    generate.main(
        [f"--workdir={workdir}", "--prompt=def f1", "--max_new_tokens=12", "--speculative", "--tree_size=4", "--json"]
    )
    tree = json.loads(capsys.readouterr().out)
    assert tree["text"] == out["text"] and len(tree["tree"]) == 4 and tree["forward_passes"] <= 12
    generate.main(
        [f"--workdir={workdir}", "--prompt=def f1", "--max_new_tokens=12", "--speculative", "--lookup=5", "--json"]
    )
    copied = json.loads(capsys.readouterr().out)
    assert copied["text"] == out["text"] and copied["forward_passes"] <= 12


def test_cli_sampled_speculative_reports_alpha(trained, capsys):
    workdir, _ = trained
    generate.main(
        [
            f"--workdir={workdir}",
            "--prompt=def f1",
            "--max_new_tokens=12",
            "--speculative",
            "--temperature=0.8",
            "--top_k=20",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 12 and len(out["alpha"]) == 2 and out["alpha"][0] is not None
    assert 0 <= out["alpha"][0] <= 1 and 1 <= out["alpha_predicted_mean_accepted"] <= 3


def test_generate_and_export_need_neither_the_corpus_nor_its_cache(trained, tmp_path, capsys):
    """Plain and tree decoding (its tree fitted on the validation windows the workdir keeps) give
    the same tokens, and the same tree, with the corpus and its data cache gone."""
    run_dir, _ = trained
    argv = [f"--workdir={run_dir}", "--prompt=def f1", "--max_new_tokens=12", "--json"]
    tree_argv = [*argv, "--speculative", "--tree_size=4"]

    def decode(args) -> tuple:
        generate.main(args)
        out = json.loads(capsys.readouterr().out)
        return out["text"], out.get("tree")

    expected, expected_tree = decode(argv), decode(tree_argv)
    assert expected_tree[1] is not None and expected_tree[0] == expected[0]
    # A workdir written before training kept the windows fits them on the corpus, as before.
    no_windows = tmp_path / "no_windows"
    shutil.copytree(run_dir, no_windows)
    (no_windows / workdir.DATA / workdir.VAL_WINDOWS).unlink()
    assert decode([f"--workdir={no_windows}", *tree_argv[1:]]) == expected_tree
    root = run_dir.parent
    moved = [(root / name, tmp_path / name) for name in ("cache", "corpus.txt")]
    for here, away in moved:
        here.rename(away)
    try:
        assert decode(argv) == expected and decode(tree_argv) == expected_tree
        folder, _ = export.export(str(run_dir), str(tmp_path / "hf"))
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == 256
        assert (folder / "model.safetensors").stat().st_size > 0
        assert "drop --tree_size" in cli_error(capsys, [f"--workdir={no_windows}", *tree_argv[1:]])
    finally:
        for here, away in moved:
            away.rename(here)
    (no_windows / workdir.DATA / workdir.VAL_WINDOWS).write_bytes(b"\x93NUMPY damaged")
    assert "val_windows.npy is damaged" in cli_error(capsys, [f"--workdir={no_windows}", *tree_argv[1:]])
    # A workdir that lost its data/ folder is refused in one line naming it.
    lost = tmp_path / "lost"
    shutil.copytree(run_dir, lost)
    shutil.rmtree(lost / workdir.DATA)
    assert "data/meta.json is missing" in cli_error(capsys, [f"--workdir={lost}", *argv[1:]])


def cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_cli_errors(trained, tmp_path, capsys):
    workdir, _ = trained
    assert "no checkpoint" in cli_error(capsys, [f"--workdir={tmp_path}", "--prompt=x"])
    assert "cache holds 32" in cli_error(capsys, [f"--workdir={workdir}", "--prompt=" + "x" * 40])
    assert "tree verification is greedy" in cli_error(
        capsys, [f"--workdir={workdir}", "--prompt=x", "--speculative", "--tree_size=4", "--temperature=1"]
    )
    assert "add --speculative" in cli_error(capsys, [f"--workdir={workdir}", "--prompt=x", "--tree_size=4"])
    speculative = [f"--workdir={workdir}", "--prompt=x", "--speculative"]
    assert "add --speculative" in cli_error(capsys, [f"--workdir={workdir}", "--prompt=x", "--lookup=4"])
    assert "must be >= 0" in cli_error(capsys, [*speculative, "--lookup=-1"])
    assert "not a tree" in cli_error(capsys, [*speculative, "--lookup=4", "--tree_size=4"])
    assert "verified greedily" in cli_error(capsys, [*speculative, "--lookup=4", "--temperature=0.5"])
    assert "--workdir" in cli_error(capsys, ["--prompt=x"])


def test_speculative_on_a_model_without_heads_is_refused():
    with pytest.raises(UserError, match="no extra heads"):
        decoding.Generator(MTPModel(SHAPE, 1, "linear", rngs=nnx.Rngs(params=0)), 16).speculative([1], 4)
