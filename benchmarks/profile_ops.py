"""Where a compiled program spends its time on this machine: XLA ops summed by HLO name.

    python benchmarks/profile_ops.py --config=configs/mtp3.py:nano [--config.KEY=VALUE …] [--top=25]
    python benchmarks/profile_ops.py --workdir=runs/mtp4 [--speculative [--lookup=N]] [--top=25]

The first form profiles one train step (fresh random tokens, after warm-up); the second, one
greedy continuation of 128 validation tokens by 128 new ones (plain or self-speculative) from a
trained workdir. It records a `jax.profiler` trace and sums the durations of the XLA ops (thunks
on CPU) by name, with a numeric suffix dropped (`dot.17` counts as `dot`), then lists the
largest single ops. Op durations can overlap when XLA runs independent ops concurrently, so the
sum may exceed wall time. This is how benchmarks/NOTES.md §5–6 found the transposing fusions and
the cache copies.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mtp_jax import bench, flops  # noqa: E402  (defines --config, the same flag as mtp_jax.bench's)
from mtp_jax.cli import fail, parse_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir: profile decoding instead")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "decoding: self-speculative instead of plain")
_LOOKUP = flags.DEFINE_integer("lookup", 0, "speculative decoding: drafts copied from the context (generate --lookup)")
_TOP = flags.DEFINE_integer("top", 25, "rows per table")


def op_times(run) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    """Runs `run` once under the profiler; returns (µs by op kind, calls by kind, µs by op)."""
    import jax

    out = tempfile.mkdtemp(prefix="profile_ops-")
    jax.profiler.start_trace(out, create_perfetto_trace=True)
    run()
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(sorted(glob.glob(f"{out}/**/*.trace.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_kind, calls, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Skip Python frames ($…), the executor's own spans and the ends of async ops.
        if e.get("ph") != "X" or name.startswith(("$", "Thunk", "end:", "np.")) or "Pjit" in name:
            continue
        kind = re.sub(r"\.\d+$", "", name)
        by_kind[kind] += e.get("dur", 0)
        calls[kind] += 1
        by_op[name] += e.get("dur", 0)
    return by_kind, calls, by_op


def train_step_runner(config):
    from mtp_jax import sharding
    from mtp_jax.train_step import make_train_step

    mesh = sharding.make_mesh(config.mesh)
    setup = make_train_step(config, flops.vocab_size(config), mesh, config.num_train_steps)
    step = bench.make_stepper(config, setup, mesh, 8)
    step(), step()
    print(f"{flops.config_name(config)}: train step {min(step() for _ in range(3)):.3f} s (best of 3)")
    return step


def decoding_runner(workdir: str, speculative: bool, lookup: int):
    import numpy as np

    from mtp_jax import decoding
    from mtp_jax import workdir as workdir_lib

    trained = workdir_lib.load(workdir)
    generator = decoding.Generator(trained.model, trained.config.seq_len)
    prompt = np.asarray(trained.data().val[:128]).astype(int).tolist()
    run = (
        (lambda: generator.speculative(prompt, 128, lookup=lookup))
        if speculative
        else (lambda: generator.generate(prompt, 128))
    )
    run()
    begin = time.perf_counter()
    result = run()
    print(
        f"{'speculative' if speculative else 'plain'} decoding: {len(result.tokens)} tokens in "
        f"{time.perf_counter() - begin:.3f} s, {result.forward_passes} forward passes"
    )
    return run


def main(argv) -> None:
    del argv
    config = flags.FLAGS.config
    if (config is None) == (_WORKDIR.value is None):
        fail("pass exactly one of --config (a train step) or --workdir (decoding)")
    run = (
        decoding_runner(_WORKDIR.value, _SPECULATIVE.value, _LOOKUP.value)
        if _WORKDIR.value
        else train_step_runner(config)
    )
    by_kind, calls, by_op = op_times(run)
    print(f"sum of op times {sum(by_kind.values()) / 1000:.1f} ms\n\n      ms   calls  op kind")
    for kind, us in by_kind.most_common(_TOP.value):
        print(f"{us / 1000:8.2f} {calls[kind]:7d}  {kind}")
    print("\n      ms  largest single ops")
    for name, us in by_op.most_common(_TOP.value):
        print(f"{us / 1000:8.2f}  {name}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
