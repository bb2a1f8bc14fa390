"""Will it fit? Compile an experiment's step for a TPU slice with the TPU compiler, on this (CPU) machine.

    report = plan(experiment, "v5p-128")                 # the train step experiments.train would run
    print("\\n".join(report.lines())); report.fits

`plan` builds exactly the mesh, shardings and jitted step of `experiments.train` (TrainProgram, or its
eval step, or the sampler's decode loop) over compile-only devices of the slice (tools/tpu.py), compiles
it with libtpu, and reports per chip:
- an analytic ledger from the shardings: params, optimizer state and f32 gradients;
- the compiler's memory_analysis (arguments, outputs, temporaries, aliases), the peak
  (arguments + outputs + temporaries - aliases, what must fit) against the chip's HBM, and on failure the
  compiler's own required vs available bytes and largest allocations, with what to change;
- compiled matmul FLOPs (tools/hlo.py, loops counted by their trip counts) against the model's (with LoRA
  also against a full fine-tune's 6N) and the time they take at the chip's peak;
- the collectives in the compiled program (kind, count, bytes);
- a step time, the MFU and tokens/s/chip it implies: the compiler's own estimate where it is sound (see
  `_estimate`), otherwise the roofline model of the compiled HLO (tools/hlo_cost.py `cost`: every op's FLOPs and
  bytes against the chip's peak and HBM bandwidth, every collective's ring traffic over ICI or DCN), with
  its parts; both, and their ratio, where both exist. Estimates, not measurements.

`largest_fitting` finds the largest global batch that fits; tools/plan_search.py ranks (mesh, remat, batch)
candidates with it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import pathlib
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import sharding
from llama_jax.errors import ConfigError
from llama_jax.experiment import Experiment
from llama_jax.inference.load import param_shardings
from llama_jax.inference.sampling import _jitted_generate
from llama_jax.model import REMAT_SAVES, for_platform, param_shapes
from llama_jax.model.attention import SPLASH_BLOCK_MULTIPLE
from llama_jax.tools import hlo, hlo_cost
from llama_jax.tools.tpu import TpuSlice, abstract_devices, parse_slice
from llama_jax.train import TrainProgram

STEPS = ("train", "eval", "decode")
# Remat policies from the least recompute (most memory) to the most.
BY_RECOMPUTE = ("none", *reversed(REMAT_SAVES))
GIB = 1 << 30
# The batch dict experiments.train feeds (data/packing.py `gather`): every key, whatever the packing.
BATCH_KEYS = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
              "positions": jnp.int32}


@dataclasses.dataclass
class Report:
    """One compile's findings, per chip. `memory` is None when the program did not fit."""

    slice: TpuSlice
    num_slices: int
    step: str
    mesh: dict[str, int]
    batch_size: int
    seq_len: int
    remat_policy: str
    loss_chunk: int
    ledger: dict[str, int]  # params, opt_state, grads: bytes per chip (the most loaded chip)
    compile_s: float
    memory: dict[str, int] | None = None  # argument, output, alias, temp, peak
    oom: str | None = None  # the compiler's RESOURCE_EXHAUSTED message
    largest_allocations: list[str] = dataclasses.field(default_factory=list)
    required_bytes: int | None = None
    matmul_flops: float = 0.0  # compiled, per chip, per step
    model_flops: float = 0.0  # the model's matmul FLOPs per chip, per step (6N, LoRA's 4N + 6 adapters, or 2N per token)
    full_flops: float = 0.0  # LoRA train step: a full fine-tune's 6N matmul FLOPs per chip, per step; else 0
    attention_in_kernel: bool = False
    collectives: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    estimate_s: float | None = None  # the printed step time: the compiler's if sound, else the HLO model's
    estimate_note: str = ""  # which one, and why
    compiler_s: float | None = None  # the compiler's estimate (unrolled 1-/2-layer extrapolation), if sound
    compiler_note: str = ""
    cost: hlo_cost.Cost | None = None  # the HLO roofline model of the compiled step
    tokens: int = 0  # per step, all chips
    model_flops_with_attention: float = 0.0
    mesh_note: str = ""  # how the config's mesh was fitted to the slice (fit_mesh), if it was

    @property
    def fits(self) -> bool:
        return self.memory is not None

    @property
    def peak_bytes(self) -> int:
        return self.memory["peak"] if self.memory else (self.required_bytes or 0)

    @property
    def mfu(self) -> float | None:
        return _mfu(self, self.estimate_s)

    @property
    def tokens_per_s_per_chip(self) -> float | None:
        if not self.estimate_s:
            return None
        return self.tokens / (self.estimate_s * self.slice.chips * self.num_slices)

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": self.slice.name, "num_slices": self.num_slices, "step": self.step, "mesh": self.mesh,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "remat_policy": self.remat_policy,
            "fits": self.fits, "peak_gib": round(self.peak_bytes / GIB, 3),
            "hbm_gib": round(self.slice.hbm_bytes / GIB, 3),
            "memory_gib": {k: round(v / GIB, 3) for k, v in (self.memory or {}).items()},
            "ledger_gib": {k: round(v / GIB, 3) for k, v in self.ledger.items()},
            "matmul_flops": self.matmul_flops, "model_flops": self.model_flops,
            "full_finetune_model_flops": self.full_flops or None,
            "recompute_ratio": round(self.matmul_flops / self.model_flops, 3) if self.model_flops and self.fits
            else None,
            "collectives": {k: {"count": c, "bytes": b} for k, (c, b) in self.collectives.items()},
            "estimate_s": self.estimate_s, "estimate_note": self.estimate_note,
            "mfu": None if self.mfu is None else round(self.mfu, 4),
            "tokens_per_s_per_chip": None if self.estimate_s is None else round(self.tokens_per_s_per_chip, 1),
            "compiler_estimate_s": self.compiler_s,
            "hlo_model_s": None if self.cost is None else dataclasses.asdict(self.cost) | {
                "overlapped_s": self.cost.overlapped_s, "exposed_s": self.cost.exposed_s},
            "compile_s": round(self.compile_s, 1), "mesh_note": self.mesh_note or None,
            "compiler": compiler_versions(),
        }

    def lines(self) -> list[str]:
        s, gib = self.slice, _size
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        out = [
            f"{s.name} x {self.num_slices} slice(s): {s.chips * self.num_slices} {s.device_kind} chips on "
            f"{s.hosts * self.num_slices} hosts, {gib(s.hbm_bytes)} HBM per chip",
            f"{self.step} step: global batch {self.batch_size} x {self.seq_len} tokens, mesh {mesh}, "
            f"remat {self.remat_policy}; compiled in {self.compile_s:.0f} s by {compiler_versions()}",
            *([self.mesh_note] if self.mesh_note else []),
            "per chip, from the shardings: " + ", ".join(f"{k} {gib(v)}" for k, v in self.ledger.items()),
        ]
        if self.fits:
            m = self.memory
            out += [
                f"per chip, from the compiler: arguments {gib(m['argument'])}, outputs {gib(m['output'])}, "
                f"aliased {gib(m['alias'])}, temporaries {gib(m['temp'])}; their sum {gib(m['total'])}, "
                f"the compiler's peak {gib(m['peak'])}" + ("" if m["peak"] != m["total"] else
                                                             " (this jax reports no peak: the sum, an upper bound)"),
                f"fits: peak {gib(m['peak'])} of {gib(s.hbm_bytes)} ({m['peak'] / s.hbm_bytes:.0%}), "
                f"headroom {gib(s.hbm_bytes - m['peak'])}",
            ]
        else:
            out += [f"does not fit: needs {gib(self.required_bytes or 0)}, the chip has {gib(s.hbm_bytes)}",
                    "largest allocations (size; the values that share it):",
                    *("  " + line for line in self.largest_allocations),
                    "to fit: " + "; ".join(_advice(self))]
            return out
        kernel = " (attention runs in the splash kernel, whose FLOPs the compiler does not count)"
        out.append(
            f"matmul FLOPs per chip: compiled {self.matmul_flops:.3e}, model {self.model_flops:.3e}: "
            f"{self.matmul_flops / self.model_flops:.2f}x{kernel if self.attention_in_kernel else ''}; "
            f"at the chip's bf16 peak ({s.peak_bf16_flops:.3e} FLOP/s) the compiled matmuls take "
            f"{self.matmul_flops / s.peak_bf16_flops:.3f} s per step"
        )
        if self.full_flops:
            out.append(
                f"LoRA: the model's 4N + 6 x adapter params is {self.model_flops / self.full_flops:.2f}x a full "
                f"fine-tune's 6N ({self.full_flops:.3e}); compiled {self.matmul_flops / self.full_flops:.2f}x 6N"
            )
        for kind, (count, nbytes) in sorted(self.collectives.items()):
            out.append(f"  {kind}: {count} per step, {gib(nbytes)}")
        return out + _time_lines(self)


