"""What a train step costs: parameters, FLOPs, compiled memory, step time, tokens/s and MFU (measured
here), or on a TPU pod the memory and bounds on the speed.

    python -m mtp_jax.bench --config=configs/mtp3.py:nano [--config.KEY=V …] [--json] [--sweep] [--compile_only]
    python -m mtp_jax.bench --config=configs/mtp4.py:1b --topology=v5p:4x4x4 [--search_mesh] [--json]
    python -m mtp_jax.bench --config=configs/mtp4.py:1b --topology=v5e:1x1 --decode=1,16,64,256

It compiles the real train step (`train.make_train_step`, the one `main` runs) on all local
devices, feeds it fresh random windows (no data is read), and times steps one by one with
`block_until_ready`, reporting the median. MFU divides the analytic model FLOPs by the step time
and by a peak measured on the spot: the best of several large matmuls in the compute dtype.

FLOPs are given twice. `flops_per_step` is XLA's cost analysis of the compiled step: it includes
rematerialised work, and since it counts a loop body once, a chunked cross-entropy (a scan) is
costed from the same step compiled without chunking, which does the same arithmetic without the
loop. `model_flops_per_step` is the analytic count of the model's matmuls (forward + 2x for the
backward, no recomputation), the numerator of MFU.

`--sweep` runs the baseline and n = 2, 3, 4 of every head type in one process and prints each as a
ratio to the baseline; `--json` prints one JSON object per configuration instead of a table.

`--topology` compiles the same step for a TPU slice that need not be attached (libtpu describes its
chips: `pip install -e '.[tpu]'`), on abstract inputs, and reports per chip what the step needs
(parameters, optimizer state, temporaries, against the chip's HBM), the bytes each kind of
collective moves, and bounds on its speed, not predictions (`pod_bounds`, mtp_jax/tpu.py): a floor
on the step time, the ceilings it puts on tokens/s, MFU (model FLOPs) and HFU (hardware FLOPs: the
rematerialised cross-entropy and model.remat counted), and the range that published runs'
efficiency on that chip suggests (an assumption, with its source). A configuration that does not
fit ends with one `error:` line naming the fields that lower its memory. With mesh.* at its
defaults it compiles the `default_meshes` (data parallel where the batch allows, FSDP with the two
smallest tensor sizes), keeps the fastest that fits and says which; `--search_mesh` compiles every
(data, fsdp, tensor) mesh that the chips and the model's shapes allow and ranks them.

`--topology … --decode=SIZES` costs decoding instead, on the topology's first chip: one plain
decoding step at each batch in SIZES, and one greedy verify pass of the draft chain and of a tree
of each size, each at a full KV cache of seq_len positions (`decoding.one_pass`, the bodies of
its device loops), with the floor on each pass's time; a pass whose parameters and cache
alone exceed the chip is left out with a notice (all of them: an error line). Decoding one sequence
is memory-bound: a pass reads every parameter and
the cache whatever its number of tokens, so a verify pass costs about a plain step until its
tokens' FLOPs outweigh those reads.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import warnings

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from mtp_jax import attention as attention_lib
from mtp_jax import decoding, heads, hlo, sharding, tpu
from mtp_jax.cli import fail, parse_flags
from mtp_jax.config import validate
from mtp_jax.errors import UserError
from mtp_jax.mtp import build_model, n_predict
from mtp_jax.speculative import Tree
from mtp_jax.train import make_train_step, memory_per_device

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':preset'.",
                                          lock_config=False)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per configuration.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Baseline and n = 2, 3, 4 for every head type, as ratios.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Report compile-time figures only; run no step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per configuration (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before timing.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile for this TPU topology (v5p:4x4x4, or an accelerator "
                                "type: v5p-128) on abstract inputs and report per chip; no step runs.")
_SEARCH_MESH = flags.DEFINE_bool("search_mesh", False, "With --topology: every (data, fsdp, tensor) mesh the shapes "
                                 "allow, ranked by predicted step time.")
_DECODE = flags.DEFINE_list("decode", None, "With --topology: cost one decoding step on the topology's first chip "
                            "instead of the train step: plain decoding at each of these batches, the draft "
                            "chain, and a verify tree of each of these sizes (e.g. 1,16,64,256).")
_XLA_FLOPS = flags.DEFINE_bool("xla_flops", True, "Cost a chunked loss's step from its loop-free twin "
                               "(a second compilation); False reports the chunked step's own count.")

SWEEP_NS = (2, 3, 4)


def vocab_size(config) -> int:
    """The vocabulary the data would give, without reading any data."""
    return 256 if config.data.tokenizer == "byte" else config.data.vocab_size


def config_name(config) -> str:
    n = n_predict(config)
    return f"{config.preset} baseline" if n == 1 else f"{config.preset} {config.mtp_head_type} n={n}"


def flops_per_token(config, vocab: int) -> dict[str, float]:
    """One forward pass's FLOPs per token, by part: each transformer block's matmuls and its
    attention (QK^T and AV over all T keys), and the heads (merges and unembeddings)."""
    m, n, t = config.model, n_predict(config), config.seq_len
    d = m.d_model
    d_kv = d * (m.n_kv_heads or m.n_heads) // m.n_heads  # grouped-query attention's keys and values
    head = heads.get(config.mtp_head_type)
    return {"blocks": m.n_layers + (n - 1) * head.blocks_per_head,
            "block_matmuls": 2 * (2 * d * d + 2 * d * d_kv + 3 * d * m.mlp_dim), "attention": 2 * 2 * t * d,
            "unembeddings": 2 * d * vocab + (n - 1) * head.output_flops(d, vocab),
            "merges": (n - 1) * head.other_flops(d)}


def model_flops(config, vocab: int, *, causal: bool = False) -> float:
    """Analytic model FLOPs of one train step, the numerator of MFU: 3x (forward + backward) the
    forward matmuls, nothing recomputed. Attention counts all T keys per query, as PaLM's and
    MaxText's published MFU did, or (causal) the (T + 1) / 2 a query sees on average."""
    f = flops_per_token(config, vocab)
    attention = f["attention"] * ((config.seq_len + 1) / (2 * config.seq_len) if causal else 1.0)
    per_token = f["blocks"] * (f["block_matmuls"] + attention) + f["unembeddings"] + f["merges"]
    return 3.0 * per_token * config.batch_size * config.seq_len


