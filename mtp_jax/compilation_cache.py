"""The persistent compilation cache that every command shares: what XLA compiled for one run
(a training, a generate, an evaluation) is loaded, not compiled again, by the next."""

from __future__ import annotations

import os
import pathlib
import sys

COMPILATION_CACHE = "~/.cache/mtp_jax/jax_compilation"  # beside the data cache's default, data.cache_dir


def compilation_cache_dir() -> pathlib.Path:
    """$JAX_COMPILATION_CACHE_DIR where set, else COMPILATION_CACHE."""
    return pathlib.Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or COMPILATION_CACHE).expanduser()


def use_compilation_cache() -> None:
    """Keeps every program XLA compiles in a cache on disk, so that running a command again on
    the same model (a second generate, an evaluation, a resumed training) loads its programs
    instead of compiling them. Called before the first computation.

    The folder is compilation_cache_dir(); JAX_ENABLE_COMPILATION_CACHE=false turns the cache off.
    JAX's own settings, where their JAX_* variables are set, are left as they are; otherwise every
    program is kept however fast it compiled (JAX's default keeps only those over a second: most
    of a small model's). A folder that cannot be written leaves the cache off, saying so."""
    import jax  # here, not at the top: prepare, a command without JAX, imports this module too

    if not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false, as JAX reads it
        return
    folder = compilation_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError("Permission denied")
    except OSError as e:
        print(
            f"compilation cache off: cannot write {folder} ({e.strerror or e}); set JAX_COMPILATION_CACHE_DIR "
            "to a folder you can write",
            file=sys.stderr,
        )
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if jax.config.jax_compilation_cache_dir != str(folder):
        jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