def compiler_versions() -> str:
    """'libtpu 0.0.42.1, jax 0.10.2': what compiled a plan, printed beside its figures (they change with it)."""
    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = "(not installed)"
    return f"libtpu {libtpu}, jax {jax.__version__}"


def _mfu(report: Report, seconds: float | None) -> float | None:
    if not seconds:
        return None
    return report.model_flops_with_attention / (seconds * report.slice.peak_bf16_flops)


def _secs(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 0.1 else f"{seconds * 1e3:.3f} ms"


def _time_lines(r: Report) -> list[str]:
    """The step time (an estimate), what it implies, and its parts."""
    if r.estimate_s is None:
        out = [f"time: no estimate ({r.estimate_note})"]
    else:
        out = [f"time (an estimate, not a measurement): {_secs(r.estimate_s)} per step, {r.mfu:.1%} MFU, "
               f"{r.tokens_per_s_per_chip:,.0f} tokens/s/chip; {r.estimate_note}"]
    if r.cost is not None:
        c = r.cost
        kernel = f", attention kernel at peak {_secs(c.kernel_s)}" if c.kernel_s else ""
        out.append(f"  HLO model: ops {_secs(c.ops_s)} (compute-bound {_secs(c.compute_s)}, memory-bound "
                   f"{_secs(c.memory_s)}{kernel}), collectives {_secs(c.collectives_s)} (ICI {_secs(c.ici_s)}, DCN {_secs(c.dcn_s)}): "
                   f"{_secs(c.overlapped_s)} if every collective overlaps, {_secs(c.exposed_s)} if none does")
    if r.compiler_s is not None:
        ratio = f"; HLO model (none overlapped) / compiler = {r.cost.exposed_s / r.compiler_s:.2f}" if r.cost else ""
        out.append(f"  the compiler: {_secs(r.compiler_s)} ({r.compiler_note}){ratio}")
    elif r.compiler_note:
        out.append(f"  the compiler: no estimate ({r.compiler_note})")
    return out


def _choose_estimate(r: Report) -> tuple[float | None, str]:
    """The step time to print: the compiler's where it is sound, else the HLO model with no overlap (an
    upper bound: XLA overlaps what it can). Never one that implies an impossible MFU."""
    candidates = []
    if r.compiler_s is not None:
        candidates.append((r.compiler_s, f"the compiler's own estimate ({r.compiler_note})"))
    if r.cost is not None:
        why = r.compiler_note or "no compiler estimate asked for"
        candidates.append((r.cost.exposed_s, f"the HLO model, collectives not overlapped (the compiler's: {why})"))
    rejected = []
    for seconds, note in candidates:
        mfu = _mfu(r, seconds)
        if seconds > 0 and (mfu is None or mfu <= 1):
            return seconds, note
        rejected.append(f"{seconds:.3g} s" + ("" if mfu is None else f" would be {mfu:.0%} MFU"))
    return None, "; ".join(rejected) or "nothing to estimate from"


def _chip(tpu: TpuSlice, mesh) -> hlo_cost.Chip:
    """The chip for the HLO time model; logical device k of the program is mesh.devices.flat[k]."""
    return hlo_cost.Chip(tpu.peak_bf16_flops, tpu.hbm_bytes_per_s, tpu.ici_bytes_per_s, tpu.dcn_bytes_per_s,
                    tuple(getattr(d, "slice_index", 0) for d in mesh.devices.flat))


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / (1 << 20):.1f} MiB"


