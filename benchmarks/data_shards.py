"""Host time to make a training batch from 100 llm.c token shards, against a train step's time.

    python benchmarks/data_shards.py [--shards=100] [--shard_tokens=2000000] [--config=configs/mtp3.py:nano]

writes --shards shards of random ids in a temporary folder, then times `data.local_batch` (the
sampler and the reads of this process's rows: what the trainer does on the host each step) for
the config's batch shape and for nano_125m's, with the shards in the operating system's cache,
and the config's compiled train step on random windows on this machine's devices. Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import runpy
import statistics
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_jax import data, sharding, train_step  # noqa: E402  (after the repository root is on the path)
from mtp_jax.data import shards  # noqa: E402
from mtp_jax.mtp import loss_weights  # noqa: E402


def load(spec: str) -> ml_collections.ConfigDict:
    path, _, preset = spec.partition(":")
    return runpy.run_path(str(ROOT / path))["get_config"](preset or None)


def write_shards(root: pathlib.Path, count: int, n_tokens: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        ids = rng.integers(0, vocab, size=n_tokens).astype("<u2")
        (root / f"train_{i:06d}.bin").write_bytes(shards.header(n_tokens, "<u2") + ids.tobytes())
    (root / "val_000000.bin").write_bytes(shards.header(n_tokens, "<u2") + ids.tobytes())


def data_seconds(tokens, batch_size: int, window_len: int, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        start = time.perf_counter()
        data.local_batch(tokens, window_len=window_len, batch_size=batch_size, seed=0, step=step)
        times.append(time.perf_counter() - start)
    return times


def step_seconds(config, steps: int) -> list[float]:
    mesh = sharding.make_mesh(config.mesh)
    setup = train_step.make_train_step(config, config.data.vocab_size, mesh, steps + 1)
    window = jax.random.randint(
        jax.random.key(0), (config.batch_size, config.seq_len + len(loss_weights(config))), 0, config.data.vocab_size
    )
    window = jax.device_put(window, sharding.batch_sharding(mesh))
    state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)()
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        state, metrics = setup.step_fn(state, window)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--shard_tokens", type=int, default=2_000_000)
    p.add_argument("--config", default="configs/mtp3.py:nano")
    p.add_argument("--data_steps", type=int, default=200)
    p.add_argument("--train_steps", type=int, default=3)
    args = p.parse_args()
    config = load(args.config)
    big = load("configs/mtp3.py:nano_125m")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_shards(root, args.shards, args.shard_tokens, config.data.vocab_size)
        cfg = ml_collections.ConfigDict(
            dict(
                source=str(root / "train_*.bin"),
                val_source=str(root / "val_*.bin"),
                vocab_size=config.data.vocab_size,
                token_dtype="uint16",
                tokenizer="byte",
                val_fraction=0.01,
                split_seed=0,
                cache_dir=str(root / "cache"),
            )
        )
        tokens = data.prepare(cfg, show_progress=False).train
        shape = {
            name: (c.batch_size, c.seq_len + len(loss_weights(c)))
            for name, c in ((args.config, config), ("configs/mtp3.py:nano_125m", big))
        }
        data_time = {
            name: statistics.median(data_seconds(tokens, b, w, args.data_steps)) for name, (b, w) in shape.items()
        }
    step_time = statistics.median(step_seconds(config, args.train_steps))
    print(
        json.dumps(
            {
                "shards": args.shards,
                "shard_tokens": args.shard_tokens,
                "batch_shapes": shape,
                "data_seconds_per_step": data_time,
                "step_seconds": {args.config: step_time},
                "data_share_of_step": data_time[args.config] / step_time,
                "devices": str(jax.devices()[0].device_kind),
                "n_devices": jax.device_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
