"""What a compiled XLA program does, read from its HLO text (`compiled.as_text()`): its
computations and how often each runs per call (loops by their trip counts), the collectives and the
bytes each device receives from them, and the bytes its operations read and write in HBM. XLA's
cost analysis counts a loop's body once; these count it as often as it runs."""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 0.5,
    "u4": 0.5,
}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape: an array 'bf16[8,128]{…}' or a tuple of them."""
    return sum(
        DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(shape)
    )


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
    return {
        "all-gather": result_bytes * share,
        "all-to-all": result_bytes * share,
        "reduce-scatter": result_bytes * (group - 1),
        "all-reduce": 2 * result_bytes * share,
    }[op]


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
_NO_TRAFFIC = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "copy-done",
    "all-gather-done",
    "all-reduce-done",
    "collective-permute-done",
    "async-done",
    "send-done",
    "recv-done",
}
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
            args = m[5][: _closing(m[5])]
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
