"""MTP with 3 tokens, linear heads, geometric weights, mtp_weight 0.2: the default MTP setting.

`mtp(arg, n)` is the shared recipe: configs/mtp4.py is the same with n = 4."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def mtp(arg: str, n: int):
    config = _base["get_config"](arg)
    config.use_mtp = True
    config.mtp_n_tokens = n
    return config


def get_config(arg: str = "nano"):
    return mtp(arg, 3)
