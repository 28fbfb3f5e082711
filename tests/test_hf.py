"""Hugging Face interop (hf.py, hf_files.py, export.py, --config.init_from), grouped-query
attention and heads-only training: logits against transformers' LlamaForCausalLM, byte-exact round
trips, frozen parameters, and bad folders. No network: transformers models are built from a config."""

import functools
import json
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec as P

from mtp_jax import decoding, export, hf, hf_files, sharding, train, train_step
from mtp_jax import workdir as workdir_lib
from mtp_jax.checkpoint import Checkpointer
from mtp_jax.errors import UserError
from mtp_jax.heads import HEAD_TYPES
from mtp_jax.mtp import MTPModel, build_model, mtp_loss
from mtp_jax.speculative import Tree
from tests.util import ROOT, load_config, tiny_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256


def llama_folder(path, n_kv_heads=2, tie=False, seed=0, **overrides):
    """A randomly initialised LlamaForCausalLM (2 layers, d=64, 4 heads) saved by transformers."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        **overrides,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def transformers_logits(folder, tokens: np.ndarray) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def head1_logits(model: MTPModel, tokens: np.ndarray) -> np.ndarray:
    """Head 1's logits [B, T, V]: the decoder's layers, final norm and unembedding."""
    decoder = model.decoder
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h, _ = decoder.run_blocks(decoder.embed(jnp.asarray(tokens)), positions, range(decoder.shape.n_layers))
    return np.asarray(decoder.final_norm(h) @ decoder.unembedding_matrix())


def config_for(n=1, head_type="linear", **overrides):
    return load_config("base", overrides={"use_mtp": n > 1, "mtp_n_tokens": n, "mtp_head_type": head_type, **overrides})


def import_model(folder, n=1, head_type="linear") -> MTPModel:
    """Our model with the folder's shape and every tensor it holds (the rest from seed 1)."""
    config, opened = hf.configure(config_for(n, head_type, init_from=str(folder))), hf.open_folder(folder)
    make = functools.partial(build_model, config, opened.config["vocab_size"], seed=1)
    model = nnx.eval_shape(make)  # no random draws where every parameter comes from the folder
    loaded = hf.read_params(opened, nnx.to_pure_dict(nnx.state(model, nnx.Param)), n, head_type)
    if n > 1 and opened.heads is None:
        model = make()
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, loaded)
    nnx.update(model, state)
    return model


def params_of(model: MTPModel) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def export_model(model: MTPModel, config, out):
    hf.write_folder(out, params_of(model), model.decoder.shape, config, data_dir=None, tokenizer="byte")
    return out


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))


