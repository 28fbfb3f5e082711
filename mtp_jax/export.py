"""Export a trained workdir as a Hugging Face folder (Llama, or Qwen2 for a model with query, key and
value biases), heads included (layout: hf.py).

    python -m mtp_jax.export --workdir=DIR --out=DIR

`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads the result with no code of ours (its
logits are head 1's); `--config.init_from=OUT` reads it back, heads and all. The workdir's newest
checkpoint that loads is exported (workdir.load); --out must not exist or be empty. A model trained
with model.scan_layers exports the same folder as the same model trained without.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
from flax import nnx

from mtp_jax import hf, workdir
from mtp_jax.cli import ArgumentParser, fail
from mtp_jax.compilation_cache import use_compilation_cache
from mtp_jax.errors import UserError
from mtp_jax.model import unstack_layers


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m mtp_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir (its newest checkpoint is exported)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    return p.parse_args(argv)


def export(run_dir: str, out: str) -> tuple[pathlib.Path, int]:
    """Writes the folder; returns its path and the step exported. Refuses a non-empty --out before
    reading anything."""
    out_path = pathlib.Path(out).expanduser()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise UserError(f"--out={out} already exists and is not empty: pass a new folder (nothing was overwritten)")
    trained = workdir.load(run_dir)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(trained.model, nnx.Param)))
    if trained.model.decoder.n_stacked:  # model.scan_layers: hf.py's layout names one layer at a time
        params = unstack_layers(params)
    tokenizer = trained.meta.get("tokenizer")  # 'byte', 'bpe', or None for a token-file dataset
    hf.write_folder(
        out_path, params, trained.model.decoder.shape, trained.config, data_dir=trained.data_dir, tokenizer=tokenizer
    )
    return out_path, trained.step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    use_compilation_cache()
    try:
        out, step = export(args.workdir, args.out)
    except UserError as e:
        fail(str(e))
    print(
        f"wrote {out} from step {step} of {args.workdir} (load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained, or train from it with --config.init_from={out})"
    )


if __name__ == "__main__":
    main()
