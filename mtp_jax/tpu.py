"""TPU pods seen from any machine: topologies, the chip table, collectives read from HLO, the roofline.

With libtpu installed (`pip install -e '.[tpu]'`), JAX describes the chips of any TPU topology
without one attached (`jax.experimental.topologies`), and a mesh built on those devices compiles the
real TPU program on this host. `mtp_jax.bench --topology` does that for the train step; this module
holds what it needs to turn a compiled program into the answers: the chip's figures, the bytes each
kind of collective moves per step (from the compiled HLO, loops counted as often as they run), and a
roofline step time.

The roofline bounds a step from below: step time >= max(FLOPs / peak, HBM bytes / HBM bandwidth,
collective bytes / ICI bandwidth + collective latency), per chip, every resource at its peak and
all of them overlapped. Each term is a floor on its own: the FLOPs are the ones the chip executes
(bench's hardware FLOPs), the HBM bytes what the compiled program's operations read and write in
HBM (`hbm_traffic`, loops counted as often as they run), a collective streams over all of the
chip's links (a ring along one torus axis uses 2 of the 4 (v5e, v6e) or 6 (v4, v5p) ports) after
an assumed latency of ICI_HOP_LATENCY_S per ring step. Real steps run slower: non-matmul work,
collectives that do not overlap, kernels below peak. How much slower, published runs say:
each chip's `mfu_band`, with its source, is the model-FLOPs utilisation those runs reached,
which bench applies to the bound as an assumed efficiency.
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
    "v4": Chip(275e12, 32 * GiB, 1200e9, 2 * 1.1e15 / 4096, 3, (0.462, 0.462),
               "PaLM 540B on 6144 v4 chips (arXiv 2204.02311)"),
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
# (jax-ml.github.io/scaling-book) puts an ICI hop at about 1 us. A ring over g chips takes g - 1
# steps (an all-reduce 2 (g - 1)), so small collectives over many chips cost latency, not bytes; a
# ring that runs both ways takes half as many, so this term may overstate the latency up to 2x.
ICI_HOP_LATENCY_S = 1e-6

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
    group: int = 1  # devices in each of its replica groups

    @property
    def latency_s(self) -> float:
        """Assumed latency of all its executions: ICI_HOP_LATENCY_S per step of the ring."""
        steps = 1 if self.op == "collective-permute" else (self.group - 1) * (2 if self.op == "all-reduce" else 1)
        return self.count * steps * ICI_HOP_LATENCY_S


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
            group = group_size(line)
            per_run = moved_bytes(op, shape_bytes(shape), group)
            name = re.search(r'op_name="([^"]*)"', line)
            found.append(Collective(op, per_run * runs[comp], runs[comp], name[1] if name else "", group))
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


# ------------------------------------------------------------------------------------------ HBM traffic
_NAMED = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_LAID_OUT = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\](\{[^}]*\})?")
# Operations that move no data of their own: structure, control flow (their computations are
# counted where they run) and the second halves of asynchronous pairs (counted at their start).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done", "send-done", "recv-done"}
_SLICES = {"dynamic-slice", "slice", "gather"}


def hbm_bytes(shape: str) -> float:
    """Bytes of the arrays of an HLO shape that live in HBM: memory space 0, a layout without S(n)
    (TPU layouts mark on-chip memory as S(1) and up)."""
    total = 0.0
    for dtype, dims, layout in _LAID_OUT.findall(shape):
        space = re.search(r"S\((\d+)\)", layout)
        if space is None or space[1] == "0":
            total += DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


@dataclasses.dataclass
class _Op:
    name: str
    shape: str
    opcode: str
    operands: list[str]  # names; a parameter's: its index
    fused: str | None  # the computation a fusion calls
    root: bool


def _ops(lines: list[str]) -> list[_Op]:
    ops = []
    for line in lines:
        m = _NAMED.match(line)
        if m:
            args = m[5][:_closing(m[5])]
            fused = re.search(r"calls=%([\w.\-]+)", m[5]) if m[4] == "fusion" else None
            operands = [args.strip()] if m[4] == "parameter" else re.findall(r"%([\w.\-]+)", args)
            ops.append(_Op(m[2], m[3], m[4], operands, fused and fused[1], bool(m[1])))
    return ops


def _closing(text: str) -> int:
    """Index of the parenthesis that closes an operand list opened just before `text`."""
    depth = 1
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return i
    return len(text)


def hbm_traffic(hlo: str) -> float:
    """Bytes one run of a compiled program reads from and writes to HBM: each top-level
    operation's operands and results that live there, every computation counted as often as it
    runs (loop bodies by their trip counts, `executions`). A fusion's operand counts as much as the
    fusion reads of it (a dynamic slice of a stacked weight: the slice; a buffer it updates in
    place: nothing) and a result updated in place as the update; what a fusion does inside stays
    on the chip. XLA's own "bytes accessed" counts each loop body once, and on TPU also on-chip
    traffic."""
    comps = {name: _ops(lines) for name, lines in computations(hlo).items() if name}
    runs = executions(computations(hlo))
    fused = {op.fused for ops in comps.values() for op in ops if op.fused}
    total = 0.0
    for comp, ops in comps.items():
        if comp in fused or comp not in runs:
            continue
        shapes = {op.name: op.shape for op in ops}
        for op in ops:
            if op.opcode in _NO_TRAFFIC:
                continue
            if op.fused:
                body = comps.get(op.fused, [])
                reads = sum(_read(comps, body, i, shapes.get(name, "")) for i, name in enumerate(op.operands))
                traffic = reads + _written(op.shape, body)
            elif op.opcode == "dynamic-update-slice":  # in place: the update read and written
                traffic = 2 * hbm_bytes(shapes.get(op.operands[1], ""))
            else:
                traffic = sum(hbm_bytes(shapes.get(name, "")) for name in op.operands) + _result_bytes(op)
            total += traffic * runs[comp]
    return total


def _result_bytes(op: _Op) -> float:
    """HBM bytes an unfused operation writes. An asynchronous start's result is a tuple of its
    operands (or, for a copy, its destination first) and what it produces: only the latter is
    written."""
    if not op.opcode.endswith("-start") or op.opcode == "all-reduce-start":
        return hbm_bytes(op.shape)
    parts = _top_level(op.shape[1:-1])
    return hbm_bytes(parts[0] if op.opcode == "copy-start" else parts[1])


def _written(shape: str, body: list[_Op]) -> float:
    """HBM bytes a fusion writes of its result `shape`: each output an in-place update produces
    counts as the update."""
    by_name = {op.name: op for op in body}
    root = next((op for op in body if op.root), None)
    outputs = _top_level(shape[1:-1]) if shape.startswith("(") else [shape]
    producers = root.operands if root is not None and root.opcode == "tuple" else [root and root.name]
    written = 0.0
    for output, name in zip(outputs, producers):
        producer = by_name.get(name)
        while producer is not None and producer.opcode == "bitcast":
            producer = by_name.get(producer.operands[0])
        if producer is not None and producer.opcode == "dynamic-update-slice" and hbm_bytes(output):
            written += shape_bytes(by_name[producer.operands[1]].shape) if producer.operands[1] in by_name else 0.0
        else:
            written += hbm_bytes(output)
    return written


def _read(comps: dict[str, list[_Op]], body: list[_Op], index: int, shape: str) -> float:
    """HBM bytes a fused computation reads of its operand `index` (of HBM shape `shape`): the
    slices its users take, nothing where it is the buffer of an in-place update, else all."""
    if not hbm_bytes(shape):
        return 0.0
    param = next((op for op in body if op.opcode == "parameter" and op.operands == [str(index)]), None)
    users = [(op, op.operands.index(param.name)) for op in body if param and param.name in op.operands]
    if not users:
        return hbm_bytes(shape)
    read = 0.0
    for user, position in users:
        if user.opcode in _SLICES and position == 0:
            read += shape_bytes(user.shape)
        elif user.opcode == "dynamic-update-slice" and position == 0:
            continue
        elif user.fused:
            read += _read(comps, comps.get(user.fused, []), position, shape)
        else:
            return hbm_bytes(shape)
    return min(read, hbm_bytes(shape))


def out_of_memory(message: str) -> float | None:
    """The bytes of temporaries a TPU compile refused for lack of HBM (its error message), else None."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM", message)
    return None if found is None else float(found[1]) * 2 ** (10 * " KMGT".index(found[2]))


# ------------------------------------------------------------------------------------------ roofline
def roofline(chip: Chip, flops: float, hbm_bytes: float, ici_bytes: float = 0.0, ici_latency_s: float = 0.0) -> dict:
    """The floor on one step's time per chip (module docstring) and the resource that sets it."""
    terms = {"compute": flops / chip.peak_flops, "memory": hbm_bytes / chip.hbm_bytes_per_s,
             "ici": ici_bytes / (chip.ici_bytes_per_s / 2) + ici_latency_s}  # bidirectional: half each way
    bound = max(terms, key=terms.get)
    return {"compute_s": terms["compute"], "hbm_s": terms["memory"], "ici_s": terms["ici"],
            "step_time_floor_s": terms[bound], "bound": bound}
