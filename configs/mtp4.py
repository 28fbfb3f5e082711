"""MTP with 4 tokens, linear heads, geometric weights, mtp_weight 0.2 (configs/mtp3.py with n = 4)."""

import pathlib
import runpy

_mtp3 = runpy.run_path(str(pathlib.Path(__file__).with_name("mtp3.py")))


def get_config(arg: str = "nano"):
    return _mtp3["mtp"](arg, 4)
