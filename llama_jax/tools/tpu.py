"""TPU slices by the names users type ("v5p-128", "v4-32", "v5litepod-16", "v6e-8") and abstract devices
for them, so a jitted step can be lowered and compiled for a slice this machine does not have.

libtpu compiles for an abstract topology on a CPU-only machine: `abstract_devices(parse_slice("v5p-128"))`
is 64 compile-only TPU devices (one per chip, 16 processes); a Mesh of them, NamedShardings and
`jax.jit(...).lower(ShapeDtypeStructs).compile()` give the real TPU program: its per-chip memory
(`memory_analysis()`, or a RESOURCE_EXHAUSTED error naming the largest allocations) and its HLO
(llama_jax.tools.hlo). The runtime backend stays whatever it was (the CPU here); nothing runs on these devices.

Naming (Cloud TPU accelerator types): v4-N and v5p-N count TensorCores, 2 per chip, and run one device
per chip (megacore); v5litepod-N (alias v5e-N) and v6e-N count chips, one TensorCore each.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from llama_jax.errors import ConfigError

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Generation:
    cores_per_chip: int
    # Per-chip HBM that the compiler lets one program use: the largest program libtpu 0.0.42.1 compiles
    # (measured by bisecting the size of a kept-alive buffer) is exactly this many MiB plus the program's
    # own few KiB; its RESOURCE_EXHAUSTED error prints it as "available HBM (30.75G)" etc. It is the
    # nominal HBM less what the runtime reserves (the OOM report lists "reserved"): v4 32 GiB - 1.25 GiB;
    # v5e 16 GiB - 258 MiB; v5p 96 GiB - 263 MiB (sold as "95 GB"); v6e 32 GiB - 772 MiB (260 MiB listed).
    hbm_mib: int
    peak_bf16_flops: float  # per chip, dense
    # Bandwidths for the planner's time model (tools/hlo_cost.py `cost`), bytes/s per chip, from Google's Cloud
    # TPU pages (docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): HBM as listed; ICI is the pod's listed
    # all-reduce bandwidth over its chips (v4 1.1 PB/s / 4096, v5e 51.2 TB/s / 256, v6e 102.4 TB/s / 256),
    # which on the v5e and v6e pages is half the listed bidirectional ICI per chip, so v5p (which lists only
    # that, 1200 GB/s) gets its half too; DCN per chip: v5p lists 50 Gbps, v5e 6.4 Tbps per 256-chip pod
    # (2 x 100 Gbps NICs per 8-chip host); v4 and v6e list none and are given v5e's 25 Gbps.
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    dcn_bytes_per_s: float
    device_kind: str  # what the abstract (and real) devices report
    shapes: dict[int, str]  # chips -> topology shape


def _cube_shapes(max_chips: int, extra: dict[int, str] | None = None) -> dict[int, str]:
    """v4/v5p slice shapes: 2x2x1 (one host), 2x2x2, then double the smallest dimension, last-first."""
    shapes, dims = {4: "2x2x1"}, [2, 2, 1]
    while math.prod(dims) * 2 <= max_chips:
        i = max(i for i in range(3) if dims[i] == min(dims))
        dims[i] *= 2
        shapes[math.prod(dims)] = "x".join(map(str, sorted(dims)))
    return shapes | (extra or {})


_LITE_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

GENERATIONS: dict[str, _Generation] = {
    "v4": _Generation(2, 31485, 275e12, 1200e9, 1.1e15 / 4096, 25e9 / 8, "TPU v4", _cube_shapes(4096)),
    "v5p": _Generation(2, 98041, 459e12, 2765e9, 600e9, 50e9 / 8, "TPU v5", _cube_shapes(4096, {6144: "16x16x24"})),
    "v5e": _Generation(1, 16126, 197e12, 819e9, 51.2e12 / 256, 25e9 / 8, "TPU v5 lite", _LITE_SHAPES),
    "v6e": _Generation(1, 31996, 918e12, 1638e9, 102.4e12 / 256, 25e9 / 8, "TPU v6 lite", _LITE_SHAPES),
}

# Typed prefix -> generation. "v5litepod" is the Cloud TPU accelerator type; "v5e" the name people say.
_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One TPU slice; `hosts` counts TPU VMs, i.e. JAX processes (`jax.process_count()` on the slice)."""

    name: str  # as typed: "v5p-128"
    generation: str  # "v4" | "v5e" | "v5p" | "v6e"
    topology: str  # for get_topology_desc: "v5p:4x4x4"
    chips: int
    hosts: int
    chips_per_host: int
    hbm_bytes: int  # per chip, as the compiler counts it (see _Generation.hbm_mib)
    peak_bf16_flops: float  # per chip
    hbm_bytes_per_s: float  # per chip; these three: see _Generation
    ici_bytes_per_s: float
    dcn_bytes_per_s: float
    chips_per_host_bounds: tuple[int, int, int]  # the chip block one host owns
    chip_config_name: str | None = None  # "megacore" on v4: one device per chip, not per TensorCore

    @property
    def shape(self) -> tuple[int, ...]:
        """The chip grid: (4, 4, 4) for v5p-128, (2, 4) for v6e-8."""
        return tuple(int(d) for d in self.topology.split(":")[1].split("x"))

    @property
    def device_kind(self) -> str:
        return GENERATIONS[self.generation].device_kind

    @property
    def topology_kwargs(self) -> dict:
        """The keyword arguments `get_topology_desc` needs besides topology_name and platform."""
        kwargs: dict = {"chips_per_host_bounds": self.chips_per_host_bounds}
        if self.chip_config_name:
            kwargs["chip_config_name"] = self.chip_config_name
        return kwargs


