"""Entry point: `python -m mtp_jax.main --config=configs/mtp3.py[:preset] --workdir=DIR [--config.KEY=V …]`.

Sets up the JAX runtime (CPU device count, multi-process initialisation) before any computation
(importing JAX computes nothing), then hands over to train.run. Bad input ends here as one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import pathlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mtp_jax import train
from mtp_jax.cli import fail, parse_flags
from mtp_jax.compilation_cache import use_compilation_cache
from mtp_jax.errors import UserError
from mtp_jax.folders import new_folders, remove_empty

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':preset'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    os.environ.get("MTP_COORDINATOR_ADDRESS"),
    "host:port of process 0, for multi-process runs off TPU.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Number of CPU devices this process exposes.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with no arguments (TPU pods, SLURM)."
)


def init_runtime() -> None:
    """Configure JAX before its first computation: device count and distributed initialisation."""
    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if _COORDINATOR.value:
        n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
        if n is None or i is None:
            fail("--coordinator_address needs --num_processes and --process_id (or use ./launch.sh local N)")
        if not 0 <= i < n:
            fail(f"--process_id={i} must be in 0 … {n - 1} for --num_processes={n}")
        # CPU processes exchange collectives over gloo; accelerators use their own interconnect.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, n, i)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags look like --config=configs/mtp3.py --workdir=DIR")
    if _CONFIG.value is None or _WORKDIR.value is None:
        fail("--config and --workdir are required, e.g. --config=configs/mtp3.py --workdir=runs/mtp3")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and JAX log every save at INFO
    use_compilation_cache()
    created = new_folders(pathlib.Path(_WORKDIR.value))
    try:
        init_runtime()
        train.run(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        remove_empty(created)  # a refused run leaves no new empty workdir behind
        fail(str(e))


def run() -> None:
    """The `mtp-train` console command."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
