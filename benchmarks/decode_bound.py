"""What bounds a decoding step on this machine: bytes per step against measured bandwidth, and
how a verify pass's cost grows with the tokens it checks.

    python benchmarks/decode_bound.py --workdir=runs/mtp4 [--repeats=5] [--new_tokens=128]

Prints one JSON object:
- bandwidth_gb_s: a jitted copy of a 512 MiB float32 array (bytes read + written per second),
  and the same for 32 MiB (an array that fits in this machine's L3 cache, as the nano model does);
- step_bytes: parameters a plain step reads (every decoder block and the unembedding) plus the
  KV cache it reads (all slots of every layer: attention masks, it does not skip);
- per_step_ms: the marginal time of one plain decoding step (the time of a long continuation
  minus a short one, over the extra steps), in float32 and with every weight in bfloat16;
- per_pass_ms: the same for verify passes of chains and Medusa trees of several sizes (the
  tree from the model's measured per-rank acceptance), greedy, with tokens per pass.
All timings are medians of `repeats` runs, interleaved across the configurations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import decoding, workdir  # noqa: E402
from mtp_jax.acceptance import build_tree  # noqa: E402
from mtp_jax.machine import cpu_model  # noqa: E402
from mtp_jax.mtp import MTPModel  # noqa: E402


def copy_bandwidth(mib: int, repeats: int) -> float:
    """GB/s of a jitted array copy (read + write) of `mib` MiB."""
    x = jnp.ones(mib * 2**18, jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - begin)
    return 2 * x.nbytes / np.median(times) / 1e9


def with_dtype(model: MTPModel, dtype: str) -> MTPModel:
    """The model with its parameters and compute in `dtype` (a copy)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    copy = nnx.merge(graphdef, state)
    shape = dataclasses.replace(model.decoder.shape, dtype=dtype, param_dtype=dtype)
    for _, module in nnx.iter_graph(copy):
        if isinstance(module, nnx.Module) and hasattr(module, "dtype"):
            module.dtype = jnp.dtype(dtype)
    copy.decoder.shape = shape
    return copy


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python benchmarks/decode_bound.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=128)
    args = p.parse_args(argv)

    trained = workdir.load(args.workdir)
    model, config, val, windows = trained.model, trained.config, trained.data().val, trained.tree_windows()
    capacity = config.seq_len
    shape = model.decoder.shape
    block_params = sum(x.size for x in jax.tree.leaves(nnx.state(model.decoder.blocks)))
    step_bytes = {
        "weights": 4 * (block_params + shape.d_model * shape.vocab_size),
        "kv_cache": 4 * 2 * shape.n_layers * capacity * shape.d_model,
    }

    trees = {"chain": None} | {f"tree{k}": build_tree(model, windows, k) for k in (8, 16, 32, 64)}
    generators = {
        "float32": decoding.Generator(model, capacity),
        "bfloat16": decoding.Generator(with_dtype(model, "bfloat16"), capacity),
    }
    prompt = np.asarray(val[: args.prompt_len]).astype(int).tolist()
    short = 16

    def run(name: str, new: int):
        if name in generators:
            return generators[name].generate(prompt, new)
        return generators["float32"].speculative(prompt, new, tree=trees[name])

    names = list(generators) + list(trees)
    for name in names:  # compile
        run(name, short)
    times = {(name, new): [] for name in names for new in (short, args.new_tokens)}
    passes = {}
    for _ in range(args.repeats):
        for name in names:
            for new in (short, args.new_tokens):
                begin = time.perf_counter()
                result = run(name, new)
                times[name, new].append(time.perf_counter() - begin)
                passes[name, new] = result.forward_passes
    marginal = {
        name: (np.median(times[name, args.new_tokens]) - np.median(times[name, short]))
        / (passes[name, args.new_tokens] - passes[name, short])
        * 1e3
        for name in names
    }
    out = {
        "cpu": cpu_model(),
        "bandwidth_gb_s": {"512MiB": copy_bandwidth(512, args.repeats), "32MiB": copy_bandwidth(32, args.repeats)},
        "step_bytes": step_bytes,
        "per_step_ms": {name: marginal[name] for name in generators},
        "per_pass_ms": {name: marginal[name] for name in trees},
        "tokens_per_pass": {
            name: (args.new_tokens - short) / (passes[name, args.new_tokens] - passes[name, short]) for name in trees
        },
        "pass_tokens": {name: (trees[name].size if trees[name] else model.n_predict) for name in trees},
        "bfloat16_same_greedy_tokens": run("bfloat16", args.new_tokens).tokens
        == run("float32", args.new_tokens).tokens,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