def valid_names() -> list[str]:
    """Every name parse_slice accepts ("v5e-N" aside, an alias of "v5litepod-N")."""
    names = []
    for prefix, gen in _PREFIXES.items():
        if prefix == "v5e":
            continue
        g = GENERATIONS[gen]
        names += [f"{prefix}-{chips * g.cores_per_chip}" for chips in g.shapes]
    return names


def _valid_names_message() -> str:
    lines = []
    for prefix, gen in _PREFIXES.items():
        if prefix == "v5e":
            continue
        g = GENERATIONS[gen]
        counts = ", ".join(str(chips * g.cores_per_chip) for chips in g.shapes)
        unit = "TensorCores, 2 per chip" if g.cores_per_chip == 2 else "chips"
        lines.append(f"{prefix}-N ({unit}) with N in {counts}")
    return "; ".join(lines) + " (v5e-N is accepted for v5litepod-N)"


def parse_slice(name: str) -> TpuSlice:
    """'v5p-128' -> TpuSlice(topology='v5p:4x4x4', chips=64, hosts=16, ...); ConfigError for anything else.

    Hosts: v4 and v5p hosts hold 4 chips (a 2x2x1 block). v5e and v6e slices of 1, 4 or 8 chips are one
    VM; larger ones are provisioned as VMs of 4 chips (2x2), so v6e-256 is 64 JAX processes.
    """
    m = re.fullmatch(r"\s*([a-z0-9]+)-(\d+)\s*", name.lower())
    gen_name = _PREFIXES.get(m.group(1)) if m else None
    if gen_name is None:
        raise ConfigError(f"Unknown TPU slice {name!r}; expected one of: {_valid_names_message()}.")
    g = GENERATIONS[gen_name]
    count = int(m.group(2))
    chips, rem = divmod(count, g.cores_per_chip)
    if rem or chips not in g.shapes:
        raise ConfigError(f"{name!r} is not a {gen_name} slice size; expected one of: {_valid_names_message()}.")
    shape = tuple(int(d) for d in g.shapes[chips].split("x"))
    if len(shape) == 3:
        per_host = (2, 2, 1)
    elif chips <= 8:
        per_host = (*shape, 1)  # the whole slice is one VM
    else:
        per_host = (2, 2, 1)
    chips_per_host = math.prod(per_host)
    return TpuSlice(
        name=name.strip(),
        generation=gen_name,
        topology=f"{gen_name}:{g.shapes[chips]}",
        chips=chips,
        hosts=chips // chips_per_host,
        chips_per_host=chips_per_host,
        hbm_bytes=g.hbm_mib * _MIB,
        peak_bf16_flops=g.peak_bf16_flops,
        hbm_bytes_per_s=g.hbm_bytes_per_s,
        ici_bytes_per_s=g.ici_bytes_per_s,
        dcn_bytes_per_s=g.dcn_bytes_per_s,
        chips_per_host_bounds=per_host,
        chip_config_name="megacore" if gen_name == "v4" else None,
    )


def _allow_compile_only_libtpu() -> None:
    """Let libtpu load for compiling while another process holds it, when this machine has no TPU.

    libtpu takes /tmp/libtpu_lockfile when it initializes, so a second process on the machine (another
    test run, a notebook) fails with "ABORTED: Internal error when accessing libtpu multi-process
    lockfile". The lock guards the chips; with none attached there is nothing to guard. libtpu reads
    ALLOW_MULTIPLE_LIBTPU_LOAD each time it tries to initialize, so setting it here is early enough even
    after `import jax` and jax.devices(). (TPU_SKIP_MDS_QUERY, which stops libtpu asking the GCE metadata
    server for a slice, needs nothing from us: `import jax` sets it when no TPU chip is attached.)
    """
    try:
        from jax._src import hardware_utils

        attached, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except Exception:  # a private module; if it moves, fall back on the signal `import jax` leaves
        attached = 0 if os.environ.get("TPU_SKIP_MDS_QUERY") else 1
    if attached == 0:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def abstract_devices(tpu_slice: TpuSlice | str, num_slices: int = 1) -> list[jax.Device]:
    """Compile-only devices for `num_slices` copies of the slice: one per chip, in libtpu's order.

    Each device has the real `device_kind`, `coords`, `process_index` (its host; numbered across slices)
    and, when num_slices > 1, `slice_index`, so `mesh_utils.create_device_mesh` (one slice) and
    `mesh_utils.create_hybrid_device_mesh` (ICI axes within a slice, DCN axes across slices) work on them.
    Needs libtpu (`pip install jax[tpu]`); the runtime backend is untouched.
    """
    if isinstance(tpu_slice, str):
        tpu_slice = parse_slice(tpu_slice)
    if num_slices < 1:
        raise ConfigError(f"num_slices must be >= 1, got {num_slices}.")
    from jax.experimental import topologies

    _allow_compile_only_libtpu()
    kwargs = tpu_slice.topology_kwargs
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    topo = topologies.get_topology_desc(topology_name=tpu_slice.topology, platform="tpu", **kwargs)
    return list(topo.devices)
