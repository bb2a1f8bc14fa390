"""A roofline time model of a compiled TPU program, per chip, read from its optimized HLO (tools/hlo.py).

    cost(compiled.as_text(), Chip(peak_flops, hbm_bytes_per_s, ici_bytes_per_s, dcn_bytes_per_s, slice_of))

Each top-level op (a fusion or a lone instruction, times its executions: loops counted by their trip counts)
takes max(matmul FLOPs / peak, HBM bytes / bandwidth); each collective takes its ring traffic over ICI, or over
DCN when its group spans slices (a permute: when one of its hops does; a cross-slice send to the megascale
runtime: always). No per-op launch cost, no overlap model beyond the two bounds `Cost` gives.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from llama_jax.tools.hlo import (
    Computation,
    Instruction,
    array_shapes_text,
    called_computations,
    collective_kind,
    collective_of,
    megascale,
    op_matmul_flops,
    program,
    tiled_bytes,
)


@dataclasses.dataclass(frozen=True)
class Chip:
    """What the time model needs of a chip (tools/tpu.py TpuSlice has these), per chip, bytes/s and FLOP/s.
    `slice_of[k]`: the slice of the device with logical id k (the program's device assignment order)."""

    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    dcn_bytes_per_s: float
    slice_of: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Cost:
    """A roofline estimate of one program run, per chip, in seconds: each top-level op (a fusion or a
    lone instruction of the entry or a loop body, times its executions) takes max(FLOPs / peak, bytes /
    HBM bandwidth) and counts as `compute_s` or `memory_s` by which bound it hit; each collective takes
    its ring traffic over ICI (`ici_s`) or, when its group spans slices, DCN (`dcn_s`)."""

    compute_s: float
    memory_s: float
    ici_s: float
    dcn_s: float
    flops: float  # matmul FLOPs the ops carry (kernels' custom calls: none)
    bytes: float  # HBM bytes the ops read and write
    # Custom-call kernels (Pallas/Mosaic) show their bytes but not their FLOPs: the caller adds their
    # compute time when it knows their FLOPs (the planner: splash attention's, from the model).
    kernel_s: float = 0.0

    @property
    def ops_s(self) -> float:
        return self.compute_s + self.memory_s + self.kernel_s

    @property
    def collectives_s(self) -> float:
        return self.ici_s + self.dcn_s

    @property
    def overlapped_s(self) -> float:
        """If every collective ran under the ops (XLA's async collectives aim for this): a lower bound."""
        return max(self.ops_s, self.collectives_s)

    @property
    def exposed_s(self) -> float:
        """If no collective overlapped anything: an upper bound."""
        return self.ops_s + self.collectives_s


# Instructions that move no HBM bytes of their own (aliases, control flow, whose bodies are counted).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "async-start",
         "async-update", "async-done", "copy-done", "send", "send-done", "recv", "recv-done"}


def replica_groups(ins: Instruction) -> np.ndarray | None:
    """The device groups of a collective, [groups, group size] of logical device ids, from any of HLO's
    three spellings: {{0,1},{2,3}}; iota [2,4]<=[4,2]T(1,0); mesh['axis_0'=4,'axis_1'=2], device_ids=(...)
    {'axis_1'} (the group runs over the named axes). None when there is none (all devices, or a permute)."""
    a = ins.raw_attrs
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", a)
    if m:
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
        return np.array(groups) if groups and groups[0] else None
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", a)
    if m:
        return _iota(m.group(2), m.group(3)).reshape([int(d) for d in m.group(1).split(",")])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                  r"\s*\{([^}]*)\}", a)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        sizes = [int(n) for _, n in axes]
        ids = _iota(m.group(2), m.group(3)) if m.group(2) else np.arange(math.prod(sizes))
        named = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in m.group(4)]
        rest = [i for i in range(len(axes)) if i not in named]
        grid = ids.reshape(sizes).transpose(rest + named)
        return grid.reshape(-1, math.prod(sizes[i] for i in named))
    return None