@pytest.mark.parametrize("n_kv_heads, tie", [(4, False), (2, False), (1, True)])
def test_transformers_llama_imports_with_equal_logits(tmp_path, n_kv_heads, tie):
    folder = llama_folder(tmp_path / "llama", n_kv_heads=n_kv_heads, tie=tie)
    model = import_model(folder)
    assert model.decoder.shape.kv_heads == n_kv_heads and model.decoder.shape.tie_embeddings == tie
    np.testing.assert_allclose(head1_logits(model, TOKENS), transformers_logits(folder, TOKENS), atol=1e-4)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_export_loads_in_transformers_and_round_trips_byte_exact_with_heads(tmp_path, head_type):
    config = config_for(3, head_type, **{"model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2})
    model = build_model(config, VOCAB, seed=0)
    first = export_model(model, config, tmp_path / "first")
    np.testing.assert_allclose(transformers_logits(first, TOKENS), head1_logits(model, TOKENS), atol=1e-4)

    imported = import_model(first, 3, head_type)
    jax.tree.map(np.testing.assert_array_equal, params_of(imported), params_of(model))  # heads included
    second = export_model(imported, config, tmp_path / "second")
    a, b = (safetensors.numpy.load_file(f / hf_files.WEIGHTS) for f in (first, second))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert (first / hf_files.WEIGHTS).read_bytes() == (second / hf_files.WEIGHTS).read_bytes()
    mtp = json.loads((first / hf_files.MTP_FILE).read_text())
    assert (mtp["mtp_head_type"], mtp["mtp_n_tokens"], mtp["loss_weights"]) == (head_type, 3, [1.0, 0.1, 0.05])
    assert set(mtp["heads"]) == set(a) - set(
        safetensors.numpy.load_file(
            export_model(
                MTPModel(model.decoder.shape, 1, head_type, rngs=nnx.Rngs(0)), config_for(), tmp_path / "trunk"
            )
            / hf_files.WEIGHTS
        )
    )


def workdir_holding(model: MTPModel, config, path):
    """A workdir whose one checkpoint (step 0) holds `model`, written as training writes one."""
    (path / workdir_lib.DATA).mkdir(parents=True)
    (path / workdir_lib.DATA / "meta.json").write_text(json.dumps({"tokenizer": "byte"}))
    (path / "config.json").write_text(json.dumps({**json.loads(config.to_json_best_effort()), "vocab_size": VOCAB}))
    checkpointer = Checkpointer(path / "checkpoints", 1)
    checkpointer.save(0, {"params": params_of(model), "step": jnp.zeros((), jnp.int32)})
    checkpointer.wait()
    checkpointer.close()
    return path


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_scanned_layers_export_and_import_as_the_per_layer_model(tmp_path, head_type):
    """12 layers (two-digit indices, which a checkpoint stores as strings) trained with
    model.scan_layers export the same files, byte for byte, as the same model without, and both as
    the model in memory; --config.init_from stacks them back exactly."""
    shape = {"model.d_model": 16, "model.n_heads": 2, "model.mlp_dim": 32, "model.n_layers": 12}
    folders = {}
    for scan in (False, True):
        config = config_for(3, head_type, **shape, **{"model.scan_layers": scan})
        run = workdir_holding(build_model(config, VOCAB, seed=0), config, tmp_path / f"run{scan}")
        folders[scan], _ = export.export(str(run), str(tmp_path / f"hf{scan}"))
    in_memory = export_model(build_model(config_for(3, head_type, **shape), VOCAB, seed=0), config, tmp_path / "mem")
    assert (in_memory / hf_files.WEIGHTS).read_bytes() == (folders[False] / hf_files.WEIGHTS).read_bytes()
    names = sorted(f.name for f in folders[False].iterdir())
    assert names == sorted(f.name for f in folders[True].iterdir()) and hf_files.WEIGHTS in names
    assert all((folders[False] / f).read_bytes() == (folders[True] / f).read_bytes() for f in names)
    assert "model.layers.11.mlp.down_proj.weight" in safetensors.numpy.load_file(folders[True] / hf_files.WEIGHTS)

    config = config_for(3, head_type, **shape, **{"model.scan_layers": True, "init_from": str(folders[False])})
    imported = hf.read_for_training(config, types.SimpleNamespace(meta={"tokenizer": "byte"}, vocab_size=VOCAB))
    scanned = params_of(build_model(config, VOCAB, seed=0))
    assert jax.tree.structure(imported) == jax.tree.structure(scanned)
    # As train.init_state puts them in place of another seed's parameters.
    other = nnx.to_pure_dict(nnx.state(build_model(config, VOCAB, seed=1), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(hf.with_imported(other, imported)), scanned)


def test_n_kv_heads_equal_to_n_heads_is_the_model_without_it():
    window = jnp.asarray(TOKENS[:, :12])
    losses = [
        mtp_loss(
            build_model(config_for(3, "parallel", **{"model.n_kv_heads": kv}), VOCAB, seed=0), window, (1.0, 0.1, 0.05)
        )[1]
        for kv in (0, 4)
    ]
    assert jax.device_get(losses[0]) == jax.device_get(losses[1])


def test_gqa_cached_and_speculative_decoding_match_full_forward():
    """With 2 key/value heads for 4 query heads, the [B·N_kv, S, H] cache decodes the tokens a
    full forward pass picks, and self-speculative decoding (a chain, a tree under its attention
    mask, context drafts) the same tokens."""
    config = config_for(2, "sequential", **{"model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 2})
    model = build_model(config, VOCAB, seed=0)
    generator = decoding.Generator(model, 32)
    assert decoding.init_caches(model, 1, 32, all_heads=True)[0]["k"].shape == (2, 32, 16)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    tokens = generator.generate(prompt, 10).tokens
    # By causality, the full forward pass's argmax at each position is the greedy token after it.
    logits = head1_logits(model, np.asarray([prompt + tokens]))[0]
    assert tokens == np.argmax(logits[len(prompt) - 1 : -1], axis=-1).tolist()
    assert generator.speculative(prompt, 10).tokens == tokens
    assert generator.speculative(prompt, 10, tree=Tree(((0,), (1,), (2,)))).tokens == tokens
    assert generator.speculative(prompt, 10, lookup=4).tokens == tokens


def test_gqa_shardings_are_valid_when_kv_heads_do_not_divide_the_tensor_axis():
    """wk, wv with 2 heads on a tensor axis of 4 are replicated along it (and still place)."""
    config = config_for(
        3,
        "parallel",
        **{
            "model.d_model": 64,
            "model.n_heads": 4,
            "model.n_kv_heads": 2,
            "mesh.data": 1,
            "mesh.tensor": 4,
            "mesh.fsdp": 2,
        },
    )
    mesh = sharding.make_mesh(config.mesh)
    params = nnx.state(build_model(config, VOCAB, seed=0), nnx.Param)
    shardings = sharding.param_shardings(nnx.to_pure_dict(params), sharding.logical_axes(params), mesh)
    attn = shardings["decoder"]["blocks"][0]["attn"]
    assert attn["wq"].spec == P("fsdp", "tensor", None) and attn["wk"].spec == P("fsdp", None, None)
    placed = jax.device_put(nnx.to_pure_dict(params), shardings)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed), jax.device_get(nnx.to_pure_dict(params)))


def periodic_windows(steps: int, batch: int, length: int) -> np.ndarray:
    """[steps, B, length] windows of the sequence x[i] = 7 i mod 256 at random offsets: each
    token determines the next ones, so heads on a frozen random trunk can learn them."""
    starts = np.random.default_rng(0).integers(0, VOCAB, (steps, batch, 1))
    return ((starts + np.arange(length)) * 7 % VOCAB).astype(np.int32)


# A Medusa head only re-weighs the frozen unembedding's directions, which on this random model
# hardly separate tokens: it learns, but not 0.5 nats in 12 steps (tests/test_draft_heads.py
# checks its loss and gradients).
@pytest.mark.parametrize("head_type", [h for h in HEAD_TYPES if h != "medusa"])
def test_heads_only_training_freezes_all_but_heads_and_the_heads_learn(head_type):
    config = config_for(3, head_type, trainable="heads", learning_rate=1e-2, warmup_steps=1, batch_size=8)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])  # one device: the fastest compile
    setup = train_step.make_train_step(config, VOCAB, mesh, 12)
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    before = jax.device_get(state["params"])
    # Optimizer state exists for the heads only.
    assert jax.tree.structure(state["opt_state"][1][0].mu) == jax.tree.structure({"heads": before["heads"]})
    losses = []
    for window in periodic_windows(12, 8, config.seq_len + 3):
        state, metrics = setup.step_fn(state, sharding.global_batch(window, mesh))
        losses.append(jax.device_get(metrics))
    after = jax.device_get(state["params"])
    jax.tree.map(np.testing.assert_array_equal, after["decoder"], before["decoder"])  # bit-identical
    assert all(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(after["heads"]), jax.tree.leaves(before["heads"]))
        if a.ndim >= 2
    )
    for k in (2, 3):
        assert losses[-1][f"loss_{k}"] < losses[0][f"loss_{k}"] - 0.5, (k, losses[0], losses[-1])


