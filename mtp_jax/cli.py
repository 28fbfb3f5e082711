"""What every command line here shares: bad input ends as one `error:` line and exit status 2.

`parse_flags` is absl's flag parser for the entry points that take `--config=FILE[:preset]`
(`mtp_jax.main`, `mtp_jax.bench`, `benchmarks/profile_ops.py`), with its errors — an unknown
config key, a value of the wrong type, a config file that is missing or raises while loading —
reduced to that one line. `ArgumentParser` is argparse's, with its errors reduced the same way,
for the commands that take plain flags (`generate`, `evaluate`, `export`). A refused command
leaves no folder it made behind (`new_folders`, `remove_empty`). All four commands keep what XLA
compiles in one persistent cache (`use_compilation_cache`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from absl import flags


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        # A normal exit waits at jax.distributed's shutdown barrier for the other processes, which
        # wait in a collective for this one: leave now and let the launcher stop the rest.
        sys.stdout.flush()
        os._exit(2)
    sys.exit(2)


def new_folders(path: pathlib.Path) -> list[pathlib.Path]:
    """The folders that making `path` would create, innermost first ([] when it exists)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(folders: list[pathlib.Path]) -> None:
    """Removes `folders` (innermost first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


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
        print(f"compilation cache off: cannot write {folder} ({e.strerror or e}); set JAX_COMPILATION_CACHE_DIR "
              "to a folder you can write", file=sys.stderr)
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if jax.config.jax_compilation_cache_dir != str(folder):
        jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        fail(f"{message}. See --help for the flags")


RENAMED_FLAGS = {"config.train": "config.trainable"}  # old name -> new name


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with its errors reduced to one line: the last of the message, which names
    the cause. The config file loads lazily, so it is loaded here, where its errors are caught."""
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=")[0]
        if name in RENAMED_FLAGS:
            fail(f"--{name} is now --{RENAMED_FLAGS[name]} (the same values)")
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.to_dict()
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
