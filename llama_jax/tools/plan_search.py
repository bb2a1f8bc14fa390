"""Which mesh, remat policy and global batch to train with on a TPU slice: the planner's search.

    found = search(exp, "v5p-128", meshes=[(64, 1), (16, 4)], policies=("full", "save_dots"))
    found.ranked[0]                      # the best fitting candidate's Report
    train_flags(found.ranked[0])         # the --config.* flags that apply it

For every (mesh, remat policy) it finds the largest global batch that fits (planner.largest_fitting: a
handful of compiles), compiles the config's own batch unless a smaller one already failed (the cheapest
policy per mesh is the least-recompute one whose compile at that batch fits), and keeps as candidates the
compiles at the largest batch and at the config's.
Each compile gives both the fit and the HLO model's step time (planner.plan with estimate=False: no extra
1-/2-layer compiles), so the fitting candidates are ranked by estimated tokens/s/chip with no compile
beyond the search's (at most one more, the config's batch). Estimates from
the compiled program, not measurements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from llama_jax.errors import ConfigError, ShardingError
from llama_jax.experiment import Experiment
from llama_jax.model import REMAT_POLICIES
from llama_jax.tools.planner import BY_RECOMPUTE, Report, largest_fitting, plan
from llama_jax.tools.tpu import TpuSlice, parse_slice

# Tensor-parallel widths tried when no meshes are given: within a host's chips, where the ICI is fastest.
TENSOR_SIZES = (1, 2, 4, 8)
Mesh = tuple[int, int]  # (fsdp, tensor) within a slice; data is the number of slices


@dataclasses.dataclass
class Search:
    """What `search` found. Meshes are (fsdp, tensor); data is the number of slices."""

    batch_size: int  # the config's
    policies: tuple[str, ...]  # searched, least recompute first
    largest: dict[tuple[Mesh, str], tuple[int, bool]]  # (mesh, policy) -> (largest fitting batch, exact)
    fits_batch: dict[tuple[Mesh, str], bool]  # (mesh, policy) -> whether the config's batch fits (compiled)
    ranked: list[Report]  # fitting candidates with a time estimate, most tokens/s/chip first
    untimed: list[Report]  # fitting candidates the HLO model gave no time
    skipped: dict[Mesh, str]  # meshes the model does not admit, and why

    def cheapest(self, mesh: Mesh) -> str | None:
        """The policy with the least recompute that fits the config's batch on `mesh`, if any."""
        return next((p for p in self.policies if self.fits_batch[mesh, p]), None)

    @property
    def meshes(self) -> list[Mesh]:
        return list(dict.fromkeys(m for m, _ in self.largest))


def parse_meshes(text: str, chips: int) -> list[Mesh]:
    """"64x1,16x4" -> [(64, 1), (16, 4)]: fsdp x tensor per slice, whose product must be its chips."""
    meshes = []
    for item in text.split(","):
        try:
            fsdp, tensor = (int(v) for v in item.split("x"))
        except ValueError:
            raise ConfigError(f"mesh {item!r}: write FSDPxTENSOR, e.g. --meshes=64x1,16x4.") from None
        if fsdp * tensor != chips:
            raise ConfigError(f"mesh {item}: fsdp x tensor is {fsdp * tensor} chips, the slice has {chips}; "
                              f"use FSDPxTENSOR with FSDP*TENSOR={chips}.")
        meshes.append((fsdp, tensor))
    return meshes


def parse_policies(text: str) -> tuple[str, ...]:
    """"full,save_dots" -> the named policies in BY_RECOMPUTE order (least recompute first)."""
    names = text.split(",")
    unknown = [n for n in names if n not in REMAT_POLICIES]
    if unknown:
        raise ConfigError(f"--policies: {unknown} are not remat policies; choose from {', '.join(BY_RECOMPUTE)}.")
    return tuple(p for p in BY_RECOMPUTE if p in names)


