"""Importing checkpoints trained elsewhere (hf.py, hf_config.py): small randomly initialised
Llama, Qwen2 and Mistral models built by transformers, 12 layers with grouped-query attention,
give transformers' own logits, and again after exporting back, with heads of every type; text is
tokenized with the model's own tokenizer, which the workdir keeps."""

import json

import numpy as np
import pytest
import tokenizers

from mtp_jax import data as data_lib
from mtp_jax import export, hf, hf_files, train
from mtp_jax import workdir as workdir_lib
from mtp_jax.data import EOT
from mtp_jax.errors import UserError
from mtp_jax.heads import HEAD_TYPES
from tests.test_hf import (
    config_for,
    export_model,
    head1_logits,
    import_model,
    params_of,
    tiny_run_config,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, LAYERS = 96, 12
TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 24))
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 10_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # head size 8: one band each
ARCHITECTURES = {  # name: (config class, model class, config fields)
    "llama_untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
    ),
    "llama_tied_head_dim": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "head_dim": 12}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3}),
    "linear_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
}


def save_model(path, name: str, **overrides):
    """A randomly initialised transformers model of ARCHITECTURES[name] (12 layers, d=32, 4
    query and 2 key/value heads), saved by save_pretrained, its biases non-zero."""
    config_class, model_class, fields = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        **{**fields, **overrides},
    )
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)  # initialised to 0: a mapping error would not show
    model.save_pretrained(path)
    return path


def transformers_logits(folder, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_transformers_models_import_and_export_with_equal_logits(tmp_path, name):
    folder = save_model(tmp_path / name, name)
    expected = transformers_logits(folder, TOKENS)
    model = import_model(folder)
    assert model.decoder.shape.n_layers == LAYERS and model.decoder.shape.kv_heads == 2
    np.testing.assert_allclose(head1_logits(model, TOKENS), expected, atol=1e-4)

    out = export_model(model, hf.configure(config_for(init_from=str(folder))), tmp_path / "exported")
    np.testing.assert_allclose(transformers_logits(out, TOKENS), expected, atol=1e-4)
    reimported = params_of(import_model(out))
    for path, value in hf._flatten(params_of(model)):
        np.testing.assert_array_equal(hf._get(reimported, path), value)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_imported_model_with_heads_exports_head1_as_transformers_model(tmp_path, head_type):
    """Heads added to an imported Qwen2 model (biases, tied, norm_eps 1e-6) with llama3 RoPE
    export under this package's names; transformers reads head 1, which is the original model."""
    folder = save_model(tmp_path / "qwen2", "qwen2", rope_parameters=LLAMA3, rms_norm_eps=1e-5)
    model = import_model(folder, 3, head_type)
    out = export_model(model, hf.configure(config_for(3, head_type, init_from=str(folder))), tmp_path / "out")
    np.testing.assert_allclose(transformers_logits(out, TOKENS), transformers_logits(folder, TOKENS), atol=1e-4)
    mtp = json.loads((out / hf_files.MTP_FILE).read_text())
    assert mtp["mtp_head_type"] == head_type and mtp["heads"]
    assert all(
        name.startswith(("extra_heads.", f"model.layers.{LAYERS}.", f"model.layers.{LAYERS + 1}."))
        for name in mtp["heads"]
    )
    reimported = params_of(import_model(out, 3, head_type))
    for path, value in hf._flatten(params_of(model)):
        np.testing.assert_array_equal(hf._get(reimported, path), value)


def test_sliding_window_shorter_than_seq_len_is_refused_in_one_line(tmp_path):
    folder = save_model(tmp_path / "mistral", "mistral", sliding_window=16)
    with pytest.raises(UserError, match="sliding window of 16 tokens, shorter than seq_len=256") as error:
        hf.configure(config_for(init_from=str(folder), seq_len=256))
    assert "\n" not in str(error.value)
    assert hf.configure(config_for(init_from=str(folder), seq_len=16)).model.n_layers == LAYERS


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "sets rope_type='yarn'"),
        ("rope_parameters", {"rope_theta": 1e4, "partial_rotary_factor": 0.5}, "sets partial_rotary_factor=0.5"),
        ("hidden_act", "gelu", "sets hidden_act='gelu'"),
        ("attention_bias", True, "sets attention_bias=True"),
        ("architectures", ["GemmaForCausalLM"], "describes a GemmaForCausalLM, which does not map onto this model"),
    ],
)
def test_what_the_model_does_not_implement_is_refused_by_name(tmp_path, field, value, expected):
    folder = save_model(tmp_path / "llama", "llama_untied")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UserError, match=expected):
        hf.open_folder(folder)


def test_init_from_tokenizes_text_with_the_models_tokenizer_and_keeps_it_with_the_layers_in_order(
    code_corpus, tmp_path
):
    folder = save_model(tmp_path / "llama", "llama_untied")
    text = (code_corpus / "corpus.txt").read_text()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [text], tokenizers.trainers.BpeTrainer(vocab_size=VOCAB - 6, special_tokens=["[UNK]", EOT])
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    workdir = tmp_path / "run"
    train.run(tiny_run_config(code_corpus, trainable="heads", init_from=str(folder)), workdir)  # data.tokenizer: 'byte'

    trained = workdir_lib.load(workdir)
    assert trained.config.data.tokenizer == str(folder / "tokenizer.json") and trained.config.data.vocab_size == VOCAB
    kept = tokenizers.Tokenizer.from_file(str(trained.data_dir / "tokenizer.json"))
    assert kept.get_vocab() == tokenizer.get_vocab() and tokenizer.get_vocab_size() < VOCAB
    assert trained.tokenizer().encode("def f7(x):") == tokenizer.encode("def f7(x):").ids
    assert (trained.meta["tokenizer_file"], trained.meta["eot_id"]) == (
        str(folder / "tokenizer.json"),
        tokenizer.token_to_id(EOT),
    )
    data = data_lib.prepare(trained.config.data, show_progress=False)
    assert data.vocab_size == VOCAB and data.train[:50].tolist() == tokenizer.encode(text).ids[:50]
    # The frozen trunk, loaded back from the workdir's checkpoint: its 12 layers by their index.
    np.testing.assert_allclose(head1_logits(trained.model, TOKENS), transformers_logits(folder, TOKENS), atol=1e-4)
    export.main([f"--workdir={workdir}", f"--out={tmp_path / 'exported'}"])
    assert (tmp_path / "exported" / "tokenizer.json").read_bytes() == (trained.data_dir / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["eos_token_id"] == tokenizer.token_to_id(EOT)
