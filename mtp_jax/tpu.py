"""TPU pods seen from any machine: topologies, the chip table, collectives read from HLO, the roofline.

With libtpu installed (`pip install -e '.[tpu]'`), JAX describes the chips of any TPU topology
without one attached (`jax.experimental.topologies`), and a mesh built on those devices compiles the
real TPU program on this host. `mtp_jax.bench --topology` does that for the train step; this module
holds what it needs to turn a compiled program into the answers: the chip's figures, the bytes each
kind of collective moves per step (from the compiled HLO, loops counted as often as they run), and a
roofline step time.

The roofline: step time = max(FLOPs / peak, HBM bytes / HBM bandwidth) + collective bytes / ICI
bandwidth, per chip. It assumes no overlap of collectives with compute (XLA overlaps many, so it
errs slow) and that a collective streams over all of the chip's links (a ring along one torus axis
uses 2 of the 4 (v5e, v6e) or 6 (v4, v5p) ports, so it errs fast there); it has no term for
latency, so it is optimistic for small collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies

from mtp_jax.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional, over all of the chip's links
    dims: int  # of the torus: 2 (v5e, v6e) or 3 (v4, v5p)


CHIPS = {
    # Cloud TPU documentation, "TPU v4" (cloud.google.com/tpu/docs/v4): 275 TFLOP/s bf16, 32 GiB
    # HBM2 at 1200 GB/s. It gives no per-chip ICI figure; its all-reduce bandwidth per pod
    # (1.1 PB/s over 4096 chips) relates to it as it does on the v5e and v6e pages (pod all-reduce
    # bandwidth / chips = half the bidirectional per-chip ICI), which gives 537 GB/s.
    "v4": Chip(275e12, 32 * GiB, 1200e9, 2 * 1.1e15 / 4096, 3),
    # "TPU v5e" (cloud.google.com/tpu/docs/v5e): 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s,
    # bidirectional ICI 400 GB/s per chip.
    "v5e": Chip(197e12, 16 * GiB, 819e9, 400e9, 2),
    # "TPU v5p" (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s,
    # bidirectional ICI 1200 GB/s per chip (4800 Gbps).
    "v5p": Chip(459e12, 95 * GiB, 2765e9, 1200e9, 3),
    # "TPU v6e" (cloud.google.com/tpu/docs/v6e), Trillium: 918 TFLOP/s bf16, 32 GB HBM at
    # 1640 GB/s, bidirectional ICI 800 GB/s per chip.
    "v6e": Chip(918e12, 32 * GiB, 1640e9, 800e9, 2),
}

# Cloud accelerator types (`gcloud … --accelerator-type`) and the topology each names. v5e and v6e
# count chips; v4 and v5p count TensorCores, two per chip (v5p-128 is 64 chips, 4x4x4).
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
ACCELERATOR_TYPES = {
    **{f"{gen}-{chips}": f"{gen}:{shape}" for gen in ("v5e", "v6e") for chips, shape in SHAPES_2D.items()},
    **{f"{gen}-{2 * chips}": f"{gen}:{shape}" for gen in ("v4", "v5p") for chips, shape in SHAPES_3D.items()},
}
TOPOLOGY_NAME = re.compile(r"(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?")


def known_topologies() -> str:
    types = "; ".join(f"{gen}-{{{','.join(t.split('-')[1] for t in ACCELERATOR_TYPES if t.startswith(gen + '-'))}}}"
                      for gen in CHIPS)
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
        raise UserError("compiling for a TPU topology needs libtpu, which is not installed: "
                        "pip install -e '.[tpu]'") from None


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
        raise UserError(f"libtpu does not accept the topology {topology!r} ({str(e).splitlines()[0]}): "
                        f"use {known_topologies()}") from None


@contextlib.contextmanager
def traced_for(platform: str):
    """Trace as if `platform` were the default backend. model.py and attention.py choose code by
    jax.default_backend() while tracing ('auto' attention, CPU's fused projections); a program
    compiled on this host for a TPU must make the TPU's choices, as main on the pod would."""
    original = jax.default_backend
    jax.default_backend = lambda: platform
    try:
        yield
    finally:
        jax.default_backend = original


# ------------------------------------------------------------------------------------------ HLO
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape: an array 'bf16[8,128]{…}' or a tuple of them."""
    return sum(DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def group_size(line: str) -> int:
    """Devices in each replica group of a collective instruction."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if mesh:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh[1]))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh[2]))
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if iota:
        return int(iota[1].split(",")[-1])
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if explicit:
        return len(explicit[1].split(","))
    pairs = re.search(r"source_target_pairs=\{([^}]*\})", line)
    return 2 if pairs else 1


def moved_bytes(op: str, result_bytes: float, group: int) -> float:
    """Bytes each device receives for one collective, by the ring algorithm: a group of g gathers
    (g - 1) / g of the result; reduce-scatter's result is one of g pieces of its input;
    all-reduce is a reduce-scatter then an all-gather."""
    if op == "collective-permute":
        return result_bytes
    if group <= 1:
        return 0.0
    share = (group - 1) / group
    return {"all-gather": result_bytes * share, "all-to-all": result_bytes * share,
            "reduce-scatter": result_bytes * (group - 1), "all-reduce": 2 * result_bytes * share}[op]


def computations(hlo: str) -> dict[str, list[str]]:
    """HLO text -> {computation name: its instruction lines}; the entry's name is also under ''."""
    result, name = {}, None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            name = header[1]
            result[name] = []
            if line.startswith("ENTRY "):
                result[""] = result[name]
        elif line.startswith("}"):
            name = None
        elif name is not None:
            result[name].append(line)
    return result


def trip_count(condition: list[str]) -> int | None:
    """Iterations of a while loop whose condition is `counter < constant` (how lax.scan and
    fori_loop lower); None if it is not that."""
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        compare = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if compare and compare[1] in constants:
            return int(constants[compare[1]])
    return None


def executions(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per call of the entry: a while body as often as its
    loop's trip count (1 where that cannot be read), every other callee once per call."""
    counts: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        counts[name] = counts.get(name, 0) + times
        for line in comps.get(name, []):
            trips = 1
            if " while(" in line:
                condition = re.search(r"condition=%([\w.\-]+)", line)
                trips = (trip_count(comps.get(condition[1], [])) if condition else None) or 1
            for kind, callee in _CALLEES.findall(line):
                if kind != "to_apply":  # a reduction's scalar combiner
                    visit(callee, times * (trips if kind == "body" else 1))
            for branches in _BRANCHES.findall(line):
                for callee in re.findall(r"%([\w.\-]+)", branches):
                    visit(callee, times)

    entry = next(k for k, v in comps.items() if k and v is comps[""])
    visit(entry, 1)
    return counts


@dataclasses.dataclass
class Collective:
    op: str
    bytes: float  # received per device, per step (all executions)
    count: int  # executions per step
    name: str  # the JAX operation it came from (HLO metadata op_name)


def collectives(hlo: str) -> list[Collective]:
    """Every collective of a compiled program with the bytes it moves per device per step, largest
    first. Asynchronous pairs (`-start`/`-done`) are counted once, at the start, with the shape
    of the result it produces."""
    comps = computations(hlo)
    runs = executions(comps)
    found = []
    for comp, lines in comps.items():
        if not comp or comp not in runs:
            continue
        for line in lines:
            instruction = _INSTRUCTION.match(line)
            if instruction is None:
                continue
            shape, opcode = instruction[1], instruction[2]
            op = opcode.removesuffix("-start")
            if op not in COLLECTIVES:
                continue
            if opcode.endswith("-start") and op != "all-reduce":
                # (operands, results[, scratch…]): the second element is what the op produces;
                # all-reduce-start's result is its results alone.
                shape = _top_level(shape[1:-1])[1]
            per_run = moved_bytes(op, shape_bytes(shape), group_size(line))
            name = re.search(r'op_name="([^"]*)"', line)
            found.append(Collective(op, per_run * runs[comp], runs[comp], name[1] if name else ""))
    return sorted(found, key=lambda c: -c.bytes)


def _top_level(text: str) -> list[str]:
    """Split a tuple's contents at its top-level commas."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def collective_bytes(found: list[Collective]) -> dict[str, float]:
    """Bytes per device per step for each kind of collective."""
    return {op: sum(c.bytes for c in found if c.op == op) for op in COLLECTIVES}


def out_of_memory(message: str) -> float | None:
    """The bytes of temporaries a TPU compile refused for lack of HBM (its error message), else None."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM", message)
    return None if found is None else float(found[1]) * 2 ** (10 * " KMGT".index(found[2]))


# ------------------------------------------------------------------------------------------ roofline
def roofline(chip: Chip, flops: float, hbm_bytes: float, ici_bytes: float) -> dict:
    """Step time per chip from its FLOPs, HBM traffic and collective bytes (module docstring)."""
    compute_s, memory_s = flops / chip.peak_flops, hbm_bytes / chip.hbm_bytes_per_s
    ici_s = ici_bytes / (chip.ici_bytes_per_s / 2)  # bidirectional: each direction carries half
    return {"compute_s": compute_s, "hbm_s": memory_s, "ici_s": ici_s, "step_time_s": max(compute_s, memory_s) + ici_s,
            "bound": "compute" if compute_s >= memory_s else "memory"}