def source_target_pairs(ins: Instruction) -> np.ndarray | None:
    """A collective-permute's [pairs, 2] (source, target) logical device ids: which chips each hop joins."""
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", ins.raw_attrs)
    if not m:
        return None
    return np.array([[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]).reshape(-1, 2)


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(d) for d in dims.split(",")]
    grid = np.arange(math.prod(shape)).reshape(shape)
    return (grid.transpose([int(p) for p in perm.split(",")]) if perm else grid).reshape(-1)


# Bytes a ring sends per chip, as a multiple of the result's bytes, for a group of n.
_RING = {
    "all-gather": lambda n: (n - 1) / n,
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,  # the result is one shard: (n - 1) / n of the n-shard input
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0,
}


def collective_seconds(kind: str, result_bytes: int, groups: np.ndarray | None, chip: Chip) -> tuple[float, bool]:
    """(seconds, over DCN) for one collective of `kind` whose result is `result_bytes` per chip."""
    if groups is None:  # every device
        n, spans = max(len(chip.slice_of), 2), len(set(chip.slice_of)) > 1
    else:
        n = groups.shape[1]
        spans = bool(chip.slice_of) and any(len({chip.slice_of[i] for i in g if i < len(chip.slice_of)}) > 1
                                            for g in groups)
    if n == 1:
        return 0.0, False
    bw = chip.dcn_bytes_per_s if spans else chip.ici_bytes_per_s
    return _RING[kind](n) * result_bytes / bw, spans


def cost(hlo_text: str, chip: Chip) -> Cost:
    """The roofline time model of one compiled program (see Cost), loops counted by their trip counts."""
    comps, _, multipliers, rs_comps = program(hlo_text)
    fused = _fused_computations(comps)
    flops_of: dict[str, int] = {}
    totals = dict.fromkeys(("compute", "memory", "ici", "dcn", "flops", "bytes"), 0.0)
    for comp in comps.values():
        n = multipliers[comp.name]
        if n == 0 or comp.name in fused:
            continue
        for ins in comp.instructions.values():
            kind = collective_of(ins, comp.name, rs_comps)
            if kind is not None:
                seconds, dcn = collective_seconds(kind, tiled_bytes(ins.shape), _groups_of(comps, comp, ins), chip)
                totals["dcn" if dcn else "ici"] += n * seconds
            elif ins.opcode == "send" and (cross := megascale(ins)):
                kind, slices = cross
                totals["dcn"] += n * _RING[kind](slices) * tiled_bytes(array_shapes_text(ins.shape)[0]) \
                    / chip.dcn_bytes_per_s
            elif ins.opcode not in _FREE and not _collective_half(ins.opcode):
                _add_op(comps, comp, ins, n, chip, flops_of, totals)
    return Cost(totals["compute"], totals["memory"], totals["ici"], totals["dcn"], totals["flops"], totals["bytes"])


def _collective_half(opcode: str) -> bool:
    """A collective's '-start' (its '-done' is what counts) or the all-reduce of a reduce-scatter fusion."""
    return opcode.endswith("-start") and collective_kind(opcode[: -len("-start")]) is not None


def _groups_of(comps, comp: Computation, ins: Instruction) -> np.ndarray | None:
    """The replica groups of a collective instruction (a permute's source-target pairs, each a group of two):
    a '-done' has them on its '-start', a reduce-scatter fusion on the all-reduce inside it."""
    if ins.opcode.endswith("-done") and ins.operands and ins.operands[0] in comp.instructions:
        return _groups_of(comps, comp, comp.instructions[ins.operands[0]])
    if ins.opcode == "fusion":
        inner = comps[dict(called_computations(ins))["calls"]]
        return next((replica_groups(i) for i in inner.instructions.values() if i.opcode == "all-reduce"), None)
    if ins.opcode.startswith("collective-permute"):
        return source_target_pairs(ins)
    return replica_groups(ins)


