"""Regenerates results.json and results.md: the train step compiled ahead of time for TPU pods.

    python experiments/results/tpu_aot/run.py [--only=PRESET,…] [--topologies=v5e-256,…] [--render]

For each preset (nano_125m, 350m, 1b, 8b), MTP setting (baseline, linear n = 4, parallel n = 4,
sequential n = 2) and topology (v5e-256, v5p-128, v6e-256), `mtp_jax.tpu_plan.topology_config`
compiles the real train step for the topology's chips on abstract inputs (libtpu; no TPU attached) in
bfloat16 compute with float32 parameters and scanned layers, and records what it needs per chip
and the roofline's step time (mtp_jax/tpu.py).

Mesh: the baseline tries the fsdp-major meshes (data 1, tensor as small as the batch allows, then
twice that) and keeps the fastest that fits; each MTP setting starts from its baseline's mesh and
moves on to the other only if it does not fit there. Where no mesh fits, the row is compiled once
more with model.remat=True. A batch smaller than the chips can split (nano_125m's 32 sequences
over 256 chips with at most 4-way tensor parallelism) is raised to one sequence per chip, and the
row says so.

Rows already in results.json are kept (the script resumes); --render only rewrites results.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import runpy
import time

import jax

from mtp_jax import tpu, tpu_plan
from mtp_jax.flops import vocab_size
from mtp_jax.machine import cpu_model

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PRESETS = ("1b", "8b", "350m", "nano_125m")  # in the order they are compiled
SETTINGS = {  # name: (use_mtp, mtp_n_tokens, mtp_head_type)
    "baseline": (False, 1, "linear"),
    "linear n=4": (True, 4, "linear"),
    "parallel n=4": (True, 4, "parallel"),
    "sequential n=2": (True, 2, "sequential"),
}
TOPOLOGIES = ("v5e-256", "v5p-128", "v6e-256")
# How a row's HBM bytes were counted: rows compiled since bench reads the program's HBM traffic carry
# it; the earlier ones have only the floor (tpu_plan.pod_bounds is recomputed from either at render).
HBM_TRAFFIC = "the program's HBM traffic, loops x trips"
HBM_STATE_ONCE = "floor: the state and batch read and the state written once"


def config_for(preset: str, setting: str, batch_size: int | None = None):
    config = runpy.run_path(str(ROOT / "configs" / "base.py"))["get_config"](preset)
    config.use_mtp, config.mtp_n_tokens, config.mtp_head_type = SETTINGS[setting]
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    if batch_size is not None:
        config.batch_size = batch_size
    return config


def fsdp_major(config, chips: int, count: int = 2) -> list[tuple[int, int, int]]:
    """The first `count` data=1 meshes by tensor size, or [] if the batch divides over none."""
    return sorted((m for m in tpu_plan.mesh_candidates(config, chips) if m[0] == 1), key=lambda m: m[2])[:count]


def compile_row(config, topology: str, devices, meshes: list[tuple[int, int, int]], keep_first_fit: bool) -> dict:
    """Compile on each mesh in turn; stop at the first that fits if keep_first_fit, else keep the
    fastest that fits. If none fits, once more with remat on the first mesh."""
    tried = []
    for mesh in meshes:
        tried.append(tpu_plan.topology_config(tpu_plan.with_mesh(config, *mesh), topology, devices))
        tried[-1]["load_average"] = os.getloadavg()[0]
        print(
            f"  {tried[-1]['name']} mesh {mesh}: {tried[-1]['bytes_per_chip'] / tpu.GiB:.1f} GiB, "
            f"step time >= {tried[-1]['step_time_floor_s']} s, compiled in {tried[-1]['compile_s']:.0f} s",
            flush=True,
        )
        if tried[-1]["fits"] and keep_first_fit:
            break
    fitting = [r for r in tried if r["fits"]]
    if not fitting:
        remat = config.copy_and_resolve_references()
        remat.model.remat = True
        tried.append(tpu_plan.topology_config(tpu_plan.with_mesh(remat, *meshes[0]), topology, devices))
        tried[-1]["load_average"] = os.getloadavg()[0]
        tried[-1]["remat"] = True
        fitting = [r for r in tried[-1:] if r["fits"]]
    best = (
        min(fitting, key=lambda r: r["step_time_floor_s"]) if fitting else min(tried, key=lambda r: r["bytes_per_chip"])
    )
    return {
        **best,
        "remat": best.get("remat", False),
        "hbm_counted": HBM_TRAFFIC,
        "tried": [
            {
                "mesh": r["mesh"],
                "remat": r.get("remat", False),
                "bytes_per_chip": r["bytes_per_chip"],
                "fits": r["fits"],
                "step_time_floor_s": r["step_time_floor_s"],
                "compile_s": r["compile_s"],
            }
            for r in tried
        ],
    }


def run(presets, topologies, results: dict, save, baseline_meshes: int = 2) -> None:
    chips_of = {name: tpu.devices(tpu.topology_name(name)) for name in topologies}
    for preset in presets:
        for name in topologies:
            topology, devices = tpu.topology_name(name), chips_of[name]
            base_mesh = None
            for setting in SETTINGS:
                key = f"{name} {preset} {setting}"
                config = config_for(preset, setting)
                meshes = fsdp_major(config, len(devices), baseline_meshes)
                if not meshes:  # raise the batch to one sequence per chip
                    config = config_for(preset, setting, batch_size=len(devices))
                    meshes = fsdp_major(config, len(devices), baseline_meshes)
                if key in results:
                    base_mesh = base_mesh or tuple(results[key]["mesh"].values())
                    continue
                print(f"{key}: batch {config.batch_size}", flush=True)
                if setting == "baseline":
                    row = compile_row(config, topology, devices, meshes, keep_first_fit=False)
                    base_mesh = tuple(row["mesh"].values())
                else:
                    order = [base_mesh] + [m for m in meshes if m != base_mesh] if base_mesh else meshes
                    row = compile_row(config, topology, devices, order, keep_first_fit=True)
                results[key] = {
                    **row,
                    "accelerator_type": name,
                    "preset": preset,
                    "setting": setting,
                    "batch_size": config.batch_size,
                    "seq_len": config.seq_len,
                }
                save()


def recompile(keys: list[str], results: dict, save) -> None:
    """Compile the rows `keys` of results.json again on the mesh (and remat) they chose, so that they
    carry what the current tpu_plan.topology_config reads from the program (HBM traffic, collective
    latency); the record of the meshes tried before is kept."""
    for key in keys:
        row = results[key]
        name, topology = row["accelerator_type"], tpu.topology_name(row["accelerator_type"])
        config = config_for(row["preset"], row["setting"], row["batch_size"])
        config.model.remat = row["remat"]
        print(f"{key}: again, mesh {tuple(row['mesh'].values())}", flush=True)
        new = tpu_plan.topology_config(
            tpu_plan.with_mesh(config, *row["mesh"].values()), topology, tpu.devices(topology)
        )
        tried = [
            {**t, "step_time_floor_s": new["step_time_floor_s"], "compile_s": new["compile_s"]}
            if t["mesh"] == row["mesh"] and t["remat"] == row["remat"]
            else t
            for t in row["tried"]
        ]
        results[key] = {
            **new,
            "load_average": os.getloadavg()[0],
            "remat": row["remat"],
            "hbm_counted": HBM_TRAFFIC,
            "tried": tried,
            "accelerator_type": name,
            "preset": row["preset"],
            "setting": row["setting"],
            "batch_size": row["batch_size"],
            "seq_len": row["seq_len"],
        }
        save()


def with_bounds(row: dict) -> dict:
    """The row with tpu_plan.pod_bounds recomputed from its compiled numbers (HBM bytes, collective
    bytes and latency; a row without recorded latency counts none), so that every row's bounds come
    from the current formulas and chip table."""
    if row.get("refused_by_compiler"):
        return row
    config = config_for(row["preset"], row["setting"], row["batch_size"])
    config.model.remat = row["remat"]
    chip = tpu.chip_of(tpu.topology_name(row["accelerator_type"]))
    return {
        **row,
        **tpu_plan.pod_bounds(
            config,
            vocab_size(config),
            chip,
            row["chips"],
            row["hbm_bytes_per_chip"],
            sum(row["collective_bytes_per_chip"].values()),
            row["ici_latency_s"] or 0.0,
        ),
        "ici_latency_s": row["ici_latency_s"],
    }


def ms_range(seconds: list[float]) -> str:
    return f"{1e3 * seconds[0]:.0f}-{1e3 * seconds[1]:.0f}"


def key_numbers(results: dict) -> list[str]:
    """The answers the table exists for, in words, and what is not compiled yet."""
    lines = ["## Key numbers", ""]
    gib = lambda r: f"{r['bytes_per_chip'] / tpu.GiB:.1f} GiB"  # noqa: E731
    mesh = lambda r: "data {} × fsdp {} × tensor {}".format(*r["mesh"].values())  # noqa: E731
    for key, r in results.items():
        if r.get("refused_by_compiler"):
            lines.append(f"- {key}: does not fit (temporaries alone over {gib(r)}).")
            continue
        latency = (
            "no latency recorded"
            if r["ici_latency_s"] is None
            else f"{1e3 * r['ici_latency_s']:.0f} ms of it assumed latency"
        )
        split = (
            f"compute {1e3 * r['compute_s']:.0f} ms, HBM {1e3 * r['hbm_s']:.0f} ms"
            f"{'' if r['hbm_counted'] == HBM_TRAFFIC else ' (floor)'}, collectives {1e3 * r['ici_s']:.0f} ms, "
            f"{latency}"
        )
        largest = r["largest_collective"]
        where = "the layer loop" if "while" in largest["from"] else "the step"
        expected = [100 * m for m in r["expected_mfu_range"]]
        lines.append(
            f"- {key}: {'fits' if r['fits'] else '**does not fit**'} at {gib(r)} per chip with "
            f"{mesh(r)}{' and remat' if r['remat'] else ''} ({len(r['tried'])} mesh(es) compiled); "
            f"step time ≥ {1e3 * r['step_time_floor_s']:.0f} ms ({split}), MFU ≤ "
            f"{100 * r['mfu_ceiling']:.0f} %, HFU ≤ {100 * r['hfu_ceiling']:.0f} %; expected "
            f"{ms_range(r['expected_step_time_s_range'])} ms, MFU {expected[0]:.0f}-{expected[1]:.0f} %; "
            f"largest collective {largest['op']} {largest['bytes'] / 1e9:.2f} GB per chip per step "
            f"({largest['count']} × in `{largest['from'].split('/')[-1]}` of {where})"
            f"; this mesh compiled in {r['compile_s']:.0f} s wall"
            + (f" ({r['compile_cpu_s']:.0f} CPU-seconds)" if "compile_cpu_s" in r else "")
            + f" at load average {r['load_average']:.0f} on the 2 cores."
        )
    missing = [
        f"{name} {preset} {setting}"
        for preset in PRESETS
        for name in TOPOLOGIES
        for setting in SETTINGS
        if f"{name} {preset} {setting}" not in results
    ]
    if missing:
        lines += [
            "",
            f"Not compiled yet ({len(missing)} rows; `run.py` resumes where results.json stops): "
            + ", ".join(missing)
            + ".",
        ]
    return lines


def method(meta: dict, results: dict) -> list[str]:
    """How the rows were made, and which of their numbers are compiled and which are formulas."""
    traffic = [k for k, r in results.items() if r.get("hbm_counted") == HBM_TRAFFIC]
    return [
        "`python experiments/results/tpu_aot/run.py` (this directory's run.py) compiles the real train step",
        "(`train_step.make_train_step`, what `main` runs) for each topology's chips on a CPU-only machine with",
        "libtpu, on abstract inputs, in bfloat16 compute with float32 parameters and optimizer state, scanned",
        "layers, the presets' batch and sequence length and 'auto' attention (blockwise on TPU). One row",
        "is `python -m mtp_jax.bench --config=configs/base.py:PRESET --topology=TOPOLOGY "
        "--config.model.dtype=bfloat16 --config.model.scan_layers=True --config.mesh.data=… "
        "--config.mesh.fsdp=… --config.mesh.tensor=…` (plus the MTP setting).",
        "",
        f"JAX {meta['jax']}, libtpu {meta['libtpu']}, Python {meta['python']}; compiled on {meta['cpu']} "
        f"({meta['cores']} cores, shared with other work: the load average at each compile is in "
        "results.json).",
        "",
        "**From the compiler** (exact for the compiled program): memory per chip (state, batch and "
        "temporaries; the donated state counted once), whether it fits, the bytes each collective moves "
        "(read from the compiled HLO, loops by their trip counts) and, for the rows named below, the HBM "
        "traffic and collective latency.",
        "",
        "**From formulas** (mtp_jax/flops.py, mtp_jax/tpu.py; recomputed from the stored numbers by "
        "`run.py --render`): model FLOPs (3 × the forward matmuls, attention over the full square as "
        "MaxText's and PaLM's published MFU count it), hardware FLOPs (plus each head's logits computed "
        "again in the backward pass, the trunk's forward pass again under remat, blockwise attention's "
        "blocks as executed), and the roofline's **bounds**: step time ≥ max(hardware FLOPs / peak, HBM "
        "bytes / HBM bandwidth, collective bytes / ICI bandwidth + latency), every resource at the chip's "
        "peak and all of them overlapped; tokens/s per chip, MFU (model FLOPs) and HFU (hardware FLOPs) "
        "≤ what that floor allows. They are ceilings, not predictions: norms, RoPE, SwiGLU, the "
        "logsumexp over the vocabulary, the AdamW update and the untuned attention cost nothing in them "
        "beyond their FLOPs.",
        "",
        "**Expected** (an assumption): the MFU ceiling × the MFU that published runs reached on the same "
        "chip generation (mtp_jax/tpu.py's chip table: MaxText's tables, 16B-128B on v5e-256 at "
        "56.1-66.9 %, 32B-1160B on v5p at 64.0-70.3 %; none published for v6e, which borrows v5e's), "
        "and the step time floor ÷ that band. Those runs are 10-1000× larger than these presets; smaller "
        "matmuls usually run further below peak.",
        "",
        "HBM bytes: rows " + (", ".join(f"*{k}*" for k in traffic) or "(none yet)") + " carry the compiled "
        "program's HBM traffic (`hlo.hbm_traffic`: each top-level operation's operands and results in "
        "HBM, fusions reading only the slices they take, every loop body times its trip count) and the "
        "assumed ICI latency (1 µs per ring step); the others were compiled before these were read and "
        "carry only a floor, the state and batch read and the state written once (2 × the compiled "
        "arguments), and no latency, so their HBM and ICI terms, and step time floor, are lower than a "
        "recompile would give (`run.py --recompile=ROW,…`). XLA's own bytes accessed "
        "(`hbm_bytes_loops_once_per_chip` in results.json) counts each loop body once and, on TPU, "
        "on-chip traffic too: it is neither bound and is not used.",
        "",
        "ICI: a collective is assumed to stream over all of the chip's links (a ring along one torus axis "
        "uses 2 of the 4 (v5e, v6e) or 6 (v5p) ports, so real ones are slower). On v5p the compiled "
        "program moves the FSDP weights with all-reduces and no all-gathers (`collective_bytes_per_chip` "
        "in results.json), and an all-reduce moves twice an all-gather's bytes: counted as compiled, so "
        "a better partitioning would lower those rows' ICI term. Δ columns compare each MTP setting with "
        "its baseline on the same topology.",
        "",
        "Decoding (a plain step and the speculative verify passes on one chip): [decode.md](decode.md).",
        "",
    ]


def table_row(preset: str, setting: str, r: dict, base: dict | None) -> str:
    def delta(key):
        return "" if base is None or setting == "baseline" else f"{100 * (r[key] / base[key] - 1):+.1f} %"

    mesh = ",".join(str(s) for s in r["mesh"].values())
    head = f"| {preset} | {setting} | {r['batch_size']} × {r['seq_len']} | {mesh} | {'yes' if r['remat'] else 'no'} | "
    if r.get("refused_by_compiler"):
        return (
            head + f"> {r['bytes_per_chip'] / tpu.GiB:.0f} (temporaries; the compiler refuses) | **no** |" + " |" * 13
        )
    largest, (low, high) = r["largest_collective"], r["expected_mfu_range"]
    return (
        head + f"{r['bytes_per_chip'] / tpu.GiB:.1f} | {'yes' if r['fits'] else '**no**'} | "
        f"{r['model_flops_per_step'] / 1e15:.2f} / {r['hardware_flops_per_step'] / 1e15:.2f} | "
        f"{1e3 * r['compute_s']:.0f} | {1e3 * r['hbm_s']:.0f}{'' if r['hbm_counted'] == HBM_TRAFFIC else '*'} | "
        f"{1e3 * r['ici_s']:.0f} | {1e3 * r['step_time_floor_s']:.0f} | "
        f"{r['tokens_per_sec_per_chip_ceiling']:.0f} | "
        f"{100 * r['mfu_ceiling']:.1f} % | {100 * r['hfu_ceiling']:.1f} % | {100 * low:.0f}-{100 * high:.0f} % | "
        f"{ms_range(r['expected_step_time_s_range'])} | {delta('step_time_floor_s')} | {delta('bytes_per_chip')} | "
        + (f"{largest['op']} {largest['bytes'] / 1e9:.2f} GB ×{largest['count']}" if largest else "-")
        + f" | {sum(t['compile_s'] for t in r['tried']):.0f} |"
    )


def render(results: dict, meta: dict) -> str:
    lines = ["# Train steps compiled for TPU pods ahead of time: what fits, and bounds on speed", ""]
    lines += method(meta, results) + key_numbers(results) + [""]
    for name in TOPOLOGIES:
        rows = [r for r in results.values() if r["accelerator_type"] == name]
        if not rows:
            continue
        chip = tpu.chip_of(tpu.topology_name(name))
        lines += [
            f"## {name} ({tpu.topology_name(name)}, {rows[0]['chips']} chips, {chip.hbm_bytes / tpu.GiB:.0f} GiB "
            f"each; expected: {chip.band_source})",
            "",
            "| preset | setting | batch | mesh d,f,t | remat | GiB/chip | fits | PFLOP/step model / hardware "
            "| compute ms | HBM ms | ICI ms | step ms ≥ | tok/s/chip ≤ | MFU ≤ | HFU ≤ | expected MFU "
            "| expected step ms | Δ step ≥ | Δ memory | largest collective | compile s (all tried) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for preset in PRESETS:
            for setting in SETTINGS:
                r = results.get(f"{name} {preset} {setting}")
                if r is not None:
                    lines.append(table_row(preset, setting, r, results.get(f"{name} {preset} baseline")))
        lines += ["", "\\* HBM floor only (the state once): compiled before the program's traffic was read.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated accelerator types")
    parser.add_argument("--render", action="store_true", help="only rewrite results.md from results.json")
    parser.add_argument("--baseline_meshes", type=int, default=2, help="fsdp-major meshes a baseline tries")
    parser.add_argument(
        "--recompile",
        default="",
        help="comma-separated rows to compile again, e.g. 'v5p-128 1b baseline,v5p-128 1b linear n=4'",
    )
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    path = HERE / "results.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    results = {key: with_bounds(row) for key, row in stored.get("rows", {}).items()}
    meta = stored.get("meta") or {
        "jax": jax.__version__,
        "libtpu": importlib.metadata.version("libtpu"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }

    def save():  # merged with rows another run (of other topologies) may have written meanwhile
        if path.exists():
            results.update({k: v for k, v in json.loads(path.read_text())["rows"].items() if k not in results})
        path.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
        (HERE / "results.md").write_text(render(results, meta))

    if args.recompile:
        recompile(args.recompile.split(","), results, save)
    elif not args.render:
        start = time.perf_counter()
        run(args.only.split(","), args.topologies.split(","), results, save, args.baseline_meshes)
        print(f"done in {time.perf_counter() - start:.0f} s")
    save()


if __name__ == "__main__":
    main()
