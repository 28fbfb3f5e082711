"""Entry point: `python -m mtp_jax.main --config=configs/mtp3.py[:preset] --workdir=DIR [--config.KEY=V …]`.

Sets up the JAX runtime (CPU device count, multi-process initialisation) before any computation,
then hands over to train.run. Bad input ends here as one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':preset'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("MTP_COORDINATOR_ADDRESS"),
                                   "host:port of process 0, for multi-process runs off TPU.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Number of CPU devices this process exposes.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with no arguments (TPU pods, SLURM).")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        # A normal exit waits at jax.distributed's shutdown barrier for the other processes, which
        # wait in a collective for this one: leave now and let the launcher stop the rest.
        sys.stdout.flush()
        os._exit(2)
    sys.exit(2)


def init_runtime() -> None:
    """Configure JAX before its first computation: device count and distributed initialisation."""
    import jax

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
    from mtp_jax.errors import UserError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and JAX log every save at INFO
    try:
        init_runtime()
        from mtp_jax import train

        train.run(_CONFIG.value, _WORKDIR.value)
    except UserError as e:
        fail(str(e))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with its errors (an unknown config key, a value of the wrong type, a config
    file that is missing or raises while loading) reduced to one line: the last of the message,
    which names the cause."""
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.to_dict()  # the file loads lazily: load it here, where its errors are caught
        return rest
    except flags.Error as e:
        fail(f"{last_line(e)} (see --helpfull for the flags; config fields are listed in configs/base.py)")
    except Exception as e:  # noqa: BLE001 — a config file that is missing or raises while loading
        text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        # ml_collections' unknown-field error arrives as a quoted repr ('\'x\'\nDid you mean …').
        text = text.replace("\\n", "\n").replace("\\'", "'")
        text = text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text
        fail(f"could not load the config: {type(e).__name__}: {' '.join(lines_of(text))}")


def lines_of(text) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()] or ["(no message)"]


def last_line(error: Exception) -> str:
    return lines_of(error)[-1]


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
