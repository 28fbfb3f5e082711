"""What several test files share: the repository root, loading a config file's preset, a small
code corpus and the fields of a few-step run on it, and starting a child that takes Ctrl-C as a
terminal's foreground job does."""

import pathlib
import runpy
import signal

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str = "mtp3", preset: str = "tiny", overrides: dict | None = None):
    """configs/<name>.py:<preset> with dotted-key overrides, e.g. {"mesh.data": 2}."""
    config = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"](preset)
    config.update_from_flattened_dict(overrides or {})
    return config


def write_code(path: pathlib.Path, functions: int = 300, body=lambda i: f"x * {i}") -> pathlib.Path:
    """`functions` one-line Python functions `def fI(x): return BODY(I)` in the text file `path`:
    repetitive enough that a tiny model learns some of it in a few steps."""
    path.write_text("".join(f"def f{i}(x):\n    return {body(i)}\n\n" for i in range(functions)))
    return path


def tiny_run(corpus: pathlib.Path, cache: pathlib.Path) -> dict:
    """Config overrides for a few-step test run on the text file `corpus`, its tokens cached in
    `cache`: a tenth of it held out, one evaluation batch, no sample printed."""
    return {
        "eval_batches": 1,
        "sample_tokens": 0,
        "data.source": str(corpus),
        "data.cache_dir": str(cache),
        "data.val_fraction": 0.1,
    }


def default_sigint() -> None:
    """Popen's preexec_fn for a child that a test stops with SIGINT: a test suite started as a
    background job (`pytest &`, nohup) inherits SIGINT ignored, and the trainer and launch.sh
    rightly go on ignoring an ignored SIGINT, so the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
