"""MTP with 4 tokens, linear heads, geometric weights, mtp_weight 0.2."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config(arg: str = "nano"):
    config = _base["get_config"](arg)
    config.use_mtp = True
    config.mtp_n_tokens = 4
    return config