def _largest_allocations(lowered, n: int = 8) -> list[str]:
    """The biggest buffers of a program that does not fit, from the compiler's memory-usage report.

    The RESOURCE_EXHAUSTED message gives only the total, so compile again (it fails in seconds) with
    XLA's dump on and read the report it writes before giving up: "size; values; shapes" per allocation,
    largest first.
    """
    with tempfile.TemporaryDirectory() as d:
        try:
            lowered.compile(compiler_options={"xla_dump_to": d})
        except Exception:
            pass
        reports = list(pathlib.Path(d).glob("*memory-usage-report.txt"))
        if not reports:
            return ["(the compiler wrote no memory-usage report)"]
        rows = []
        for line in reports[0].read_text().splitlines():
            parts = [p.strip() for p in line.split(";")]
            if len(parts) == 5 and parts[1][:1].isdigit():
                rows.append(f"{parts[1]:>10}  {parts[4][:150]}")
        return rows[:n]


def _advice(report: Report) -> list[str]:
    tips = []
    if report.batch_size > 1:
        tips.append("a smaller global batch (--config.batch_size, or grad_accum_steps; `--search` finds the "
                    "largest that fits)")
    if report.remat_policy != "full":
        less = BY_RECOMPUTE[BY_RECOMPUTE.index(report.remat_policy) + 1 :]
        tips.append(f"a remat policy that saves less: {', '.join(less)} (--config.model.remat_policy)")
    if not report.loss_chunk:
        tips.append("chunk the LM head + loss (--config.model.loss_chunk=512): no f32 [batch, seq, vocab] logits")
    tips.append("shard more: a larger mesh.fsdp or mesh.tensor, or more chips")
    return tips


