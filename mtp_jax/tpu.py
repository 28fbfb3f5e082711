"""TPU pods seen from any machine: topologies, the chip table, the roofline.

With libtpu installed (`pip install -e '.[tpu]'`), JAX describes the chips of any TPU topology
without one attached (`jax.experimental.topologies`), and a mesh built on those devices compiles the
real TPU program on this host. mtp_jax/tpu_plan.py (`mtp_jax.bench --topology`) does that for the
train step; this module holds what it needs to turn the compiled program's traffic (read by
mtp_jax/hlo.py) into the answers: the chip's figures, the assumed collective latency, and the
roofline.

The roofline bounds a step from below: step time >= max(FLOPs / peak, HBM bytes / HBM bandwidth,
collective bytes / ICI bandwidth + collective latency), per chip, every resource at its peak and
all of them overlapped. Each term is a floor on its own: the FLOPs are the ones the chip executes
(flops.hardware_flops), the HBM bytes what the compiled program's operations read and write in
HBM (`hlo.hbm_traffic`, loops counted as often as they run), a collective streams over all of the
chip's links (a ring along one torus axis uses 2 of the 4 (v5e, v6e) or 6 (v4, v5p) ports) after
an assumed latency of ICI_HOP_LATENCY_S per ring step. Real steps run slower: non-matmul work,
collectives that do not overlap, kernels below peak. How much slower, published runs say:
each chip's `mfu_band`, with its source, is the model-FLOPs utilisation those runs reached,
which bench applies to the bound as an assumed efficiency.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies

from mtp_jax import hlo
from mtp_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional, over all of the chip's links
    dims: int  # of the torus: 2 (v5e, v6e) or 3 (v4, v5p)
    mfu_band: tuple[float, float]  # model-FLOPs utilisation that published training runs reached
    band_source: str


# Published MFU of large dense training runs on each generation (model FLOPs / peak, attention
# counted over the full square as these tables count it):
MAXTEXT = "MaxText README, 'Runtime Performance Results' (github.com/AI-Hypercomputer/maxtext, 2024-25)"
CHIPS = {
    # Cloud TPU documentation, "TPU v4" (cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16, 32 GiB
    # HBM2 at 1200 GB/s. It gives no per-chip ICI figure; its all-reduce bandwidth per pod
    # (1.1 PB/s over 4096 chips) relates to it as it does on the v5e and v6e pages (pod all-reduce
    # bandwidth / chips = half the bidirectional per-chip ICI), which gives 537 GB/s. Band: one
    # run, PaLM 540B on 6144 v4 chips at 46.2 % MFU (Chowdhery et al. 2022, arXiv 2204.02311).
    "v4": Chip(
        275e12, 32 * GiB, 1200e9, 2 * 1.1e15 / 4096, 3, (0.462, 0.462), "PaLM 540B on 6144 v4 chips (arXiv 2204.02311)"
    ),
    # "TPU v5e" (cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s,
    # bidirectional ICI 400 GB/s per chip. Band: MaxText on one v5e-256, 16B-128B: 56.1-66.9 %.
    "v5e": Chip(197e12, 16 * GiB, 819e9, 400e9, 2, (0.561, 0.669), f"{MAXTEXT}: 16B-128B on v5e-256"),
    # "TPU v5p" (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s,
    # bidirectional ICI 1200 GB/s per chip (4800 Gbps). Band: MaxText, 32B on v5p-128 to 1160B on
    # v5p-12288: 64.0-70.3 %.
    "v5p": Chip(459e12, 95 * GiB, 2765e9, 1200e9, 3, (0.640, 0.703), f"{MAXTEXT}: 32B-1160B on v5p-128 to -12288"),
    # "TPU v6e" (cloud.google.com/tpu/docs/v6e), Trillium: 918 TFLOP/s bf16, 32 GB HBM at
    # 1640 GB/s, bidirectional ICI 800 GB/s per chip. No published MFU table: v5e's band, assumed
    # (the same 2D-torus, 256-chip pod design).
    "v6e": Chip(918e12, 32 * GiB, 1640e9, 800e9, 2, (0.561, 0.669), "none published; v5e's band, assumed"),
}
# Latency of one step of a ring collective (one hop over ICI), assumed: "How to Scale Your Model"
# (jax-ml.github.io/scaling-book) puts an ICI hop at about 1 us. A ring over g chips that runs both
# ways takes ceil((g - 1) / 2) steps (an all-reduce twice that), the fewest a ring can: small
# collectives over many chips cost latency, not bytes.
ICI_HOP_LATENCY_S = 1e-6

# Cloud accelerator types (`gcloud … --accelerator-type`) and the topology each names. v5e and v6e
# count chips; v4 and v5p count TensorCores, two per chip (v5p-128 is 64 chips, 4x4x4).
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {
    1: "1x1x1",
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
ACCELERATOR_TYPES = {
    **{f"{gen}-{chips}": f"{gen}:{shape}" for gen in ("v5e", "v6e") for chips, shape in SHAPES_2D.items()},
    **{f"{gen}-{2 * chips}": f"{gen}:{shape}" for gen in ("v4", "v5p") for chips, shape in SHAPES_3D.items()},
}
TOPOLOGY_NAME = re.compile(r"(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?")


def known_topologies() -> str:
    types = "; ".join(
        f"{gen}-{{{','.join(t.split('-')[1] for t in ACCELERATOR_TYPES if t.startswith(gen + '-'))}}}" for gen in CHIPS
    )
    return f"GEN:AxB for v5e and v6e, GEN:AxBxC for v4 and v5p (e.g. v5p:4x4x4), or an accelerator type: {types}"


def topology_name(name: str) -> str:
    """A libtpu topology name ('v5p:4x4x4') from it or from an accelerator type ('v5p-128')."""
    name = ACCELERATOR_TYPES.get(name, name)
    match = TOPOLOGY_NAME.fullmatch(name)
    if match is None or (match[4] is None) != (CHIPS[match[1]].dims == 2):
        raise UserError(f"unknown topology {name!r}: use {known_topologies()}")
    return name


def chip_of(topology: str) -> Chip:
    return CHIPS[topology.split(":")[0]]


def check_libtpu() -> None:
    try:
        import libtpu  # noqa: F401  (optional: only compiling for a topology needs it)
    except ImportError:
        raise UserError(
            "compiling for a TPU topology needs libtpu, which is not installed: pip install -e '.[tpu]'"
        ) from None


def devices(topology: str) -> list:
    """The chips of a topology, as devices a mesh can be built on (nothing is attached)."""
    check_libtpu()
    # Where no TPU VM's metadata says otherwise, tell libtpu it is alone (it only describes chips
    # here), sparing the user its warnings about unknown workers.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # No chip is opened, so several processes may compile at once (libtpu locks the chips otherwise).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chips = math.prod(int(s) for s in topology.split(":")[1].split("x"))
    # libtpu's default host is 2x2x1 chips; a smaller slice is one chip per host.
    bounds = {"chips_per_host_bounds": (1, 1, 1)} if chips < 4 else {}
    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu", **bounds).devices
    except jax.errors.JaxRuntimeError as e:
        raise UserError(
            f"libtpu does not accept the topology {topology!r} ({str(e).splitlines()[0]}): use {known_topologies()}"
        ) from None


def out_of_memory(message: str) -> float | None:
    """The bytes of temporaries a TPU compile refused for lack of HBM (its error message), else None."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM", message)
    return None if found is None else float(found[1]) * 2 ** (10 * " KMGT".index(found[2]))


# ------------------------------------------------------------------------------------------ roofline
def collective_latency_s(collective: hlo.Collective) -> float:
    """Assumed latency of all of a collective's executions: ICI_HOP_LATENCY_S per step of its ring,
    run both ways."""
    op, group = collective.op, collective.group
    steps = 1 if op == "collective-permute" else -(-(group - 1) // 2) * (2 if op == "all-reduce" else 1)
    return collective.count * steps * ICI_HOP_LATENCY_S


def roofline(chip: Chip, flops: float, hbm_bytes: float, ici_bytes: float = 0.0, ici_latency_s: float = 0.0) -> dict:
    """The floor on one step's time per chip (module docstring) and the resource that sets it."""
    terms = {
        "compute": flops / chip.peak_flops,
        "memory": hbm_bytes / chip.hbm_bytes_per_s,
        "ici": ici_bytes / (chip.ici_bytes_per_s / 2) + ici_latency_s,
    }  # bidirectional: half each way
    bound = max(terms, key=terms.get)
    return {
        "compute_s": terms["compute"],
        "hbm_s": terms["memory"],
        "ici_s": terms["ici"],
        "step_time_floor_s": terms[bound],
        "bound": bound,
    }
