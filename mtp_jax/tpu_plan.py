"""TPU planning from any machine: what the train step needs on a TPU slice and bounds on its speed,
from programs compiled on this host for chips that need not be attached (libtpu describes them:
`pip install -e '.[tpu]'`). `python -m mtp_jax.bench --topology` is its command line;
mtp_jax/tpu.py holds the chips and the roofline, tpu_decode.py costs decoding steps the same way.

Topologies: the train step is compiled on abstract inputs for the slice's chips and each compile
reports per chip what the step needs (parameters, optimizer state, temporaries, against the chip's
HBM), the bytes each kind of collective moves (mtp_jax/hlo.py), and bounds on its speed
(`pod_bounds`). With mesh.* at its defaults the `default_meshes` are compiled and the fastest that
fits kept (`train_meshes`); `search_mesh` compiles every mesh the shapes allow.

Everything is traced for the TPU (platform='tpu'): the model's code paths that depend on the
platform ('auto' attention, CPU's fused projections) take the TPU's, as main on the pod would.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax

from mtp_jax import hlo, sharding, tpu
from mtp_jax.cli import fail
from mtp_jax.config import validate
from mtp_jax.errors import UserError
from mtp_jax.flops import config_name, hardware_flops, model_flops, vocab_size
from mtp_jax.train_step import make_train_step, memory_per_device

PLATFORM = "tpu"  # what every program here is traced and compiled for

LOWER_MEMORY = (
    "mesh.fsdp (parameters and optimizer state over more chips), model.remat=True, loss_chunk_size, "
    "batch_size, model.scan_layers=True"
)


def bytes_per_chip(tree) -> int:
    """Bytes of one chip's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def pod_bounds(
    config, vocab: int, chip: tpu.Chip, chips: int, hbm_bytes: float, ici_bytes: float, ici_latency_s: float
) -> dict:
    """What the roofline says of one train step per chip (mtp_jax/tpu.py): the floor on its time from
    the hardware FLOPs, HBM and ICI traffic; the ceilings that floor puts on tokens/s, MFU (model
    FLOPs) and HFU (hardware FLOPs); and the range that the efficiency of published runs on this
    chip (chip.mfu_band, an assumption) gives: MFU ceiling x band, step time floor / band."""
    model, hardware = model_flops(config, vocab), hardware_flops(config, vocab, PLATFORM)
    roof = tpu.roofline(chip, hardware / chips, hbm_bytes, ici_bytes, ici_latency_s)
    floor, (low, high) = roof["step_time_floor_s"], chip.mfu_band
    mfu = model / chips / floor / chip.peak_flops
    return {
        "model_flops_per_step": model,
        "model_flops_causal_per_step": model_flops(config, vocab, causal=True),
        "hardware_flops_per_step": hardware,
        **roof,
        "ici_latency_s": ici_latency_s,
        "tokens_per_sec_per_chip_ceiling": config.batch_size * config.seq_len / floor / chips,
        "mfu_ceiling": mfu,
        "hfu_ceiling": hardware / chips / floor / chip.peak_flops,
        "expected_mfu_range": [mfu * low, mfu * high],
        "expected_step_time_s_range": [floor / high, floor / low],
        "efficiency_band_source": chip.band_source,
    }