def _oom_numbers(message: str) -> int | None:
    """Bytes required, from "... required for HLO temporaries (159.10G) exceeds available HBM (95.74G)"."""
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds available", message)
    if not m:
        m = re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", message)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _ledger(prog: TrainProgram, step: str) -> dict[str, int]:
    def per_chip(tree) -> int:
        total = 0
        for leaf in jax.tree.leaves(tree):
            total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        return total

    state = prog.abstract_state
    # With LoRA, `params` are the adapters (all that trains) and `base` the frozen model.
    ledger = {"params": per_chip(state.params)} if state.base is None else {
        "frozen base": per_chip(state.base), "adapters": per_chip(state.params)}
    if step != "train":
        return ledger
    grads = sum(math.prod(a.sharding.shard_shape(a.shape)) * 4 for a in jax.tree.leaves(state.params))
    return {**ledger, "opt_state": per_chip(state.opt_state), "grads (f32)": grads}


def _batch(mesh, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    s = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=s) for k, dt in BATCH_KEYS.items()}


def _lower(exp: Experiment, devices, step: str, decode_lengths: tuple[int, int]):
    """(program, lowered step, global batch size) for `step`, as experiments.train / eval / sample build them."""
    mesh = sharding.make_mesh(exp.mesh, devices)
    prog = TrainProgram.from_experiment(exp, mesh)
    if step == "train":
        return prog, prog.train_step.lower(prog.abstract_state, _batch(mesh, exp.loop.batch_size, exp.loop.seq_len)), \
            exp.loop.batch_size
    if step == "eval":
        b = exp.eval_batch_size
        params = prog.eval_params(prog.abstract_state)
        return prog, prog.eval_step.lower(params, _batch(mesh, b, exp.loop.seq_len)), b
    prompt_len, new = decode_lengths
    b = exp.eval_batch_size
    model = for_platform(exp.model.replace(max_seq_len=max(exp.model.max_seq_len, prompt_len + new)), "tpu")
    rules = sharding.resolve_rules(exp.sharding)
    shardings = param_shardings(model, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), param_shapes(model),
                          shardings)
    rep = NamedSharding(mesh, P())
    arg = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
    key = jax.eval_shape(lambda: jax.random.key(0))
    lowered = _jitted_generate("tpu").lower(
        params, arg((b, prompt_len), jnp.int32), arg((b,), jnp.int32), arg(key.shape, key.dtype),
        arg((), jnp.float32), arg((), jnp.float32), arg((1,), jnp.int32),  # temperature, top_p, stop ids
        config=model, max_new_tokens=new, top_k=0,
    )
    return prog, lowered, b


def _model_flops(exp: Experiment, step: str, batch: int, chips: int, decode_lengths) -> tuple[float, float]:
    """(matmul-only, with attention) model FLOPs per chip for one step."""
    m = exp.model
    if step == "decode":
        tokens = batch * sum(decode_lengths)
        return 2 * m.matmul_param_count() * tokens / chips, m.flops_per_token(sum(decode_lengths), training=False) \
            * tokens / chips
    tokens = batch * exp.loop.seq_len
    if step == "train":  # with LoRA, what it computes: no weight gradients for the frozen base
        return exp.train_flops_per_token(0) * tokens / chips, exp.train_flops_per_token() * tokens / chips
    return 2 * m.matmul_param_count() * tokens / chips, m.flops_per_token(exp.loop.seq_len, training=False) \
        * tokens / chips


