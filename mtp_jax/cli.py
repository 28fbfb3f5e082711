"""What every command line here shares: bad input ends as one `error:` line and exit status 2.

`parse_flags` is absl's flag parser for the entry points that take `--config=FILE[:preset]`
(`mtp_jax.main`, `mtp_jax.bench`, `benchmarks/profile_ops.py`), with its errors — an unknown
config key, a value of the wrong type, a config file that is missing or raises while loading —
reduced to that one line. `ArgumentParser` is argparse's, with its errors reduced the same way,
for the commands that take plain flags (`generate`, `evaluate`, `export`, `prepare`).
"""

from __future__ import annotations

import argparse
import os
import sys

from absl import flags


def fail(message: str) -> None:
    # One write, newline included: print() writes the text and its newline separately, and a
    # background thread (orbax's writers after a failed save) can print its traceback in between.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        # A normal exit waits at jax.distributed's shutdown barrier for the other processes, which
        # wait in a collective for this one: leave now and let the launcher stop the rest.
        sys.stdout.flush()
        os._exit(2)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        fail(f"{message}. See --help for the flags")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with its errors reduced to one line: the last of the message, which names
    the cause. The config file loads lazily, so it is loaded here, where its errors are caught."""
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
