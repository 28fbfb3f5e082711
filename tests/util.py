"""What several test files share: the repository root and loading a config file's preset."""

import pathlib
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str = "mtp3", preset: str = "tiny", overrides: dict | None = None):
    """configs/<name>.py:<preset> with dotted-key overrides, e.g. {"mesh.data": 2}."""
    config = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"](preset)
    config.update_from_flattened_dict(overrides or {})
    return config
