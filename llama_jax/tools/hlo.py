"""What a compiled TPU program does per chip, read from its optimized HLO text (`compiled.as_text()`).

`compiled.cost_analysis()["flops"]` counts the body of a while loop once, so for a model whose layers run
under `jax.lax.scan` (or a gradient-accumulation `fori_loop`) it is off by the trip count. Here each
computation's execution count is propagated down the call graph from ENTRY, with every while loop's trip
count read from its condition (TPU HLO carries no `known_trip_count`: the condition compares the
induction variable, a tuple element, against an s32 constant), and the dots and convolutions are counted
at that multiplicity. The same counts give the collectives a step executes and the bytes they produce.

    summary = analyze(jax.jit(step).lower(*abstract_args).compile().as_text())
    summary.matmul_flops                 # 2 * MACs of every dot/convolution, per chip, loops included
    summary.collectives["all-gather"]    # Collective(count=..., bytes=...)

Limits: a loop whose trip count cannot be read counts once (listed in `unknown_loops`); every branch of a
conditional counts as taken; a matrix-vector product that XLA writes as multiply + reduce is no matmul;
Pallas/Mosaic kernels (custom calls) contribute no FLOPs we can see, only a count in `custom_calls`.
The step-time model built on this reading is tools/hlo_cost.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import defaultdict
from collections.abc import Mapping

import numpy as np

COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")

# Bits per element; HLO dtype names (f8e4m3fn, f8e5m2, s4, f4e2m1fn, ...) map by their leading width.
_DTYPE_BITS = {"pred": 8, "token": 0, "c64": 64, "c128": 128, "tuple": 0, "opaque": 0}
_ARRAY = re.compile(r"([a-z]+\d*[a-z0-9]*)\[([^\]]*)\]")


def dtype_bits(dtype: str) -> int:
    """'bf16' -> 16, 'f8e4m3fn' -> 8, 'pred' -> 8 (one byte per element), 's4' -> 4."""
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    m = re.fullmatch(r"[a-z]+?(\d+)(?:[a-z].*)?", dtype)
    if not m:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return int(m.group(1))


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in an HLO shape, layouts ignored: '(s32[], bf16[8,128]{1,0:T(8,128)(2,1)})' ->
    [('s32', ()), ('bf16', (8, 128))]. Dynamic dims ('<=16') count at their bound."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        out.append((dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())))
    return out


def shape_bytes(shape: str) -> int:
    """Logical bytes of an HLO shape (sum over a tuple's leaves; tiling padding not included)."""
    bits = sum(dtype_bits(dtype) * math.prod(dims) for dtype, dims in array_shapes(shape))
    return (bits + 7) // 8


_LAYOUT_ARRAY = re.compile(r"([a-z]+\d*[a-z0-9]*)\[([^\]]*)\](?:\{([\d,]*)(?::([^}]*))?\})?")


def tiled_bytes(shape: str, hbm_only: bool = False) -> int:
    """Bytes of an HLO shape as TPU HBM holds it: each array's minor dims padded to its layout's first tile
    ('bf16[3,100]{1,0:T(8,128)(2,1)}' -> 8 x 128 x 2 B); arrays without a tiled layout as shape_bytes.
    hbm_only: leave out arrays that memory-space assignment put in the alternate memory (S(1), on-chip VMEM)."""
    bits = 0
    for dtype, dims, minor_to_major, attrs in _LAYOUT_ARRAY.findall(shape):
        if hbm_only and "S(1)" in attrs:
            continue
        dims = [int(d.lstrip("<=")) for d in dims.split(",") if d.strip()]
        tile = re.match(r"T\(([\d,]+)\)", attrs or "")
        if tile and minor_to_major:
            order = [int(d) for d in minor_to_major.split(",")]  # minor first
            for t, d in zip(reversed([int(x) for x in tile.group(1).split(",")]), order):
                dims[d] = -(-dims[d] // t) * t
        bits += dtype_bits(dtype) * math.prod(dims)
    return (bits + 7) // 8


# ---------------------------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]  # names of the instructions used, without '%'
    operand_text: str  # as written: a constant's value lives here
    attrs: str  # everything after the operands, with string literals emptied
    raw_attrs: str  # the same, strings kept (custom_call_target, backend_config)
    is_root: bool


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    instructions: dict[str, Instruction] = dataclasses.field(default_factory=dict)
    root: Instruction | None = None


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(' or '{'), skipping string literals."""
    depth, i, in_str = 0, start, False
    while i < len(text):
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced brackets in HLO: {text[start:start + 80]!r}")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_INSTRUCTION = re.compile(r"\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_NAME = r"%?([\w.\-]+)"


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    i = m.end()
    if line[i] == "(":  # tuple shape
        j = _balanced(line, i)
    else:
        j = line.find(" ", i)
        if j < 0:
            return None
    shape = line[i:j]
    m_op = re.compile(r"\s*([\w\-]+)\(").match(line, j)
    if not m_op:
        return None
    k = _balanced(line, m_op.end() - 1)
    operand_text = line[m_op.end():k - 1]
    raw_attrs = line[k:]
    return Instruction(
        name=m.group(2).lstrip("%"),
        shape=shape,
        opcode=m_op.group(1),
        operands=tuple(re.findall(r"%([\w.\-]+)", operand_text)),
        operand_text=operand_text,
        attrs=_STRING.sub('""', raw_attrs),
        raw_attrs=raw_attrs,
        is_root=bool(m.group(1)),
    )


# A computation's last line: "}", or '}, execution_thread="sparsecore"' for one offloaded to the SparseCore
# (a kernel's multi-line config can also start a line with "}}, ...").
_END = re.compile(r'\}(, execution_thread="\w+")?\s*$')


def parse(hlo_text: str) -> dict[str, Computation]:
    """Computations by name; each holds its instructions by name (operands refer to these)."""
    comps: dict[str, Computation] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$", line)
            if m:
                current = comps[m.group(2)] = Computation(m.group(2), is_entry=bool(m.group(1)))
            continue
        if _END.match(line):
            current = None
            continue
        ins = _parse_instruction(line)
        if ins is not None:
            current.instructions[ins.name] = ins
            if ins.is_root:
                current.root = ins
    return comps


def called_computations(ins: Instruction) -> list[tuple[str, str]]:
    """(role, computation) for every computation the instruction calls: calls/body/condition/to_apply/
    branch_computations/called_computations. An async-done names its wrapped computation again; the
    async-start already ran it, so it is skipped."""
    if ins.opcode in ("async-done", "async-update"):
        return []
    out = [(role, name) for role, name in re.findall(rf"\b(calls|body|condition|to_apply)={_NAME}", ins.attrs)]
    for role, group in re.findall(r"\b(branch_computations|called_computations)=\{([^}]*)\}", ins.attrs):
        out += [(role, n) for n in re.findall(_NAME, group)]
    return out


# ----------------------------------------------------------------------------------------- while loops


@dataclasses.dataclass(frozen=True)
class Loop:
    name: str  # the while instruction
    computation: str  # where it sits
    body: str
    condition: str
    trip_count: int | None  # None: could not be read from the HLO


def _resolve(comps, comp: Computation, name: str, frame=None, depth: int = 0):
    """What a scalar value is, as far as loop bounds need: ('const', v), ('elem', k) = element k of the
    computation's tuple parameter, ('elem+', k, c) = that plus a constant, or None. `frame` is
    (caller computation, operand names, caller frame) when `comp` is a fusion's computation, so its
    parameters resolve to the fusion's operands."""
    ins = comp.instructions.get(name)
    if ins is None or depth > 32:
        return None
    op = ins.opcode
    if op == "constant":
        m = re.fullmatch(r"\s*(-?\d+)\s*", ins.operand_text)
        return ("const", int(m.group(1))) if m else None
    if op in ("copy", "bitcast", "convert", "reshape") and ins.operands:
        return _resolve(comps, comp, ins.operands[0], frame, depth + 1)
    if op == "parameter" and frame is not None:
        caller, operands, caller_frame = frame
        idx = int(ins.operand_text)
        return _resolve(comps, caller, operands[idx], caller_frame, depth + 1) if idx < len(operands) else None
    if op == "get-tuple-element" and ins.operands:
        return _resolve_element(comp, ins, frame)
    if op == "fusion" and ins.operands:
        callee = dict(called_computations(ins)).get("calls")
        if callee in comps and comps[callee].root is not None:
            fused = comps[callee]
            return _resolve(comps, fused, fused.root.name, (comp, ins.operands, frame), depth + 1)
        return None
    if op in ("add", "subtract") and len(ins.operands) == 2:
        a, b = (_resolve(comps, comp, o, frame, depth + 1) for o in ins.operands)
        return _resolve_sum(a, b, 1 if op == "add" else -1)
    return None


def _resolve_element(comp: Computation, ins: Instruction, frame):
    """A get-tuple-element of the computation's own tuple parameter: ('elem', k)."""
    src = comp.instructions.get(ins.operands[0])
    m = re.search(r"\bindex=(\d+)", ins.attrs)
    if src is not None and src.opcode == "parameter" and frame is None and m:
        return ("elem", int(m.group(1)))
    return None


def _resolve_sum(a, b, sign: int):
    """a + sign * b, for resolved values a and b (see _resolve), when it is one of its forms."""
    if a and b and a[0] == "const" and b[0] == "const":
        return ("const", a[1] + sign * b[1])
    if a and a[0] == "elem" and b and b[0] == "const":
        return ("elem+", a[1], sign * b[1])
    if sign == 1 and b and b[0] == "elem" and a and a[0] == "const":
        return ("elem+", b[1], a[1])
    return None


def _count(init: int, limit: int, step: int, direction: str) -> int | None:
    """Iterations of `for (i = init; i <direction> limit; i += step)`."""
    if direction == "LT" and step > 0:
        return max(0, -(-(limit - init) // step))
    if direction == "LE" and step > 0:
        return max(0, (limit - init) // step + 1)
    if direction == "GT" and step < 0:
        return max(0, -(-(init - limit) // -step))
    if direction == "GE" and step < 0:
        return max(0, (init - limit) // -step + 1)
    if direction == "NE" and step != 0 and (limit - init) % step == 0 and (limit - init) // step >= 0:
        return (limit - init) // step
    return None


_FLIP = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _trip_count(comps, parent: Computation, w: Instruction, cond_name: str, body_name: str) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', w.raw_attrs)
    if m:  # other backends annotate it
        return int(m.group(1))
    cond, body = comps.get(cond_name), comps.get(body_name)
    if cond is None or body is None or cond.root is None or body.root is None:
        return None
    bound = _loop_bound(comps, cond)
    if bound is None:
        return None
    k, limit, direction = bound
    # The induction variable's start, in the tuple the while is given, and its step, in the body's root.
    init_tuple = parent.instructions.get(w.operands[0]) if w.operands else None
    if init_tuple is None or init_tuple.opcode != "tuple" or k >= len(init_tuple.operands):
        return None
    init = _resolve(comps, parent, init_tuple.operands[k])
    if body.root.opcode != "tuple" or k >= len(body.root.operands):
        return None
    nxt = _resolve(comps, body, body.root.operands[k])
    if not init or init[0] != "const" or not nxt or nxt[0] != "elem+" or nxt[1] != k:
        return None
    return _count(init[1], limit, nxt[2], direction)


def _loop_bound(comps, cond: Computation) -> tuple[int, int, str] | None:
    """(k, limit, direction) of a loop condition `element k <direction> limit`: its root compare, possibly
    inside a fusion; None when it is not of that form."""
    cmp_comp, cmp, frame = cond, cond.root, None
    if cmp.opcode == "fusion":
        callee = dict(called_computations(cmp)).get("calls")
        if callee not in comps or comps[callee].root is None:
            return None
        cmp_comp, frame, cmp = comps[callee], (cond, cmp.operands, None), comps[callee].root
    if cmp.opcode != "compare" or len(cmp.operands) != 2:
        return None
    direction = re.search(r"\bdirection=(\w+)", cmp.attrs)
    lhs, rhs = (_resolve(comps, cmp_comp, o, frame) for o in cmp.operands)
    if not direction or not lhs or not rhs:
        return None
    direction = direction.group(1)
    if lhs[0] == "const" and rhs[0] == "elem":
        lhs, rhs, direction = rhs, lhs, _FLIP[direction]
    if lhs[0] != "elem" or rhs[0] != "const":
        return None
    return lhs[1], rhs[1], direction


# ------------------------------------------------------------------------------------------ the summary


@dataclasses.dataclass(frozen=True)
class Collective:
    count: int  # executions per program run (async start/done pairs once)
    bytes: int  # sum over those executions of the result size (per chip)


@dataclasses.dataclass(frozen=True)
class HloSummary:
    loops: tuple[Loop, ...]
    multipliers: Mapping[str, int]  # computation -> executions per program run (0: unreachable)
    # Every kind in COLLECTIVE_KINDS, and "<kind> across slices" for each kind a multi-slice program sends over DCN.
    collectives: Mapping[str, Collective]
    matmul_flops: int  # per chip per program run
    custom_calls: Mapping[str, int]  # custom_call_target -> executions

    @property
    def unknown_loops(self) -> tuple[Loop, ...]:
        """Loops counted once because their trip count could not be read."""
        return tuple(loop for loop in self.loops if loop.trip_count is None)

    @property
    def collective_bytes(self) -> int:
        return sum(c.bytes for c in self.collectives.values())


def dot_flops(ins: Instruction, operand_shape: str) -> int:
    """2 * MACs of a dot: every output element sums over the lhs contracting dims."""
    (_, out), (_, lhs) = array_shapes(ins.shape)[0], array_shapes(operand_shape)[0]
    m = re.search(r"\blhs_contracting_dims=\{([\d,\s]*)\}", ins.attrs)
    contracting = [int(d) for d in m.group(1).split(",") if d.strip()] if m else []
    return 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _window_taps(n_in: int, n_out: int, size: int, stride: int, lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, kernel tap) pairs of one spatial dim that land on a real input element, not on
    padding or on a hole of lhs dilation. XLA writes a batched matmul as a convolution over a "spatial"
    batch dim (window size=B, lhs_dilate=B, stride=B-1) where just one tap per output is real."""
    o = np.arange(n_out)[:, None]
    k = np.arange(size)[None, :]
    x = o * stride - lo + k * rhs_dilate  # in the dilated input
    real = (x >= 0) & (x <= (n_in - 1) * lhs_dilate) & (x % lhs_dilate == 0)
    return int(real.sum())


def convolution_flops(ins: Instruction, input_shape: str, kernel_shape: str) -> int:
    """2 * MACs of a convolution: per output batch x feature, the kernel's input features (already divided
    by feature_group_count) times the real (output position, kernel tap) pairs of every spatial dim."""
    out = array_shapes(ins.shape)[0][1]
    lhs = array_shapes(input_shape)[0][1]
    kernel = array_shapes(kernel_shape)[0][1]
    m = re.search(r"\bdim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not m or (len(m.group(1)), len(m.group(2)), len(m.group(3))) != (len(lhs), len(kernel), len(out)):
        raise ValueError(f"cannot read dim_labels of {ins.name}: {ins.attrs[:200]!r}")
    lhs_labels, rhs_labels, out_labels = m.groups()
    spatial = sorted(c for c in rhs_labels if c.isdigit())  # window={...} lists these dims in this order
    window = {"stride": ["1"] * len(spatial), "pad": ["0_0"] * len(spatial),
              "lhs_dilate": ["1"] * len(spatial), "rhs_dilate": ["1"] * len(spatial)}
    w = re.search(r"\bwindow=\{([^}]*)\}", ins.attrs)
    for item in w.group(1).split() if w else []:
        key, _, value = item.partition("=")
        window[key] = value.split("x")
    macs = math.prod(n for label, n in zip(out_labels, out) if not label.isdigit())
    macs *= kernel[rhs_labels.index("i")]
    for d, label in enumerate(spatial):
        macs *= _window_taps(
            n_in=lhs[lhs_labels.index(label)],
            n_out=out[out_labels.index(label)],
            size=kernel[rhs_labels.index(label)],
            stride=int(window["stride"][d]),
            lo=int(window["pad"][d].split("_")[0]),
            lhs_dilate=int(window["lhs_dilate"][d]),
            rhs_dilate=int(window["rhs_dilate"][d]),
        )
    return 2 * macs


def _is_reduce_scatter(comp: Computation) -> bool:
    """TPU writes a reduce-scatter as a kCustom fusion whose root slices this chip's part out of an
    all-reduce: the fusion is the reduce-scatter, the all-reduce inside an implementation detail."""
    root = comp.root
    if root is None or root.opcode != "dynamic-slice" or not root.operands:
        return False
    src = comp.instructions.get(root.operands[0])
    return src is not None and src.opcode == "all-reduce"


def collective_kind(opcode: str) -> str | None:
    """'all-gather' and 'all-gather-done' -> 'all-gather'; '-start' halves and anything else -> None."""
    base = opcode[: -len("-done")] if opcode.endswith("-done") else opcode
    if base == "ragged-all-to-all":
        base = "all-to-all"
    return base if base in COLLECTIVE_KINDS else None


@functools.lru_cache(maxsize=1)  # the planner reads one program twice: analyze, then cost
def program(hlo_text: str):
    """(computations, while loops, executions per run of each computation, reduce-scatter fusions) of one
    compiled program; read-only for the callers."""
    comps = parse(hlo_text)
    entry = next((c for c in comps.values() if c.is_entry), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    loops, edges = _call_graph(comps)
    multipliers = _multipliers(comps, entry.name, edges)
    return comps, loops, multipliers, {c.name for c in comps.values() if _is_reduce_scatter(c)}


def analyze(hlo_text: str) -> HloSummary:
    """Loops, per-computation execution counts, collectives, matmul FLOPs and custom calls of one
    compiled program (the optimized HLO of one chip; SPMD programs are the same on every chip)."""
    comps, loops, multipliers, rs_comps = program(hlo_text)
    collectives = {kind: [0, 0] for kind in COLLECTIVE_KINDS}
    custom_calls: dict[str, int] = defaultdict(int)
    flops = 0
    for comp in comps.values():
        n = multipliers[comp.name]
        if n == 0:
            continue
        shapes = {i.name: i.shape for i in comp.instructions.values()}
        for ins in comp.instructions.values():
            kind, nbytes = collective_of(ins, comp.name, rs_comps), shape_bytes(ins.shape)
            if ins.opcode == "send" and (cross := megascale(ins)):  # the DCN part of a collective across slices
                kind, nbytes = f"{cross[0]} across slices", shape_bytes(array_shapes_text(ins.shape)[0])
            if kind is not None:
                counts = collectives.setdefault(kind, [0, 0])
                counts[0] += n
                counts[1] += n * nbytes
            elif ins.opcode == "custom-call":
                m = re.search(r'custom_call_target="([^"]*)"', ins.raw_attrs)
                custom_calls[m.group(1) if m else "?"] += n
            else:
                flops += n * op_matmul_flops(ins, shapes)
    return HloSummary(
        loops=tuple(loops),
        multipliers=dict(multipliers),
        collectives={k: Collective(count, nbytes) for k, (count, nbytes) in collectives.items()},
        matmul_flops=flops,
        custom_calls=dict(custom_calls),
    )


def _call_graph(comps) -> tuple[list[Loop], dict[str, list[tuple[str, int]]]]:
    """The while loops, and the call graph's edges {caller: [(callee, times per caller execution)]}: a
    loop's body runs trip-count times and its condition once more (an unknown trip count counts once)."""
    loops: list[Loop] = []
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for comp in comps.values():
        for ins in comp.instructions.values():
            callees = called_computations(ins)
            if ins.opcode != "while":
                edges[comp.name] += [(callee, 1) for _, callee in callees]
                continue
            roles = dict(callees)
            body, cond = roles.get("body"), roles.get("condition")
            trip = _trip_count(comps, comp, ins, cond, body)
            loops.append(Loop(ins.name, comp.name, body, cond, trip))
            n = 1 if trip is None else trip
            edges[comp.name] += [(body, n), (cond, n + 1 if trip is not None else 1)]
    return loops, edges


def _multipliers(comps, entry: str, edges) -> dict[str, int]:
    """Executions per run of every computation (0: unreachable): the sum over its call sites of the
    caller's executions times the edge's factor, in topological order from the entry."""
    reachable = _reachable(comps, entry, edges)
    indegree = dict.fromkeys(reachable, 0)
    for c in reachable:
        for callee, _ in edges[c]:
            if callee in indegree:
                indegree[callee] += 1
    multipliers = dict.fromkeys(comps, 0) | {entry: 1}
    ready = [c for c, d in indegree.items() if d == 0]
    while ready:
        c = ready.pop()
        for callee, factor in edges[c]:
            if callee in indegree:
                multipliers[callee] += multipliers[c] * factor
                indegree[callee] -= 1
                if indegree[callee] == 0:
                    ready.append(callee)
    return multipliers


def _reachable(comps, entry: str, edges) -> set[str]:
    reachable, stack = {entry}, [entry]
    while stack:
        for callee, _ in edges[stack.pop()]:
            if callee in comps and callee not in reachable:
                reachable.add(callee)
                stack.append(callee)
    return reachable


def collective_of(ins: Instruction, comp: str, rs_comps: set[str]) -> str | None:
    """The collective kind an instruction counts as: a fusion of a reduce-scatter computation is one, and
    the all-reduce inside such a computation is not counted again."""
    if ins.opcode == "fusion" and dict(called_computations(ins)).get("calls") in rs_comps:
        return "reduce-scatter"
    return None if comp in rs_comps else collective_kind(ins.opcode)


def op_matmul_flops(ins: Instruction, shapes: Mapping[str, str]) -> int:
    """The FLOPs of a dot or convolution instruction (0 for anything else)."""
    if ins.opcode == "dot":
        return dot_flops(ins, shapes[ins.operands[0]])
    if ins.opcode == "convolution":
        return convolution_flops(ins, shapes[ins.operands[0]], shapes[ins.operands[1]])
    return 0


_MEGASCALE_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
                    "ALL_TO_ALL": "all-to-all"}


def megascale(ins: Instruction) -> tuple[str, int] | None:
    """(kind, slices) of a cross-slice collective: across slices TPU programs write a collective's DCN part
    as a host-transfer send to the megascale runtime, `_xla_megascale_transfer_type="ALL_REDUCE"`,
    `_xla_megascale_target="{1,2}x{0:7}"` (the slices, then each slice's devices)."""
    kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.raw_attrs)
    target = re.search(r'_xla_megascale_target="\{([^}]*)\}', ins.raw_attrs)
    if not kind or not target:
        return None
    slices = 0
    for part in target.group(1).split(","):
        lo, _, hi = part.partition(":")
        slices += int(hi) - int(lo) + 1 if hi else 1
    return _MEGASCALE_KINDS.get(kind.group(1), "collective-permute"), slices


def array_shapes_text(shape: str) -> list[str]:
    """Each array of an HLO shape as its own text, layout included: '(bf16[2]{0}, u32[])' -> ['bf16[2]{0}', 'u32[]']."""
    return [m.group(0) for m in _LAYOUT_ARRAY.finditer(shape)]
