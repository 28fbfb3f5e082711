"""Eight fake CPU devices for every test, set before JAX runs anything, so sharding tests run here;
and one persistent XLA compilation cache for the whole session.

The cache keeps the suite inside its time budget: much of its CPU time went to XLA compiling the
same tiny programs again, in test after test and in every subprocess a test starts (main,
launch.sh, sweeps, the benchmark). The environment variables carry the cache into those
subprocesses and into pytest-xdist's workers; a size limit turns on JAX's file lock, so processes
that compile at the same time share it safely. The directory is new for each session and removed
after it: a program compiled by another version of the code is never read.
"""

import os
import shutil
import tempfile

OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # the process that made it removes it
if OWN_CACHE:
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="mtp_jax_tests_xla_cache_"),
                       "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),  # > 0: locked reads and writes
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # every program, however quick
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

import jax  # noqa: E402  (reads the environment above when imported)

jax.config.update("jax_num_cpu_devices", 8)


def pytest_unconfigure(config):
    if OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