def hardware_flops(config, vocab: int, platform: str) -> float:
    """FLOPs the chip executes in one train step on `platform`: the model FLOPs, plus each head's
    logits computed once more in the backward pass (the cross-entropy is rematerialised), plus the
    trunk blocks' forward pass once more under model.remat; attention as the implementation runs
    it (blockwise: the key blocks a causal query block sees, and its forward recomputed in the
    backward pass)."""
    f, t = flops_per_token(config, vocab), config.seq_len
    attention, passes = f["attention"], 3  # forward, and the backward's two
    blocks = -(-t // config.model.attention_block_size)
    implementation = attention_lib.AUTO[platform] if config.model.attention == "auto" else config.model.attention
    if implementation in ("blockwise", "splash") and blocks > 1:
        attention, passes = attention * (blocks + 1) / (2 * blocks), 4
    per_token = (f["blocks"] * (3 * f["block_matmuls"] + passes * attention) + 4 * f["unembeddings"]
                 + 3 * f["merges"])
    if config.model.remat:
        per_token += config.model.n_layers * (f["block_matmuls"] + attention)
    return per_token * config.batch_size * t


def measure_peak_flops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` [size, size] @ [size, size] matmuls in `dtype`."""
    a, b = (jax.random.normal(jax.random.key(i), (size, size), np.float32).astype(dtype) for i in (0, 1))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def xla_flops(compiled, n_devices: int) -> float:
    """XLA's FLOPs of a compiled step over all devices (its cost analysis is per device)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) * n_devices


def bench_config(config, *, compile_only: bool, steps: int, warmup: int, peak: float | None,
                 twin_flops: bool = True) -> dict:
    """Compile (and unless compile_only, time) the train step of one configuration. twin_flops=False
    skips the loop-free twin's compilation (flops_per_step then counts a chunked loss's scan
    body once)."""
    validate(config)
    vocab = vocab_size(config)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, mesh)
    start = time.perf_counter()
    setup = make_train_step(config, vocab, mesh, config.num_train_steps)
    compile_s = time.perf_counter() - start  # tracing, lowering and XLA's compilation of the step
    memory = setup.step_fn.memory_analysis()
    flops = xla_flops(setup.step_fn, mesh.size)
    if config.loss_chunk_size > 0 and twin_flops:  # the scan's body is counted once: cost the loop-free twin
        unchunked = config.copy_and_resolve_references()
        unchunked.loss_chunk_size = 0
        flops = xla_flops(make_train_step(unchunked, vocab, mesh, config.num_train_steps).step_fn, mesh.size)
    result = {
        "name": config_name(config),
        "params": setup.n_params,
        "flops_per_step": flops,
        "model_flops_per_step": model_flops(config, vocab),
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "compile_s": compile_s,
        "step_time_s": None, "tokens_per_sec": None, "mfu": None,
    }
    if compile_only:
        return result

    step = make_stepper(config, setup, mesh, warmup + steps)
    times = [step() for _ in range(warmup + steps)]
    step_time = statistics.median(times[warmup:])
    result["step_time_s"] = step_time
    result["tokens_per_sec"] = config.batch_size * config.seq_len / step_time
    result["mfu"] = result["model_flops_per_step"] / step_time / peak
    return result


def make_stepper(config, setup, mesh, n_steps: int):
    """A function that takes one train step on a fresh random window and returns its wall time.

    The windows are made on the device before any timing, so no host copy is timed; the step is
    synchronised with block_until_ready. A non-finite loss raises."""
    shape = (n_steps, config.batch_size, config.seq_len + n_predict(config))
    spec = jax.sharding.PartitionSpec(None, *sharding.batch_sharding(mesh).spec)
    windows = jax.jit(lambda key: jax.random.randint(key, shape, 0, vocab_size(config)),
                      out_shardings=jax.sharding.NamedSharding(mesh, spec))(jax.random.key(config.seed))
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    jax.block_until_ready((windows, state))
    taken = 0

    def step() -> float:
        nonlocal state, taken
        start = time.perf_counter()
        state, metrics = setup.step_fn(state, windows[taken % n_steps])
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start
        taken += 1
        if not np.isfinite(float(metrics["total_loss"])):
            raise RuntimeError(f"{config_name(config)}: non-finite loss while benchmarking")
        return elapsed

    return step


def sweep_configs(config) -> list:
    """The baseline, then n = 2, 3, 4 for each head type, all otherwise equal to `config`."""
    def variant(use_mtp: bool, n: int, head_type: str):
        c = config.copy_and_resolve_references()
        c.use_mtp, c.mtp_n_tokens, c.mtp_head_type = use_mtp, n, head_type
        return c

    return [variant(False, 1, config.mtp_head_type)] + [variant(True, n, h) for h in heads.HEAD_TYPES for n in SWEEP_NS]


def table(results: list[dict], peak: float | None) -> str:
    """A human-readable table; in a sweep, time, memory and FLOPs are also given as ratios to row 1."""
    base = results[0]
    ratio = lambda r, key: "" if base[key] in (None, 0) or r[key] is None else f"{r[key] / base[key]:.2f}x"  # noqa: E731
    lines = [f"{'config':<22} {'params':>9} {'GFLOP/step':>11} {'model GF':>9} {'temp MiB':>9} {'arg MiB':>8} "
             f"{'step s':>8} {'tok/s':>8} {'MFU':>6} {'time':>6} {'temp':>6} {'FLOPs':>6}"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in results:
        lines.append(
            f"{r['name']:<22} {r['params'] / 1e6:>8.2f}M {r['flops_per_step'] / 1e9:>11.1f} "
            f"{r['model_flops_per_step'] / 1e9:>9.1f} {r['temp_bytes'] / 2**20:>9.1f} {r['argument_bytes'] / 2**20:>8.1f} "
            f"{fmt(r['step_time_s'], '8.3f')} {fmt(r['tokens_per_sec'], '8.0f')} "
            f"{'-' if r['mfu'] is None else format(100 * r['mfu'], '5.1f') + '%'} "
            f"{ratio(r, 'step_time_s'):>6} {ratio(r, 'temp_bytes'):>6} {ratio(r, 'flops_per_step'):>6}")
    if peak is not None:
        lines.append(f"MFU against a measured peak of {peak / 1e9:.0f} GFLOP/s")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ TPU topologies
LOWER_MEMORY = ("mesh.fsdp (parameters and optimizer state over more chips), model.remat=True, loss_chunk_size, "
                "batch_size, model.scan_layers=True")


def bytes_per_chip(tree) -> int:
    """Bytes of one chip's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def pod_bounds(config, vocab: int, chip: tpu.Chip, chips: int, hbm_bytes: float, ici_bytes: float,
               ici_latency_s: float) -> dict:
    """What the roofline says of one train step per chip (mtp_jax/tpu.py): the floor on its time from
    the hardware FLOPs, HBM and ICI traffic; the ceilings that floor puts on tokens/s, MFU (model
    FLOPs) and HFU (hardware FLOPs); and the range that the efficiency of published runs on this
    chip (chip.mfu_band, an assumption) gives: MFU ceiling x band, step time floor / band."""
    model, hardware = model_flops(config, vocab), hardware_flops(config, vocab, "tpu")
    roof = tpu.roofline(chip, hardware / chips, hbm_bytes, ici_bytes, ici_latency_s)
    floor, (low, high) = roof["step_time_floor_s"], chip.mfu_band
    mfu = model / chips / floor / chip.peak_flops
    return {"model_flops_per_step": model, "model_flops_causal_per_step": model_flops(config, vocab, causal=True),
            "hardware_flops_per_step": hardware, **roof, "ici_latency_s": ici_latency_s,
            "tokens_per_sec_per_chip_ceiling": config.batch_size * config.seq_len / floor / chips,
            "mfu_ceiling": mfu, "hfu_ceiling": hardware / chips / floor / chip.peak_flops,
            "expected_mfu_range": [mfu * low, mfu * high], "expected_step_time_s_range": [floor / high, floor / low],
            "efficiency_band_source": chip.band_source}


def topology_config(config, topology: str, devices) -> dict:
    """Compile the train step of `config` for `topology` (its chips as `devices`) on abstract inputs,
    and report what it needs per chip and the roofline's bounds on its speed (pod_bounds)."""
    chip, vocab = tpu.chip_of(topology), vocab_size(config)
    with tpu.traced_for("tpu"):
        validate(config)
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
            return {"name": config_name(config), "topology": topology, "chips": mesh.size, "mesh": dict(mesh.shape),
                    "bytes_per_chip": temporaries, "chip_hbm_bytes": chip.hbm_bytes, "fits": False,
                    "refused_by_compiler": True, "step_time_floor_s": None,
                    "compile_s": time.perf_counter() - start, "compile_cpu_s": time.process_time() - start_cpu}
        compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    chips, memory, program = mesh.size, setup.step_fn.memory_analysis(), setup.step_fn.as_text()
    cost = setup.step_fn.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    found = hlo.collectives(program)
    by_kind = hlo.collective_bytes(found)
    needed = memory_per_device(memory)
    hbm = hlo.hbm_traffic(program)
    return {
        "name": config_name(config), "topology": topology, "chips": chips, "mesh": dict(mesh.shape),
        "params": setup.n_params,
        "param_bytes_per_chip": bytes_per_chip(setup.abstract_state["params"]),
        "opt_state_bytes_per_chip": bytes_per_chip(setup.abstract_state["opt_state"]),
        "temp_bytes_per_chip": memory.temp_size_in_bytes,
        "bytes_per_chip": needed, "chip_hbm_bytes": chip.hbm_bytes, "fits": needed <= chip.hbm_bytes,
        "xla_flops_per_step": float(cost.get("flops", 0.0)) * chips,  # XLA counts each loop body once
        "hbm_bytes_per_chip": hbm,
        "xla_bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)),  # loop bodies once, on-chip too
        "collective_bytes_per_chip": by_kind,
        "largest_collective": None if not found else {"op": found[0].op, "bytes": found[0].bytes,
                                                      "count": found[0].count, "from": found[0].name},
        **pod_bounds(config, vocab, chip, chips, hbm, sum(by_kind.values()), sum(tpu.collective_latency_s(c) for c in found)),
        "refused_by_compiler": False,
        "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,  # wall time; CPU time of all this process's threads
    }


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def mesh_candidates(config, chips: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) with product `chips` that the model's shapes allow: tensor
    divides the heads, key/value heads, MLP width and vocabulary, and data x fsdp the batch."""
    m = config.model
    widths = (m.n_heads, m.n_kv_heads or m.n_heads, m.mlp_dim, vocab_size(config))
    return [(data, chips // tensor // data, tensor)
            for tensor in divisors(chips) if not any(w % tensor for w in widths)
            for data in divisors(chips // tensor) if config.batch_size % (chips // tensor) == 0]


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
        raise UserError(f"no (data, fsdp, tensor) mesh of {len(devices)} chips suits batch_size="
                        f"{config.batch_size}: data x fsdp must divide the batch (the rest is tensor parallel, "
                        "which must divide the heads, MLP and vocabulary); raise batch_size")
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
    return (f"{result['name']} needs {more_than}{result['bytes_per_chip'] / tpu.GiB:.1f} GiB per chip on "
            f"{result['topology']} with mesh {mesh_words(result)}, and a {result['topology'].split(':')[0]} chip has "
            f"{result['chip_hbm_bytes'] / tpu.GiB:.0f} GiB: lower it with {LOWER_MEMORY}")


def topology_table(results: list[dict]) -> str:
    """Per chip: memory against the chip's, collective bytes, the roofline's terms, the bounds they
    put on the step (≥ and ≤) and the MFU expected at published runs' efficiency."""
    gib = lambda b: f"{b / tpu.GiB:.2f}"  # noqa: E731
    lines = [f"{'config':<22} {'data,fsdp,tensor':>16} {'param':>6} {'opt':>6} {'temp':>6} {'total GiB':>10} "
             f"{'fits':>4} {'AG GB':>6} {'RS GB':>6} {'AR GB':>6} {'A2A GB':>6} {'comp ms':>8} {'HBM ms':>7} "
             f"{'ICI ms':>7} {'step ms ≥':>9} {'tok/s/chip ≤':>12} {'MFU ≤':>6} {'HFU ≤':>6} "
             f"{'expected MFU':>12}"]
    for r in results:
        if r["refused_by_compiler"]:
            lines.append(f"{r['name']:<22} {','.join(str(s) for s in r['mesh'].values()):>16} "
                         f"{'temporaries alone > ' + gib(r['bytes_per_chip']) + ' GiB: refused by the compiler':>50}")
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
            f"{f'{100 * low:.0f}-{100 * high:.0f}%':>12}")
    return "\n".join(lines)


def topology_legend(topology: str, chips: int) -> str:
    chip = tpu.chip_of(topology)
    low, high = chip.mfu_band
    return (f"{topology}: {chips} chips, per chip. ≥ and ≤ are roofline bounds, not predictions: every FLOP, HBM "
            f"byte and collective at the chip's peak, all overlapped (mtp_jax/tpu.py). Expected MFU: the ceiling x "
            f"{100 * low:.0f}-{100 * high:.0f} %, the MFU published runs reached ({chip.band_source}; assumed to "
            "carry over)")


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
        print(f"mesh.* left at its defaults: {config_name(config)} uses {mesh_words(found[0])}, the fastest that "
              f"fits of {len(meshes)} meshes compiled (--search_mesh compiles all "
              f"{len(mesh_candidates(config, len(devices)))}; --config.mesh.* sets one)", file=sys.stderr)
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


# ------------------------------------------------------------------------------------------ decoding on one chip
def decode_passes(config, sizes: list[int], tree_sizes: list[int] | None = None) -> list[tuple[str, Tree | None, int]]:
    """(name, tree or None, batch) of each decoding step to cost: plain decoding at each batch in
    `sizes`, then (a model with draft heads) the chain of its n - 1 drafts and a tree of each size
    in `tree_sizes` (default: `sizes`) above n - 1 (drafted nodes, the root excluded, as generate
    --tree_size). A tree's shape is Medusa's construction under acceptance halving with each rank:
    with linear or parallel heads a pass costs what its size costs, whatever the shape."""
    tree_sizes = sizes if tree_sizes is None else tree_sizes
    passes = [(f"plain, batch {b}", None, b) for b in sizes]
    n = n_predict(config)
    if n > 1:
        passes.append((f"verify chain of {n - 1}", Tree.chain(n - 1), 1))
        trees = [s for s in tree_sizes if s > n - 1]
        acceptance = np.tile(0.5 ** np.arange(1, max(trees, default=1) + 1), (n - 1, 1))
        passes += [(f"verify tree of {s}", Tree.build(acceptance, s), 1) for s in trees]
    return passes


def decode_floor_bytes(config) -> tuple[float, float, float, float]:
    """What any decoding step of `config` holds on its chip at least, from abstract shapes: (plain
    decoding's parameters, its KV cache per sequence and position; a verify pass's parameters (the
    draft heads too), its cache per position)."""
    model = nnx.eval_shape(lambda: build_model(config, vocab_size(config), seed=0))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    cache = lambda all_heads: nbytes(jax.eval_shape(lambda: decoding.init_caches(model, 1, 1, all_heads)))  # noqa: E731
    heads = nbytes(nnx.state(model.heads)) if hasattr(model, "heads") else 0.0
    params = nbytes(nnx.state(model, nnx.Param))
    return params - heads, cache(False), params, cache(True)


def fitting_decode_sizes(config, chip: tpu.Chip, sizes: list[int]) -> tuple[list[int], list[int], list[str]]:
    """The batches and tree sizes of `sizes` whose parameters and KV cache alone fit the chip, and a
    phrase for each pass left out (compiling those would only hear the compiler refuse, and
    shaping a tree of that size alone could exhaust this host's memory)."""
    plain_params, plain_cache, all_params, tree_cache = decode_floor_bytes(config)
    need = {"plain batch": lambda b: plain_params + b * config.seq_len * plain_cache}
    if n_predict(config) > 1:
        need["tree of"] = lambda size: all_params + (config.seq_len + size) * tree_cache
    fitting = {kind: [s for s in sizes if needs(s) <= chip.hbm_bytes] for kind, needs in need.items()}
    left_out = [f"{kind} {s} (≥ {needs(s) / tpu.GiB:.1f} GiB)"
                for kind, needs in need.items() for s in sizes if s not in fitting[kind]]
    if not any(fitting.values()):
        largest_tree = int((chip.hbm_bytes - all_params) // tree_cache) - config.seq_len
        raise UserError(f"--decode={','.join(map(str, sizes))}: every pass needs more than a chip's "
                        f"{chip.hbm_bytes / tpu.GiB:.0f} GiB for its parameters and KV cache alone ("
                        + ", ".join(left_out) + "): use batches up to "
                        + str(int((chip.hbm_bytes - plain_params) // (config.seq_len * plain_cache)))
                        + (f" and trees up to {largest_tree}" if "tree of" in need else ""))
    return fitting["plain batch"], fitting.get("tree of", []), left_out


def decode_config(config, topology: str, devices, name: str, tree: Tree | None, batch: int) -> dict:
    """Compile one decoding step (decoding.one_pass: plain, or a greedy verify pass of `tree`) for
    the first chip of `topology`, at a full cache of seq_len positions, on abstract inputs, and
    report its memory and the roofline's floor on its time (no collectives: one chip)."""
    chip, vocab = tpu.chip_of(topology), vocab_size(config)
    config = config.copy_and_resolve_references()
    config.model.scan_layers = False  # XLA's cost analysis counts a loop's body once: unrolled, it counts all
    on_chip = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices[:1]), ("chip",)),
                                         jax.sharding.PartitionSpec())
    with tpu.traced_for("tpu"):
        validate(config)
        model = nnx.eval_shape(lambda: build_model(config, vocab, seed=0))
        step, inputs = decoding.one_pass(model, config.seq_len, tree, batch)
        inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip), inputs)
        start, compiled, refused = time.perf_counter(), None, None
        try:
            with warnings.catch_warnings():  # the state's scalars (position, counters) have no buffer to reuse
                warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                compiled = jax.jit(step, donate_argnums=1).lower(*inputs).compile()
        except jax.errors.JaxRuntimeError as e:
            refused = tpu.out_of_memory(str(e))
            if refused is None:
                raise
        compile_s = time.perf_counter() - start
    tokens = batch if tree is None else tree.size
    row = {"name": config_name(config), "topology": topology, "pass": name, "batch": batch, "tokens": tokens,
           "cache_len": config.seq_len, "chip_hbm_bytes": chip.hbm_bytes, "compile_s": compile_s}
    if compiled is None:  # the compiler stops once the temporaries alone exceed the chip
        return {**row, "fits": False, "bytes_per_chip": refused, "step_time_floor_s": None}
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    needed = memory_per_device(memory)
    flops = float(cost.get("flops", 0.0))
    # HBM bytes: every argument the step uses (parameters, caches) read once, the cache's new slots
    # written in place. XLA's "bytes accessed" is not used: on TPU it also counts the weights'
    # prefetch into on-chip memory and the reads from there (4-5x the parameters for 1b).
    hbm = memory.argument_size_in_bytes
    roof = tpu.roofline(chip, flops, hbm)
    return {**row, "fits": needed <= chip.hbm_bytes, "bytes_per_chip": needed,
            "param_bytes": bytes_per_chip(inputs[0]), "flops": flops, "hbm_bytes": hbm,
            "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)), **roof}


def decode_table(results: list[dict]) -> str:
    gib = lambda b: f"{b / tpu.GiB:.2f}"  # noqa: E731
    lines = [f"{'config':<22} {'pass':<22} {'tokens':>6} {'GiB':>6} {'fits':>4} {'GFLOP':>8} {'HBM GB':>7} "
             f"{'comp ms':>8} {'HBM ms':>7} {'pass ms ≥':>9} {'bound':>7}"]
    for r in results:
        if r["step_time_floor_s"] is None:
            lines.append(f"{r['name']:<22} {r['pass']:<22} {r['tokens']:>6} > {gib(r['bytes_per_chip'])} GiB: "
                         "refused by the compiler")
            continue
        lines.append(f"{r['name']:<22} {r['pass']:<22} {r['tokens']:>6} {gib(r['bytes_per_chip']):>6} "
                     f"{'yes' if r['fits'] else 'NO':>4} {r['flops'] / 1e9:>8.1f} {r['hbm_bytes'] / 1e9:>7.2f} "
                     f"{1e3 * r['compute_s']:>8.2f} {1e3 * r['hbm_s']:>7.2f} {1e3 * r['step_time_floor_s']:>9.2f} "
                     f"{r['bound']:>7}")
    return "\n".join(lines)


def main_decode(config, name: str, sizes: list[int], as_json: bool) -> None:
    topology = tpu.topology_name(name)
    with tpu.traced_for("tpu"):
        validate(config)
        batches, tree_sizes, left_out = fitting_decode_sizes(config, tpu.chip_of(topology), sizes)
    devices = tpu.devices(topology)
    if left_out:
        print(f"notice: not compiled, their parameters and KV cache alone exceed the chip: {', '.join(left_out)}",
              file=sys.stderr)
    results = []
    for pass_name, tree, batch in decode_passes(config, batches, tree_sizes):
        results.append(decode_config(config, topology, devices, pass_name, tree, batch))
        if as_json:
            print(json.dumps(results[-1]), flush=True)
    if not as_json:
        print(f"{topology}: one chip, one decoding step at a cache of {config.seq_len} positions. ≥: the roofline's "
              "floor (mtp_jax/tpu.py), HBM bytes = the parameters and caches the step reads, once")
        print(decode_table(results))


def decode_sizes(values: list[str]) -> list[int]:
    try:
        sizes = [int(v) for v in values]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"--decode={','.join(values)} must list positive integers (batches and tree sizes), "
                        "e.g. --decode=1,16,64,256")
    return sizes


def main(argv) -> None:
    if len(argv) > 1 or _CONFIG.value is None:
        fail("usage: python -m mtp_jax.bench --config=configs/mtp3.py:PRESET [--config.KEY=V …] "
             "[--json] [--sweep] [--compile_only] [--topology=v5p:4x4x4 [--search_mesh]]")
    config = _CONFIG.value
    if not _COMPILE_ONLY.value and _TOPOLOGY.value is None and (_STEPS.value < 1 or _WARMUP.value < 0):
        fail(f"--steps={_STEPS.value} --warmup={_WARMUP.value}: time at least one step after zero or more warm-up "
             "steps (e.g. --steps=10 --warmup=2), or pass --compile_only to time none")
    if _DECODE.value and _SEARCH_MESH.value:
        fail("--search_mesh ranks meshes of the train step, and --decode costs one chip, which has no mesh: "
             "drop one of them")
    if _TOPOLOGY.value is not None:
        # Only the host's CPU runs here, even on a TPU VM whose chips are busy: libtpu describes
        # the topology's chips without opening them.
        jax.config.update("jax_platforms", "cpu")
        try:
            if _DECODE.value:
                main_decode(config, _TOPOLOGY.value, decode_sizes(_DECODE.value), _JSON.value)
                return
            main_topology(sweep_configs(config) if _SWEEP.value else [config], _TOPOLOGY.value, _SEARCH_MESH.value,
                          _JSON.value)
        except UserError as e:
            fail(str(e))
        return
    if _DECODE.value:
        fail("--decode compiles for a TPU chip: add --topology=NAME (e.g. v5e:1x1 or v5p:1x1x1)")
    if _SEARCH_MESH.value:
        fail("--search_mesh compiles for a TPU topology: add --topology=NAME (e.g. v5p:4x4x4 or v5e-256)")
    configs = sweep_configs(config) if _SWEEP.value else [config]
    peak = None if _COMPILE_ONLY.value else measure_peak_flops(config.model.dtype)
    if peak is not None:
        print(f"peak: {peak / 1e9:.0f} GFLOP/s ({config.model.dtype} {2048}^3 matmul) on "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s)", file=sys.stderr)
    results = []
    try:
        for c in configs:
            results.append(bench_config(c, compile_only=_COMPILE_ONLY.value, steps=_STEPS.value,
                                        warmup=_WARMUP.value, peak=peak, twin_flops=_XLA_FLOPS.value))
            if _JSON.value:
                print(json.dumps({**results[-1], "peak_flops": peak}), flush=True)
    except UserError as e:
        fail(str(e))
    if not _JSON.value:
        print(table(results, peak))


def run() -> None:
    """The `mtp-bench` console command."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
