"""What a train step costs: parameters, FLOPs, compiled memory, step time, tokens/s and MFU (measured
here), or on a TPU pod the memory and bounds on the speed.

    python -m mtp_jax.bench --config=configs/mtp3.py:nano [--config.KEY=V …] [--json] [--sweep] [--compile_only]
    python -m mtp_jax.bench --config=configs/mtp4.py:1b --topology=v5p:4x4x4 [--search_mesh] [--json]
    python -m mtp_jax.bench --config=configs/mtp4.py:1b --topology=v5e:1x1 --decode=1,16,64,256

It compiles the real train step (`train_step.make_train_step`, the one `main` runs) on all local
devices, feeds it fresh random windows (no data is read), and times steps one by one with
`block_until_ready`, reporting the median. MFU divides the analytic model FLOPs by the step time
and by a peak measured on the spot: the best of several large matmuls in the compute dtype.

FLOPs are given twice. `flops_per_step` is XLA's cost analysis of the compiled step: it includes
rematerialised work, and since it counts a loop body once, a chunked cross-entropy (a scan) is
costed from the same step compiled without chunking, which does the same arithmetic without the
loop. `model_flops_per_step` is the analytic count of the model's matmuls (mtp_jax/flops.py:
forward + 2x for the backward, no recomputation), the numerator of MFU.

`--sweep` runs the baseline and n = 2, 3, 4 of every head type in one process and prints each as a
ratio to the baseline; `--json` prints one JSON object per configuration instead of a table.

`--topology` compiles the same step for a TPU slice that need not be attached (libtpu describes its
chips: `pip install -e '.[tpu]'`), on abstract inputs, and reports per chip what the step needs
(parameters, optimizer state, temporaries, against the chip's HBM), the bytes each kind of
collective moves, and bounds on its speed, not predictions (mtp_jax/tpu_plan.py): a floor
on the step time, the ceilings it puts on tokens/s, MFU (model FLOPs) and HFU (hardware FLOPs: the
rematerialised cross-entropy and model.remat counted), and the range that published runs'
efficiency on that chip suggests (an assumption, with its source). A configuration that does not
fit ends with one `error:` line naming the fields that lower its memory. With mesh.* at its
defaults it compiles the `default_meshes` (data parallel where the batch allows, FSDP with the two
smallest tensor sizes), keeps the fastest that fits and says which; `--search_mesh` compiles every
(data, fsdp, tensor) mesh that the chips and the model's shapes allow and ranks them.

`--topology … --decode=SIZES` costs decoding instead, on the topology's first chip: one plain
decoding step at each batch in SIZES, and one greedy verify pass of the draft chain and of a tree
of each size, each at a full KV cache of seq_len positions (`tpu_decode.one_pass`, the bodies of
its device loops), with the floor on each pass's time; a pass whose parameters and cache
alone exceed the chip is left out with a notice (all of them: an error line). Decoding one sequence
is memory-bound: a pass reads every parameter and
the cache whatever its number of tokens, so a verify pass costs about a plain step until its
tokens' FLOPs outweigh those reads.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mtp_jax import heads, sharding, tpu_decode, tpu_plan
from mtp_jax.cli import fail, parse_flags
from mtp_jax.config import validate
from mtp_jax.errors import UserError
from mtp_jax.flops import config_name, model_flops, vocab_size
from mtp_jax.mtp import n_predict
from mtp_jax.train_step import make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':preset'.", lock_config=False)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per configuration.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Baseline and n = 2, 3, 4 for every head type, as ratios.")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "Report compile-time figures only; run no step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per configuration (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before timing.")
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "Compile for this TPU topology (v5p:4x4x4, or an accelerator "
    "type: v5p-128) on abstract inputs and report per chip; no step runs.",
)
_SEARCH_MESH = flags.DEFINE_bool(
    "search_mesh",
    False,
    "With --topology: every (data, fsdp, tensor) mesh the shapes allow, ranked by predicted step time.",
)
_DECODE = flags.DEFINE_list(
    "decode",
    None,
    "With --topology: cost one decoding step on the topology's first chip "
    "instead of the train step: plain decoding at each of these batches, the draft "
    "chain, and a verify tree of each of these sizes (e.g. 1,16,64,256).",
)
_XLA_FLOPS = flags.DEFINE_bool(
    "xla_flops",
    True,
    "Cost a chunked loss's step from its loop-free twin "
    "(a second compilation); False reports the chunked step's own count.",
)

SWEEP_NS = (2, 3, 4)


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


def bench_config(
    config, *, compile_only: bool, steps: int, warmup: int, peak: float | None, twin_flops: bool = True
) -> dict:
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
        "step_time_s": None,
        "tokens_per_sec": None,
        "mfu": None,
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
    windows = jax.jit(
        lambda key: jax.random.randint(key, shape, 0, vocab_size(config)),
        out_shardings=jax.sharding.NamedSharding(mesh, spec),
    )(jax.random.key(config.seed))
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
    lines = [
        f"{'config':<22} {'params':>9} {'GFLOP/step':>11} {'model GF':>9} {'temp MiB':>9} {'arg MiB':>8} "
        f"{'step s':>8} {'tok/s':>8} {'MFU':>6} {'time':>6} {'temp':>6} {'FLOPs':>6}"
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in results:
        lines.append(
            f"{r['name']:<22} {r['params'] / 1e6:>8.2f}M {r['flops_per_step'] / 1e9:>11.1f} "
            f"{r['model_flops_per_step'] / 1e9:>9.1f} {r['temp_bytes'] / 2**20:>9.1f} {r['argument_bytes'] / 2**20:>8.1f} "
            f"{fmt(r['step_time_s'], '8.3f')} {fmt(r['tokens_per_sec'], '8.0f')} "
            f"{'-' if r['mfu'] is None else format(100 * r['mfu'], '5.1f') + '%'} "
            f"{ratio(r, 'step_time_s'):>6} {ratio(r, 'temp_bytes'):>6} {ratio(r, 'flops_per_step'):>6}"
        )
    if peak is not None:
        lines.append(f"MFU against a measured peak of {peak / 1e9:.0f} GFLOP/s")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1 or _CONFIG.value is None:
        fail(
            "usage: python -m mtp_jax.bench --config=configs/mtp3.py:PRESET [--config.KEY=V …] "
            "[--json] [--sweep] [--compile_only] [--topology=v5p:4x4x4 [--search_mesh]]"
        )
    config = _CONFIG.value
    if not _COMPILE_ONLY.value and _TOPOLOGY.value is None and (_STEPS.value < 1 or _WARMUP.value < 0):
        fail(
            f"--steps={_STEPS.value} --warmup={_WARMUP.value}: time at least one step after zero or more warm-up "
            "steps (e.g. --steps=10 --warmup=2), or pass --compile_only to time none"
        )
    if _DECODE.value and _SEARCH_MESH.value:
        fail(
            "--search_mesh ranks meshes of the train step, and --decode costs one chip, which has no mesh: "
            "drop one of them"
        )
    if _TOPOLOGY.value is not None:
        # Only the host's CPU runs here, even on a TPU VM whose chips are busy: libtpu describes
        # the topology's chips without opening them.
        jax.config.update("jax_platforms", "cpu")
        try:
            if _DECODE.value:
                tpu_decode.main_decode(config, _TOPOLOGY.value, tpu_decode.decode_sizes(_DECODE.value), _JSON.value)
                return
            tpu_plan.main_topology(
                sweep_configs(config) if _SWEEP.value else [config], _TOPOLOGY.value, _SEARCH_MESH.value, _JSON.value
            )
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
        print(
            f"peak: {peak / 1e9:.0f} GFLOP/s ({config.model.dtype} {2048}^3 matmul) on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
            file=sys.stderr,
        )
    results = []
    try:
        for c in configs:
            results.append(
                bench_config(
                    c,
                    compile_only=_COMPILE_ONLY.value,
                    steps=_STEPS.value,
                    warmup=_WARMUP.value,
                    peak=peak,
                    twin_flops=_XLA_FLOPS.value,
                )
            )
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