def _estimate(exp: Experiment, devices, step: str) -> tuple[float | None, str]:
    """The compiler's time estimate for the whole step, or None and why.

    cost_analysis counts a while-loop body once, so the scanned program's estimate covers one layer.
    Instead: compile the step unrolled at 1 and 2 layers (and with an unchunked loss, which has no loop),
    and extrapolate linearly to num_layers. Loops left in those programs (XLA's windowed collective
    matmuls under tensor parallelism, gradient accumulation) would be counted once too, so then there is
    no estimate rather than a wrong one.
    """
    if step != "train":
        return None, "estimates are made for the train step only"
    times = []
    for layers in (1, 2):
        e = dataclasses.replace(exp, model=exp.model.replace(num_layers=layers, scan_layers=False, loss_chunk=0))
        try:
            _, lowered, _ = _lower(e, devices, step, (0, 0))
            compiled = lowered.compile()
        except Exception as err:
            return None, f"the unrolled {layers}-layer compile for the estimate failed: {str(err).splitlines()[0]}"
        loops = hlo.analyze(compiled.as_text()).loops
        if loops:
            return None, (f"the {layers}-layer program still has {len(loops)} loop(s) (e.g. {loops[0].body}) "
                          "that the compiler's cost model counts once")
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if "optimal_seconds" not in cost:
            return None, "this compiler gives no time estimate"
        times.append(float(cost["optimal_seconds"]))
    per_layer = times[1] - times[0]
    total = times[0] + (exp.model.num_layers - 1) * per_layer
    if min(times) <= 0 or per_layer <= 0 or total <= 0:
        # Seen across slices (libtpu 0.0.42.1): negative estimates for both, the 2-layer one the lower.
        return None, "its unrolled 1- and 2-layer estimates are not positive and growing with depth"
    return total, f"from unrolled 1- and 2-layer compiles: {per_layer * 1e3:.1f} ms per layer"


def fit_mesh(mesh: sharding.MeshConfig, num_devices: int) -> tuple[sharding.MeshConfig, str]:
    """The config's mesh for a slice of `num_devices` chips, and a note when it had to change.

    A mesh with every axis fixed (no -1) whose product is not the chip count was written for other hardware
    (configs/shakespeare.py's mesh.data=1 is one CPU). Asking what the config needs on this slice, the data
    axis takes the remaining chips (fsdp and tensor as the config sets them, so the per-chip shardings are
    the config's), and the note names the flag that trains it that way. Any other mesh is left as it is, so
    a mesh that cannot fit the slice still fails with make_mesh's error.
    """
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    if -1 in sizes or math.prod(sizes) == num_devices or num_devices % (mesh.fsdp * mesh.tensor):
        return mesh, ""
    fitted = mesh.replace(data=-1)
    return fitted, (
        f"mesh: the config's data {mesh.data} x fsdp {mesh.fsdp} x tensor {mesh.tensor} is {math.prod(sizes)} "
        f"device(s), not this slice's {num_devices}; planned with --config.mesh.data=-1 (data "
        f"{num_devices // (mesh.fsdp * mesh.tensor)}), the flag that trains it on this slice."
    )


