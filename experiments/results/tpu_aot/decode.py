"""Regenerates decode.json and decode.md: one decoding step compiled for one TPU chip ahead of time.

    python experiments/results/tpu_aot/decode.py [--only=1b,8b] [--chips=v5e:1x1,…] [--sizes=1,16,64,256] [--render]

For the 1b and 8b presets with n = 4 linear heads (bfloat16 parameters and compute, as served),
`mtp_jax.tpu_decode.decode_config` compiles on each chip, at a full KV cache of the preset's seq_len:
one plain decoding step at each batch in --sizes, and one greedy verify pass of the chain of 3
drafts and of a tree of each size (the bodies of generate's device loops), and records the
compiler's memory and the roofline's floor on its time (mtp_jax/tpu.py). The predicted speedup of
self-speculative decoding over plain decoding of one sequence is tokens per pass × plain step
floor ÷ verify pass floor, with tokens per pass borrowed from a model measured elsewhere (each
source in ACCEPTANCE gives its own column): those depend on how well the heads predict, which this
compilation cannot know.

Rows already in decode.json are kept (the script resumes); --render only rewrites decode.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import runpy

import jax

from mtp_jax import tpu, tpu_decode
from mtp_jax.machine import cpu_model

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PRESETS = ("1b", "8b")
CHIPS = ("v5e:1x1", "v5p:1x1x1", "v6e:1x1")
SIZES = (1, 16, 64, 256)
# Whose tokens per verify pass a prediction borrows: (label, a benchmarks/decoding.py JSON of greedy
# chain and tree decoding on held-out code). The nano model is byte-level and its greedy outputs
# repetitive, which flatters acceptance.
ACCEPTANCE = [
    ("nano byte model (repetitive output)", HERE.parent / "decoding" / "nano_n4_linear_five_modes_idle_xeon.json"),
    (
        "SmolLM2-135M with 3 sequential heads (BPE, held-out code)",
        HERE.parent / "smollm2_heads" / "decoding_float32.json",
    ),
]


def config_for(preset: str):
    config = runpy.run_path(str(ROOT / "configs" / "base.py"))["get_config"](preset)
    config.use_mtp, config.mtp_n_tokens, config.mtp_head_type = True, 4, "linear"
    config.model.dtype = config.model.param_dtype = "bfloat16"
    return config


def run(presets, chips, sizes, results: dict, save) -> None:
    for name in chips:
        topology = tpu.topology_name(name)
        devices = tpu.devices(topology)
        for preset in presets:
            config = config_for(preset)
            for pass_name, tree, batch in tpu_decode.decode_passes(config, sizes):
                key = f"{topology} {preset} {pass_name}"
                if key in results:
                    continue
                row = tpu_decode.decode_config(config, topology, devices, pass_name, tree, batch)
                results[key] = {**row, "preset": preset, "load_average": os.getloadavg()[0]}
                print(f"{key}: {row['step_time_s']} s, compiled in {row['compile_s']:.0f} s", flush=True)
                save()


def tokens_per_pass(path: pathlib.Path) -> dict:
    """Tokens per verify pass measured greedily: the chain's and a tree's, and that tree's size; and
    how repetitive the greedy outputs were (zlib ratio, against the true continuations')."""
    m = json.loads(path.read_text())
    return {
        "chain": m["chain"]["mean_accepted"],
        "tree": m["tree"]["mean_accepted"],
        "tree_size": m["tree_size"],
        "zlib": m["plain"]["output_compression_ratio"],
        "truth_zlib": m["truth_compression_ratio"],
    }


def crossover_tokens(row: dict) -> float:
    """Tokens per pass where the pass turns compute-bound, extrapolated from one memory-bound row:
    its FLOPs grow with its tokens, its bytes (parameters and cache) hardly at all."""
    return row["tokens"] * row["hbm_s"] / row["compute_s"]


def borrowed_speedup(row: dict, ratio: float | None, measured: dict) -> str:
    """Tokens per pass of `measured` ÷ the pass's cost in plain steps, for the chain and the tree
    size it was measured at; '' for other passes."""
    per_pass = (
        measured["chain"]
        if row["pass"].startswith("verify chain")
        else measured["tree"]
        if row["pass"] == f"verify tree of {measured['tree_size']}"
        else None
    )
    return f"{per_pass / ratio:.2f}×" if per_pass and ratio else ""


def render(results: dict, meta: dict) -> str:
    sources = [(label, path, tokens_per_pass(path)) for label, path in ACCEPTANCE]
    borrowed = "; ".join(
        f"{label}: {m['chain']:.2f} for the chain, {m['tree']:.2f} for a tree of {m['tree_size']}, "
        f"its greedy outputs' zlib ratio {m['zlib']:.2f} against the true continuations' "
        f"{m['truth_zlib']:.2f} ([{path.name}](../{path.parent.name}/{path.name}))"
        for label, path, m in sources
    )
    lines = [
        "# Decoding compiled for one TPU chip ahead of time: bounds on a step, and borrowed acceptance",
        "",
        "`python experiments/results/tpu_aot/decode.py` compiles one decoding step of the 1b and 8b presets "
        "with n = 4 linear heads (bfloat16 parameters and compute) for one chip of each kind, at a full "
        "KV cache of the preset's seq_len, on abstract inputs: plain decoding (one token for each of "
        "`batch` sequences) and one greedy verify pass of one sequence (the chain of 3 drafts, 4 tokens; "
        "a tree of 16, 64 or 256 drafted nodes, 17, 65 or 257 tokens). One chip's rows are "
        "`python -m mtp_jax.bench --config=configs/base.py:PRESET --config.use_mtp=True "
        "--config.mtp_n_tokens=4 --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 "
        "--topology=CHIP --decode=1,16,64,256` (which leaves out, with a notice, the passes whose "
        "parameters and cache alone exceed the chip; this script compiles them, and the compiler refuses).",
        "",
        f"JAX {meta['jax']}, libtpu {meta['libtpu']}, Python {meta['python']}; compiled on {meta['cpu']}.",
        "",
        "From the compiler: memory, whether it fits, XLA's FLOPs and the bytes of the program's arguments. "
        "From formulas: pass time ≥ max(FLOPs / peak, bytes / HBM bandwidth), the roofline's floor "
        "(mtp_jax/tpu.py), with every parameter and cache entry the step uses read once as its bytes (the "
        "compiled program's arguments; its cache updates are in place); a real pass is slower by the "
        "kernels' distance from peak bandwidth and by the sampling and bookkeeping around the matmuls. "
        "XLA's own bytes-accessed count is in decode.json but not used: on TPU it also counts the weights' "
        "prefetch into on-chip memory and the reads from there.",
        "",
        "**Predicted speedup** = tokens per pass × plain step floor (batch 1) ÷ verify pass floor: a "
        "prediction from two borrowed inputs, not a measurement. Tokens per pass are not the 1b's or 8b's "
        "own (no model of that size has been trained here); each column borrows them from one measured "
        "model, greedily on held-out code: " + borrowed + ". Outputs more repetitive than the text (a "
        "lower zlib ratio) are easier to draft: a model whose outputs are not would likely accept fewer, "
        "and the speedup scales with its tokens per pass.",
        "",
    ]
    for chip_name in CHIPS:
        topology = tpu.topology_name(chip_name)
        chip = tpu.chip_of(topology)
        for preset in PRESETS:
            rows = [r for r in results.values() if r["topology"] == topology and r["preset"] == preset]
            if not rows:
                continue
            plain = next((r for r in rows if r["pass"] == "plain, batch 1"), None)
            lines += [
                f"## {preset} on {topology} ({chip.hbm_bytes / tpu.GiB:.0f} GiB, "
                f"{chip.peak_flops / 1e12:.0f} TFLOP/s, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s)",
                "",
                "| pass | tokens | GiB | fits | GFLOP | HBM GB | compute ms | HBM ms | pass ms ≥ | bound "
                "| × plain step | "
                + " | ".join(f"predicted speedup, acceptance of the {label}" for label, _, _ in sources)
                + " |",
                "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(sources),
            ]
            for r in rows:
                if r["step_time_floor_s"] is None:
                    lines.append(
                        f"| {r['pass']} | {r['tokens']} | > {r['bytes_per_chip'] / tpu.GiB:.1f} | **no** "
                        "(the compiler refuses) | | | | | | | |" + " |" * len(sources)
                    )
                    continue
                ratio = (
                    r["step_time_floor_s"] / plain["step_time_floor_s"]
                    if plain and plain["step_time_floor_s"]
                    else None
                )
                lines.append(
                    f"| {r['pass']} | {r['tokens']} | {r['bytes_per_chip'] / tpu.GiB:.1f} | "
                    f"{'yes' if r['fits'] else '**no**'} | {r['flops'] / 1e9:.0f} | {r['hbm_bytes'] / 1e9:.2f} | "
                    f"{1e3 * r['compute_s']:.2f} | {1e3 * r['hbm_s']:.2f} | {1e3 * r['step_time_floor_s']:.2f} | "
                    f"{r['bound']} | "
                    + (f"{ratio:.2f}" if ratio else "")
                    + " | "
                    + " | ".join(borrowed_speedup(r, ratio, m) for _, _, m in sources)
                    + " |"
                )
            memory_bound = [
                r
                for r in rows
                if r["step_time_floor_s"] is not None and r["bound"] == "memory" and r["pass"].startswith("verify")
            ]
            if memory_bound:
                largest = max(memory_bound, key=lambda r: r["tokens"])
                lines += [
                    "",
                    f"Memory-bound up to about {crossover_tokens(largest):.0f} tokens per pass "
                    f"(extrapolated from the {largest['tokens']}-token pass: FLOPs grow with tokens, bytes "
                    "hardly); a plain step's batch counts the same way, but each sequence adds its own "
                    "cache to the bytes.",
                ]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--chips", default=",".join(CHIPS), help="comma-separated one-chip topologies")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="plain batches and tree sizes")
    parser.add_argument("--render", action="store_true", help="only rewrite decode.md from decode.json")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    path = HERE / "decode.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    results = stored.get("rows", {})
    meta = stored.get("meta") or {
        "jax": jax.__version__,
        "libtpu": importlib.metadata.version("libtpu"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
    }

    def save():
        path.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
        (HERE / "decode.md").write_text(render(results, meta))

    if not args.render:
        run(args.only.split(","), args.chips.split(","), [int(s) for s in args.sizes.split(",")], results, save)
    save()


if __name__ == "__main__":
    main()
