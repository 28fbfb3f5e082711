"""What several test files share: the repository root, loading a config file's preset, and
starting a child that takes Ctrl-C as a terminal's foreground job does."""

import pathlib
import runpy
import signal

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str = "mtp3", preset: str = "tiny", overrides: dict | None = None):
    """configs/<name>.py:<preset> with dotted-key overrides, e.g. {"mesh.data": 2}."""
    config = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"](preset)
    config.update_from_flattened_dict(overrides or {})
    return config


def default_sigint() -> None:
    """Popen's preexec_fn for a child that a test stops with SIGINT: a test suite started as a
    background job (`pytest &`, nohup) inherits SIGINT ignored, and the trainer and launch.sh
    rightly go on ignoring an ignored SIGINT, so the child would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