def _fused_computations(comps) -> set[str]:
    """Computations that run inside another instruction (a fusion's body, a reducer), not as ops of their own."""
    out = set()
    for comp in comps.values():
        for ins in comp.instructions.values():
            for role, callee in called_computations(ins):
                if role == "to_apply" or (role == "calls" and ins.opcode == "fusion"):
                    out.add(callee)
    return out


def _add_op(comps, comp: Computation, ins: Instruction, n: int, chip: Chip, flops_of, totals) -> None:
    flops = _op_flops(comps, ins, {i.name: i.shape for i in comp.instructions.values()}, flops_of)
    nbytes = _op_bytes(comps, comp, ins)
    t_flops, t_bytes = flops / chip.peak_flops, nbytes / chip.hbm_bytes_per_s
    totals["compute" if t_flops >= t_bytes else "memory"] += n * max(t_flops, t_bytes)
    totals["flops"] += n * flops
    totals["bytes"] += n * nbytes


def _op_flops(comps, ins: Instruction, shapes: Mapping[str, str], flops_of: dict[str, int]) -> int:
    """Matmul FLOPs of one top-level op: its own, or those of the dots in its fused computation."""
    if ins.opcode != "fusion":
        return op_matmul_flops(ins, shapes)
    name = dict(called_computations(ins)).get("calls")
    if name not in flops_of:
        inner = comps[name]
        inner_shapes = {i.name: i.shape for i in inner.instructions.values()}
        flops_of[name] = sum(_op_flops(comps, i, inner_shapes, flops_of) for i in inner.instructions.values())
    return flops_of[name]


def _hbm(shape: str) -> int:
    return tiled_bytes(shape, hbm_only=True)


def _op_bytes(comps, comp: Computation, ins: Instruction) -> int:
    """HBM bytes one top-level op reads and writes. A loop's stacked buffers (a scan's [layers, ...] params
    and saved activations) are read by dynamic-slice and written in place by dynamic-update-slice: those
    move a slice, not the buffer."""
    operands = [comp.instructions[o].shape for o in ins.operands if o in comp.instructions]
    if ins.opcode == "copy-start":  # a prefetch into (or eviction from) on-chip memory: one HBM pass
        return tiled_bytes(array_shapes_text(ins.shape)[0])
    if ins.opcode == "dynamic-slice":
        return 2 * _hbm(ins.shape)
    if ins.opcode == "dynamic-update-slice":
        return 2 * _hbm(operands[1]) if len(operands) > 1 else _hbm(ins.shape)
    if ins.opcode != "fusion":
        return _hbm(ins.shape) + sum(_hbm(s) for s in operands)
    inner = comps[dict(called_computations(ins))["calls"]]
    return _fusion_output_bytes(inner) + sum(_parameter_bytes(inner, k, s) for k, s in enumerate(operands))


def _fusion_output_bytes(inner: Computation) -> int:
    """A fusion's written bytes: the update of a root dynamic-update-slice (in place), else the root."""
    roots = [inner.instructions[o] for o in inner.root.operands] if inner.root.opcode == "tuple" else [inner.root]
    total = 0
    for r in roots:
        if r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
            total += _hbm(inner.instructions[r.operands[1]].shape)
        else:
            total += _hbm(r.shape)
    return total


def _parameter_bytes(inner: Computation, k: int, shape: str) -> int:
    """Bytes a fusion reads of its operand k: the slices when it only dynamic-slices it, nothing when it is
    the buffer a root dynamic-update-slice writes in place, else all of it."""
    param = next((i for i in inner.instructions.values() if i.opcode == "parameter" and i.operand_text.strip() == str(k)),
                 None)
    if param is None:
        return _hbm(shape)
    users = [i for i in inner.instructions.values() if param.name in i.operands]
    if users and all(u.opcode == "dynamic-slice" and u.operands[0] == param.name for u in users):
        return sum(_hbm(u.shape) for u in users)
    if users and all(u.opcode == "dynamic-update-slice" and u.operands[0] == param.name for u in users):
        return 0
    return _hbm(shape)