def topology_config(config, topology: str, devices) -> dict:
    """Compile the train step of `config` for `topology` (its chips as `devices`) on abstract inputs,
    and report what it needs per chip and the roofline's bounds on its speed (pod_bounds)."""
    chip, vocab = tpu.chip_of(topology), vocab_size(config)
    validate(config, PLATFORM)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(config.batch_size, mesh)
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        setup = make_train_step(config, vocab, mesh, config.num_train_steps)
    except jax.errors.JaxRuntimeError as e:
        temporaries = tpu.out_of_memory(str(e))
        if temporaries is None:
            raise
        # The compiler stops once the temporaries alone exceed the chip: a floor on the need.
        return {
            "name": config_name(config),
            "topology": topology,
            "chips": mesh.size,
            "mesh": dict(mesh.shape),
            "bytes_per_chip": temporaries,
            "chip_hbm_bytes": chip.hbm_bytes,
            "fits": False,
            "refused_by_compiler": True,
            "step_time_floor_s": None,
            "compile_s": time.perf_counter() - start,
            "compile_cpu_s": time.process_time() - start_cpu,
        }
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    chips, memory, program = mesh.size, setup.step_fn.memory_analysis(), setup.step_fn.as_text()
    cost = setup.step_fn.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    found = hlo.collectives(program)
    by_kind = hlo.collective_bytes(found)
    needed = memory_per_device(memory)
    hbm = hlo.hbm_traffic(program)
    return {
        "name": config_name(config),
        "topology": topology,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "params": setup.n_params,
        "param_bytes_per_chip": bytes_per_chip(setup.abstract_state["params"]),
        "opt_state_bytes_per_chip": bytes_per_chip(setup.abstract_state["opt_state"]),
        "temp_bytes_per_chip": memory.temp_size_in_bytes,
        "bytes_per_chip": needed,
        "chip_hbm_bytes": chip.hbm_bytes,
        "fits": needed <= chip.hbm_bytes,
        "xla_flops_per_step": float(cost.get("flops", 0.0)) * chips,  # XLA counts each loop body once
        "hbm_bytes_per_chip": hbm,
        "xla_bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)),  # loop bodies once, on-chip too
        "collective_bytes_per_chip": by_kind,
        "largest_collective": None
        if not found
        else {"op": found[0].op, "bytes": found[0].bytes, "count": found[0].count, "from": found[0].name},
        **pod_bounds(
            config, vocab, chip, chips, hbm, sum(by_kind.values()), sum(tpu.collective_latency_s(c) for c in found)
        ),
        "refused_by_compiler": False,
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,  # wall time; CPU time of all this process's threads
    }


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def mesh_candidates(config, chips: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) with product `chips` that the model's shapes allow: tensor
    divides the heads, key/value heads, MLP width and vocabulary, and data x fsdp the batch."""
    m = config.model
    widths = (m.n_heads, m.n_kv_heads or m.n_heads, m.mlp_dim, vocab_size(config))
    return [
        (data, chips // tensor // data, tensor)
        for tensor in divisors(chips)
        if not any(w % tensor for w in widths)
        for data in divisors(chips // tensor)
        if config.batch_size % (chips // tensor) == 0
    ]


def default_meshes(config, chips: int, fsdp_major: int = 2) -> list[tuple[int, int, int]]:
    """The meshes tried when mesh.* is left at its defaults: data parallel where the batch divides
    over the chips, then data 1 with the `fsdp_major` smallest tensor sizes the shapes allow
    (parameters and optimizer state sharded: what large models need to fit)."""
    candidates = mesh_candidates(config, chips)
    data_parallel = [(chips, 1, 1)] if (chips, 1, 1) in candidates else []
    sharded = sorted((m for m in candidates if m[0] == 1 and m not in data_parallel), key=lambda m: m[2])
    return data_parallel + sharded[:fsdp_major]


def with_mesh(config, data: int, fsdp: int, tensor: int):
    c = config.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    return c


def search_mesh(config, topology: str, devices, candidates=None, report=None) -> list[dict]:
    """topology_config for each mesh of `candidates` (default: all mesh_candidates), those that fit
    first, each group by the floor on its step time; `report(result)` is called as each one compiles."""
    candidates = mesh_candidates(config, len(devices)) if candidates is None else candidates
    if not candidates:
        raise UserError(
            f"no (data, fsdp, tensor) mesh of {len(devices)} chips suits batch_size="
            f"{config.batch_size}: data x fsdp must divide the batch (the rest is tensor parallel, "
            "which must divide the heads, MLP and vocabulary); raise batch_size"
        )
    results = []
    for mesh in candidates:
        results.append(topology_config(with_mesh(config, *mesh), topology, devices))
        if report is not None:
            report(results[-1])
    return sorted(results, key=lambda r: (not r["fits"], r["step_time_floor_s"] or math.inf))


def mesh_words(result: dict) -> str:
    return " ".join(f"{a}={s}" for a, s in result["mesh"].items())


def too_large(result: dict) -> str:
    more_than = "more than " if result["refused_by_compiler"] else ""
    return (
        f"{result['name']} needs {more_than}{result['bytes_per_chip'] / tpu.GiB:.1f} GiB per chip on "
        f"{result['topology']} with mesh {mesh_words(result)}, and a {result['topology'].split(':')[0]} chip has "
        f"{result['chip_hbm_bytes'] / tpu.GiB:.0f} GiB: lower it with {LOWER_MEMORY}"
    )


def topology_table(results: list[dict]) -> str:
    """Per chip: memory against the chip's, collective bytes, the roofline's terms, the bounds they
    put on the step (≥ and ≤) and the MFU expected at published runs' efficiency."""
    gib = lambda b: f"{b / tpu.GiB:.2f}"  # noqa: E731
    lines = [
        f"{'config':<22} {'data,fsdp,tensor':>16} {'param':>6} {'opt':>6} {'temp':>6} {'total GiB':>10} "
        f"{'fits':>4} {'AG GB':>6} {'RS GB':>6} {'AR GB':>6} {'A2A GB':>6} {'comp ms':>8} {'HBM ms':>7} "
        f"{'ICI ms':>7} {'step ms ≥':>9} {'tok/s/chip ≤':>12} {'MFU ≤':>6} {'HFU ≤':>6} "
        f"{'expected MFU':>12}"
    ]
    for r in results:
        if r["refused_by_compiler"]:
            lines.append(
                f"{r['name']:<22} {','.join(str(s) for s in r['mesh'].values()):>16} "
                f"{'temporaries alone > ' + gib(r['bytes_per_chip']) + ' GiB: refused by the compiler':>50}"
            )
            continue
        coll, (low, high) = r["collective_bytes_per_chip"], r["expected_mfu_range"]
        lines.append(
            f"{r['name']:<22} {','.join(str(s) for s in r['mesh'].values()):>16} {gib(r['param_bytes_per_chip']):>6} "
            f"{gib(r['opt_state_bytes_per_chip']):>6} {gib(r['temp_bytes_per_chip']):>6} "
            f"{gib(r['bytes_per_chip']) + '/' + format(r['chip_hbm_bytes'] / tpu.GiB, '.0f'):>10} "
            f"{'yes' if r['fits'] else 'NO':>4} "
            + " ".join(f"{coll[op] / 1e9:>6.2f}" for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all"))
            + f" {1e3 * r['compute_s']:>8.1f} {1e3 * r['hbm_s']:>7.1f} {1e3 * r['ici_s']:>7.1f} "
            f"{1e3 * r['step_time_floor_s']:>9.1f} {r['tokens_per_sec_per_chip_ceiling']:>12.0f} "
            f"{100 * r['mfu_ceiling']:>5.1f}% {100 * r['hfu_ceiling']:>5.1f}% "
            f"{f'{100 * low:.0f}-{100 * high:.0f}%':>12}"
        )
    return "\n".join(lines)


def topology_legend(topology: str, chips: int) -> str:
    chip = tpu.chip_of(topology)
    low, high = chip.mfu_band
    return (
        f"{topology}: {chips} chips, per chip. ≥ and ≤ are roofline bounds, not predictions: every FLOP, HBM "
        f"byte and collective at the chip's peak, all overlapped (mtp_jax/tpu.py). Expected MFU: the ceiling x "
        f"{100 * low:.0f}-{100 * high:.0f} %, the MFU published runs reached ({chip.band_source}; assumed to "
        "carry over)"
    )


def train_meshes(config, topology: str, devices, search: bool, report=None) -> list[dict]:
    """The results for `config` on the topology, fitting and fastest first: every mesh the shapes
    allow (search), the default_meshes where mesh.* is left at its defaults (the choice is printed),
    else the config's own mesh."""
    if search:
        return search_mesh(config, topology, devices, report=report)
    if not sharding.is_default_mesh(config.mesh):
        found = [topology_config(config, topology, devices)]
        if report is not None:
            report(found[0])
        return found
    meshes = default_meshes(config, len(devices))
    found = search_mesh(config, topology, devices, candidates=meshes, report=report)
    if found[0]["fits"]:  # else the error line names the smallest
        print(
            f"mesh.* left at its defaults: {config_name(config)} uses {mesh_words(found[0])}, the fastest that "
            f"fits of {len(meshes)} meshes compiled (--search_mesh compiles all "
            f"{len(mesh_candidates(config, len(devices)))}; --config.mesh.* sets one)",
            file=sys.stderr,
        )
    return found


def main_topology(configs: list, name: str, search: bool, as_json: bool) -> None:
    """Compile each config for the topology (on each mesh, if search), print, and end with one error
    line if one of them fits on no mesh."""
    topology = tpu.topology_name(name)
    devices = tpu.devices(topology)
    show = (lambda r: print(json.dumps(r), flush=True)) if as_json else None
    results, too_large_ones = [], []
    for config in configs:
        found = train_meshes(config, topology, devices, search, report=show)
        results += found
        if not found[0]["fits"]:
            too_large_ones.append(min(found, key=lambda r: r["bytes_per_chip"]))
    if not as_json:
        print(topology_legend(topology, len(devices)))
        print(topology_table(results))
    if too_large_ones:
        fail(too_large(too_large_ones[0]))