def tiny_run_config(corpus, **overrides):
    return config_for(
        3,
        "linear",
        **{
            "num_train_steps": 6,
            "log_every": 3,
            "eval_every": 6,
            "checkpoint_every": 3,
            **tiny_run(corpus / "corpus.txt", corpus / "cache"),
            **overrides,
        },
    )


def saved_params(workdir) -> dict:
    return workdir_lib.load(workdir).model


def test_init_from_a_transformers_folder_trains_heads_then_exports_them(code_corpus, tmp_path):
    """A model saved by transformers gets our heads: train.run imports it, trains heads only, and
    the exported folder holds the untouched trunk plus the heads; a resume ignores init_from."""
    folder = llama_folder(tmp_path / "llama")
    workdir = tmp_path / "run"
    train.run(tiny_run_config(code_corpus, trainable="heads", init_from=str(folder)), workdir)
    model = saved_params(workdir)
    reference = import_model(folder)
    jax.tree.map(np.testing.assert_array_equal, params_of(model)["decoder"], params_of(reference)["decoder"])

    out = tmp_path / "exported"
    export.main([f"--workdir={workdir}", f"--out={out}"])
    np.testing.assert_allclose(transformers_logits(out, TOKENS), transformers_logits(folder, TOKENS), atol=1e-5)
    heads = json.loads((out / hf_files.MTP_FILE).read_text())["heads"]
    assert heads == ["extra_heads.0.weight", "extra_heads.1.weight"]
    jax.tree.map(np.testing.assert_array_equal, params_of(import_model(out, 3, "linear")), params_of(model))

    # Resuming with more steps: the checkpoint wins over init_from (here another model of that shape).
    other = llama_folder(tmp_path / "other", seed=1)
    train.run(tiny_run_config(code_corpus, trainable="heads", init_from=str(other), num_train_steps=9), workdir)
    assert Checkpointer(workdir / "checkpoints", 3).latest_step() == 9
    resumed = params_of(saved_params(workdir))
    jax.tree.map(np.testing.assert_array_equal, resumed["decoder"], params_of(model)["decoder"])