def default_meshes(chips: int) -> list[Mesh]:
    """fsdp takes what tensor (1, 2, 4, 8) leaves of a slice's chips; search skips those the model rejects."""
    return [(chips // t, t) for t in TENSOR_SIZES if chips % t == 0]


def train_flags(report: Report) -> list[str]:
    """The experiments.train overrides that train as `report` was planned."""
    m = report.mesh
    flags = [f"--config.mesh.data={m['data']}", f"--config.mesh.fsdp={m['fsdp']}",
             f"--config.mesh.tensor={m['tensor']}"]
    if report.num_slices > 1:
        flags.append(f"--config.mesh.num_slices={report.num_slices}")
    return flags + [f"--config.model.remat_policy={report.remat_policy}", f"--config.batch_size={report.batch_size}"]


def _with(exp: Experiment, mesh: Mesh, num_slices: int, policy: str, batch: int) -> Experiment:
    fsdp, tensor = mesh
    return dataclasses.replace(
        exp, mesh=exp.mesh.replace(data=num_slices, fsdp=fsdp, tensor=tensor, num_slices=num_slices),
        model=exp.model.replace(remat_policy=policy), loop=exp.loop.replace(batch_size=batch))


def _one(exp: Experiment, tpu: TpuSlice, num_slices: int, mesh: Mesh, policy: str, max_compiles: int,
         progress: Callable[[Report], None]):
    """(largest fitting batch, exact, {batch: Report} of every compile) for one mesh and policy."""
    unit = num_slices * mesh[0] * exp.loop.grad_accum_steps  # one sequence per batch shard and micro-batch
    reports: dict[int, Report] = {}

    def compile_at(batch: int) -> Report:
        reports[batch] = plan(_with(exp, mesh, num_slices, policy, batch), tpu, num_slices=num_slices,
                              estimate=False, explain=False)
        progress(reports[batch])
        return reports[batch]

    def measure(k: int) -> tuple[bool, int]:
        r = compile_at(k * unit)
        return r.fits, r.peak_bytes

    largest_fitting(measure, tpu.hbm_bytes, max_compiles)
    want = exp.loop.batch_size
    failing = min((b for b, r in reports.items() if not r.fits), default=None)
    if want % unit == 0 and want not in reports and (failing is None or want < failing):
        compile_at(want)  # the config's batch: whether it fits (the cheapest policy) and, if it does, its time
    largest = max((b for b, r in reports.items() if r.fits), default=0)
    failing = min((b for b, r in reports.items() if not r.fits), default=None)
    return largest, failing is not None and failing - largest <= unit, reports


def search(exp: Experiment, topology: str | TpuSlice, *, num_slices: int = 1, meshes: list[Mesh] | None = None,
           policies: tuple[str, ...] = BY_RECOMPUTE, max_compiles: int = 10,
           progress: Callable[[Report], None] = lambda report: None) -> Search:
    """Rank the (mesh, remat policy, batch) candidates that fit `topology` by estimated tokens/s/chip.

    meshes: (fsdp, tensor) within a slice, default `default_meshes`; policies in BY_RECOMPUTE order. At most
    `max_compiles` per (mesh, policy), plus one at the config's batch. progress: called with each compile's
    Report as it is made (an 8B search takes an hour or more on a CPU).
    """
    tpu = parse_slice(topology) if isinstance(topology, str) else topology
    found = Search(exp.loop.batch_size, tuple(policies), {}, {}, [], [], {})
    fitting: list[Report] = []
    for mesh in meshes or default_meshes(tpu.chips):
        for policy in policies:
            try:
                batch, exact, reports = _one(exp, tpu, num_slices, mesh, policy, max_compiles, progress)
            except ShardingError as err:  # raised before any compile: the model does not split this way
                found.skipped[mesh] = str(err).splitlines()[0]
                break
            found.largest[mesh, policy] = (batch, exact)
            found.fits_batch[mesh, policy] = exp.loop.batch_size in reports and reports[exp.loop.batch_size].fits
            fitting += [r for b, r in reports.items() if r.fits and b in (batch, exp.loop.batch_size)]
    found.ranked = sorted((r for r in fitting if r.estimate_s), key=lambda r: -r.tokens_per_s_per_chip)
    found.untimed = [r for r in fitting if not r.estimate_s]
    return found
