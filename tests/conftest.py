"""Eight fake CPU devices for every test, set before JAX runs anything, so sharding tests run here;
cheap compiles; and one persistent XLA compilation cache for the whole session.

Most of the suite's CPU time is XLA compiling tiny programs, mostly in LLVM's optimisation passes,
which pay for themselves only on programs that run long (benchmarks/NOTES.md §11). The tests'
programs run for milliseconds, so they are compiled at LLVM's lowest level; the same programs then
go to a cache shared by the tests and every subprocess they start (main, launch.sh, sweeps, the
device script). Environment variables carry both into those subprocesses and into pytest-xdist's
workers; a size limit turns on JAX's file lock, so processes that compile at once share the cache
safely. The directory is new for each session and removed after it.

`code_corpus`: one small code corpus that the runs of every test file may share, with its token cache.
"""

import os
import pathlib
import shutil
import tempfile

import pytest

from tests.util import write_code

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # the process that made it removes it
if OWN_CACHE:
    os.environ.update(
        {
            "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="mtp_jax_tests_xla_cache_"),
            "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30),  # > 0: locked reads and writes
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # every program, however quick
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
    )

import jax  # noqa: E402  (reads the environment above when imported)

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> pathlib.Path:
    """A folder holding corpus.txt (tests.util.write_code's 300 functions) and cache/, the token
    cache the runs on it share."""
    root = tmp_path_factory.mktemp("code_corpus")
    write_code(root / "corpus.txt")
    return root


def pytest_unconfigure(config):
    if OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