def bad_folder(tmp_path, case: str):
    folder = llama_folder(tmp_path / case)
    config = json.loads((folder / "config.json").read_text())
    if case == "no config":
        (folder / "config.json").unlink()
    elif case == "no weights":
        (folder / hf_files.WEIGHTS).unlink()
    elif case == "architecture":
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GemmaForCausalLM"]}))
    elif case == "shape":
        (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    elif case == "rope scaling":
        (folder / "config.json").write_text(
            json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0}})
        )
    elif case == "vocabulary":
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    elif case == "tokenizer":
        import tokenizers

        vocab = {f"w{i}": i for i in range(VOCAB + 44)}
        tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder


BAD = {
    "no config": "has no config.json",
    "no weights": "has no weights (model.safetensors missing)",
    "architecture": "describes a GemmaForCausalLM, which does not map onto this model",
    "shape": "has shape [96, 64] but its config.json implies [128, 64]",
    "rope scaling": "sets rope_type='yarn', which this model does not implement",
    "vocabulary": "has a vocabulary of 300 but the data's 'byte' tokenizer has 256",
    "tokenizer": "has 300 tokens but the model's vocab_size is 256",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_init_from_folder_is_one_line_and_writes_nothing(code_corpus, tmp_path, case):
    folder = bad_folder(tmp_path, case)
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=re.escape(BAD[case])) as error:
        train.run(tiny_run_config(code_corpus, init_from=str(folder)), workdir)
    assert "\n" not in str(error.value)
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.slow
def test_command_lines_refuse_bad_folders_with_exit_2(tmp_path):
    folder = bad_folder(tmp_path, "no config")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    runs = {
        "has no config.json": [
            "mtp_jax.main",
            "--config=configs/mtp4.py:tiny",
            f"--workdir={tmp_path / 'w'}",
            f"--config.init_from={folder}",
        ],
        "is not empty": ["mtp_jax.export", f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'full'}"],
    }
    for expected, args in runs.items():
        result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"
