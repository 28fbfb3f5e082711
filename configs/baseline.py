"""Plain next-token prediction: the baseline every MTP run is compared with."""

import pathlib
import runpy

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config(arg: str = "nano"):
    return _base["get_config"](arg)  # base.py's defaults are the baseline: use_mtp=False