def plan(exp: Experiment, topology: str | TpuSlice, *, num_slices: int = 1, step: str = "train",
         estimate: bool = True, decode_lengths: tuple[int, int] = (1024, 1024), explain: bool = True) -> Report:
    """Compile `step` of `exp` for `num_slices` slices of `topology` and report (module docstring).

    explain: on an out-of-memory failure, compile again to list the largest allocations (a search, which
    needs only the verdict and the bytes, skips that second compile)."""
    if step not in STEPS:
        raise ConfigError(f"step={step!r} is not one of {STEPS}.")
    tpu = parse_slice(topology) if isinstance(topology, str) else topology
    devices = abstract_devices(tpu, num_slices)
    mesh, mesh_note = fit_mesh(exp.mesh.replace(num_slices=num_slices), len(devices))
    exp = dataclasses.replace(exp, mesh=mesh)
    t0 = time.perf_counter()
    prog, lowered, batch = _lower(exp, devices, step, decode_lengths)
    report = Report(
        slice=tpu, num_slices=num_slices, step=step, mesh=dict(prog.mesh.shape), batch_size=batch,
        seq_len=sum(decode_lengths) if step == "decode" else exp.loop.seq_len,
        remat_policy=exp.model.remat_policy, loss_chunk=exp.model.loss_chunk, ledger=_ledger(prog, step), compile_s=0.0,
        mesh_note=mesh_note,
    )
    try:
        compiled = lowered.compile()
    except Exception as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        report.compile_s = time.perf_counter() - t0
        report.oom, report.required_bytes = str(err), _oom_numbers(str(err))
        if explain:
            report.largest_allocations = _largest_allocations(lowered)
        return report
    report.compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    report.memory = {
        "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes, "total": total,
        # The compiler's own peak (what it checks against HBM) where this jax reports it (0.12 does, 0.10
        # does not); otherwise the sum, which is an upper bound: not every buffer is live at once.
        "peak": getattr(m, "peak_memory_in_bytes", None) or total,
    }
    text = compiled.as_text()
    summary = hlo.analyze(text)
    report.matmul_flops = summary.matmul_flops
    report.model_flops, report.model_flops_with_attention = _model_flops(
        exp, step, batch, len(devices), decode_lengths)
    if step == "train" and exp.lora.enabled:
        report.full_flops = 6 * exp.model.matmul_param_count() * batch * exp.loop.seq_len / len(devices)
    report.attention_in_kernel = (for_platform(exp.model, "tpu").attention_impl == "splash" and step != "decode"
                                  and exp.loop.seq_len % SPLASH_BLOCK_MULTIPLE == 0)
    report.collectives = {k: (c.count, c.bytes) for k, c in summary.collectives.items() if c.count}
    report.tokens = batch * report.seq_len
    report.cost = hlo_cost.cost(text, _chip(tpu, prog.mesh))
    if report.attention_in_kernel:  # the splash kernel's FLOPs (the model's attention FLOPs) at peak
        kernel_flops = report.model_flops_with_attention - report.model_flops
        report.cost = dataclasses.replace(report.cost, kernel_s=kernel_flops / tpu.peak_bf16_flops)
    if estimate:
        report.compiler_s, report.compiler_note = _estimate(exp, devices, step)
    report.estimate_s, report.estimate_note = _choose_estimate(report)
    return report


def largest_fitting(measure: Callable[[int], tuple[bool, int]], hbm_bytes: int, max_compiles: int):
    """(largest k that fits, {k: (fits, peak bytes)}, exact) for a compile `measure(k)` at k batch units.

    Peak memory is close to linear in the batch (a failing compile still reports what it needs): compiles
    at 1 and 2 units start a secant search for the batch whose peak meets the HBM, kept inside the bracket
    of known fitting / failing batches (bisection or doubling when it strays). `exact`: the bracket closed
    (k fits, k + 1 does not) within `max_compiles`. benchmarks/tpu_plan.py runs MaxText's compiles through
    the same search.
    """
    seen: dict[int, tuple[bool, int]] = {}

    def bracket():
        lo = max((k for k, (ok, _) in seen.items() if ok), default=0)
        hi = min((k for k, (ok, _) in seen.items() if not ok), default=None)
        return lo, hi

    seen[1] = measure(1)
    if not seen[1][0]:  # not even one unit fits: nothing smaller to try
        return 0, seen, True
    order = [1, 2]  # compiles in the order made: the secant runs through the last two
    seen[2] = measure(2)
    while len(seen) < max_compiles:
        lo, hi = bracket()
        if hi is not None and hi - lo <= 1:
            break
        (ka, pa), (kb, pb) = ((k, seen[k][1]) for k in order[-2:])
        guess = kb + int((hbm_bytes - pb) * (kb - ka) / (pb - pa)) if pa and pb and pb != pa else 0
        if hi is None:
            # Two nearly equal peaks aim the secant at absurd batches, whose compile can exhaust the host's
            # memory (libtpu aborted the 8B search at fsdp 16 x tensor 4, save_qkv_proj): grow at most 64x.
            guess = min(guess, 64 * lo)
        if guess in seen or guess <= lo or (hi is not None and guess >= hi):
            guess = 2 * lo if hi is None else (lo + hi) // 2
        order.append(guess)
        seen[guess] = measure(guess)
    lo, hi = bracket()
    return lo, seen, hi is not None and hi - lo <= 1
