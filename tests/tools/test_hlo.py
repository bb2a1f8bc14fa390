"""HLO analysis on real TPU programs, compiled for an abstract v5p-8 (4 chips) on the CPU: matmul FLOPs
with loop trip counts (which cost_analysis misses), collectives, custom calls; and the shape parser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.tools import hlo, hlo_cost, tpu

MM = 2 * 256 * 512 * 1024  # FLOPs of x[256,512] @ w[512,1024]
BF16 = 2


@pytest.fixture(scope="module")
def mesh():
    pytest.importorskip("libtpu", reason="compiling for an abstract TPU topology needs libtpu (pip install 'jax[tpu]')")
    return Mesh(np.array(tpu.abstract_devices("v5p-8")), ("x",))  # 4 chips


def _compile(mesh, f, arg_specs, out_spec, shapes, dtype=jnp.bfloat16):
    args = [jax.ShapeDtypeStruct(s, dtype, sharding=NamedSharding(mesh, spec)) for s, spec in zip(shapes, arg_specs)]
    return jax.jit(f, out_shardings=NamedSharding(mesh, out_spec)).lower(*args).compile()


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    return (ca[0] if isinstance(ca, list) else ca)["flops"]


def test_shape_bytes():
    assert hlo.shape_bytes("bf16[256,512]{1,0:T(8,128)(2,1)}") == 256 * 512 * 2
    assert hlo.shape_bytes("f32[8,128]{1,0:T(8,128)S(1)}") == 8 * 128 * 4
    assert hlo.shape_bytes("(s32[]{:T(128)}, bf16[4,8]{1,0}, /*index=2*/pred[3], u32[]{:S(2)})") == 4 + 64 + 3 + 4
    assert hlo.shape_bytes("f8e4m3fn[16,16]") == 256 and hlo.shape_bytes("s4[10]") == 5
    assert hlo.shape_bytes("((f32[2], s8[5]), token[])") == 13
    assert hlo.shape_bytes("f32[<=16,4]") == 256
    assert hlo.array_shapes("u8[7]{0:T(1024)(128)(4,1)}") == [("u8", (7,))]


def test_matmul_flops_per_chip(mesh):
    f = lambda x, w: x @ w
    replicated = _compile(mesh, f, [P(), P()], P(), [(256, 512), (512, 1024)])
    batch_sharded = _compile(mesh, f, [P("x"), P()], P("x"), [(256, 512), (512, 1024)])
    assert hlo.analyze(replicated.as_text()).matmul_flops == MM
    assert hlo.analyze(batch_sharded.as_text()).matmul_flops == MM // 4
    assert _flops(batch_sharded) == MM // 4  # no loop: cost_analysis agrees


def test_loops_multiply_what_cost_analysis_counts_once(mesh):
    step = lambda c, w: jnp.tanh(c @ w)
    fori = _compile(mesh, lambda x, w: jax.lax.fori_loop(0, 5, lambda i, c: step(c, w), x),
                    [P(), P()], P(), [(256, 512), (512, 512)])
    scan = _compile(mesh, lambda x, ws: jax.lax.scan(lambda c, w: (step(c, w), None), x, ws)[0],
                    [P(), P()], P(), [(256, 512), (5, 512, 512)])
    one = 2 * 256 * 512 * 512
    for compiled in (fori, scan):
        summary = hlo.analyze(compiled.as_text())
        assert [loop.trip_count for loop in summary.loops] == [5]
        assert summary.multipliers[summary.loops[0].body] == 5
        assert summary.matmul_flops == 5 * one
        assert one <= _flops(compiled) < 1.1 * one  # the reason this module exists: the body counted once


def test_nested_loops_multiply(mesh):
    def f(x, w):
        inner = lambda c: jax.lax.fori_loop(0, 3, lambda j, d: jnp.tanh(d @ w), c)
        return jax.lax.fori_loop(0, 4, lambda i, c: inner(c) * 0.5, x)

    summary = hlo.analyze(_compile(mesh, f, [P(), P()], P(), [(256, 512), (512, 512)]).as_text())
    assert sorted(loop.trip_count for loop in summary.loops) == [3, 4]
    inner = next(loop for loop in summary.loops if loop.trip_count == 3)
    assert summary.multipliers[inner.body] == 12 and summary.multipliers[inner.condition] == 4 * 4
    assert summary.matmul_flops == 12 * 2 * 256 * 512 * 512
    assert not summary.unknown_loops


def test_batched_and_padded_convolutions_match_cost_analysis(mesh):
    # XLA:TPU writes a batched matmul as a convolution over the batch (lhs-dilated window) and keeps
    # padding in the window: only the taps on real input elements are MACs.
    bmm = _compile(mesh, lambda a, b: jnp.einsum("bij,bjk->bik", a, b), [P(), P()], P(),
                   [(8, 128, 256), (8, 256, 512)])
    assert hlo.analyze(bmm.as_text()).matmul_flops == 2 * 8 * 128 * 256 * 512 == _flops(bmm)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (2, 2), ((1, 2), (0, 1)), rhs_dilation=(2, 1), feature_group_count=2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    compiled = _compile(mesh, conv, [P(), P()], P(), [(8, 33, 31, 64), (3, 3, 32, 128)])
    assert hlo.analyze(compiled.as_text()).matmul_flops == _flops(compiled)


def test_contracting_over_a_sharded_dim_all_reduces_the_output(mesh):
    f = lambda x, w: x @ w
    summary = hlo.analyze(_compile(mesh, f, [P(None, "x"), P("x", None)], P(), [(256, 512), (512, 1024)]).as_text())
    assert summary.collectives["all-reduce"] == hlo.Collective(count=1, bytes=256 * 1024 * BF16)
    assert summary.matmul_flops == MM // 4
    looped = lambda x, w: jax.lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ w), x)
    summary = hlo.analyze(_compile(mesh, looped, [P(None, "x"), P("x", None)], P(None, "x"),
                                   [(256, 512), (512, 512)]).as_text())
    assert summary.collectives["all-reduce"] == hlo.Collective(count=3, bytes=3 * 256 * 512 * BF16)


def test_gather_and_reduce_scatter_from_shardings(mesh):
    f = lambda x, w: x @ w
    gathered = hlo.analyze(_compile(mesh, f, [P("x"), P()], P(), [(256, 512), (512, 1024)]).as_text())
    assert gathered.collectives["all-gather"] == hlo.Collective(1, 256 * 1024 * BF16)
    # TPU writes a reduce-scatter as a fusion slicing an all-reduce: one reduce-scatter, no all-reduce.
    scattered = hlo.analyze(_compile(mesh, f, [P(None, "x"), P("x", None)], P("x"),
                                     [(256, 512), (512, 1024)]).as_text())
    assert scattered.collectives["reduce-scatter"] == hlo.Collective(1, 64 * 1024 * BF16)
    assert scattered.collectives["all-reduce"].count == 0


def test_every_collective_kind_in_shard_map(mesh):
    def body(x, w):
        y = x @ w  # [64, 512] per chip
        outs = [
            jax.lax.psum(y, "x"),
            jax.lax.all_gather(x, "x", tiled=True),
            jax.lax.ppermute(x, "x", [(i, (i + 1) % 4) for i in range(4)]),  # async start/done: once
            jax.lax.all_to_all(x, "x", 0, 0, tiled=True),
            jax.lax.psum_scatter(y * 2, "x", scatter_dimension=0, tiled=True),
        ]
        return sum(o.sum() for o in outs)[None]

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
    summary = hlo.analyze(_compile(mesh, f, [P("x"), P()], P("x"), [(256, 512), (512, 512)]).as_text())
    got = {k: (c.count, c.bytes) for k, c in summary.collectives.items()}
    assert got == {
        "all-reduce": (1, 64 * 512 * BF16),
        "all-gather": (1, 256 * 512 * BF16),
        "collective-permute": (1, 64 * 512 * BF16),
        "all-to-all": (1, 64 * 512 * BF16),
        "reduce-scatter": (1, 16 * 512 * BF16),
    }
    assert summary.collective_bytes == sum(b for _, b in got.values())


def test_pallas_kernel_is_a_custom_call(mesh):
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    f = lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
    single = Mesh(mesh.devices[:1], ("x",))
    summary = hlo.analyze(_compile(single, f, [P()], P(), [(8, 128)], jnp.float32).as_text())
    assert summary.custom_calls == {"tpu_custom_call": 1} and summary.matmul_flops == 0


# Hand-written loops: a count-down loop (GT, step -2 inside a fusion), the bound on the left of the
# compare, and a loop whose bound is a runtime value.
_TEXT = """HloModule m

%fused_dec (p0: s32[]) -> s32[] {
  %p0 = s32[] parameter(0)
  %two = s32[] constant(2)
  ROOT %sub = s32[] subtract(%p0, %two)
}

%body_a (t: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,8]{1,0} get-tuple-element(%t), index=1
  %next = s32[] fusion(%i), kind=kLoop, calls=%fused_dec
  %d = f32[8,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ag = f32[32,8]{1,0} all-gather(%d), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %r = (s32[], f32[8,8]{1,0}) tuple(%next, %d)
}

%cond_a (t: (s32[], f32[8,8])) -> pred[] {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %zero = s32[] constant(0)
  ROOT %c = pred[] compare(%zero, %i), direction=LT
}

%body_b (t: (s32[], s32[])) -> (s32[], s32[]) {
  %t = (s32[], s32[]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] get-tuple-element(%t), index=1
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %r = (s32[], s32[]) tuple(%i2, %n)
}

%cond_b (t: (s32[], s32[])) -> pred[] {
  %t = (s32[], s32[]) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] get-tuple-element(%t), index=1
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,8], n: s32[]) -> f32[8,8] {
  %x = f32[8,8]{1,0} parameter(0)
  %n = s32[] parameter(1)
  %start = s32[] constant(9)
  %init = (s32[], f32[8,8]{1,0}) tuple(%start, %x)
  %wa = (s32[], f32[8,8]{1,0}) while(%init), condition=%cond_a, body=%body_a
  %z = s32[] constant(0)
  %init_b = (s32[], s32[]) tuple(%z, %n)
  %wb = (s32[], s32[]) while(%init_b), condition=%cond_b, body=%body_b
  ROOT %out = f32[8,8]{1,0} get-tuple-element(%wa), index=1
}
"""


def test_trip_counts_from_hand_written_hlo():
    summary = hlo.analyze(_TEXT)
    trips = {loop.name: loop.trip_count for loop in summary.loops}
    assert trips == {"wa": 5, "wb": None}  # i = 9, 7, 5, 3, 1; a runtime bound cannot be read
    assert [loop.name for loop in summary.unknown_loops] == ["wb"]
    assert summary.multipliers["body_a"] == 5 and summary.multipliers["body_b"] == 1
    assert summary.matmul_flops == 5 * 2 * 8 * 8 * 8
    assert summary.collectives["all-gather"] == hlo.Collective(5, 5 * 32 * 8 * 4)


# ------------------------------------------------------------------------------- the time model (cost)

V5P = tpu.parse_slice("v5p-8")


def _chip(slice_of=(0, 0, 0, 0)):
    return hlo_cost.Chip(V5P.peak_bf16_flops, V5P.hbm_bytes_per_s, V5P.ici_bytes_per_s, V5P.dcn_bytes_per_s, slice_of)


def test_the_time_model_counts_a_matmuls_flops_at_peak(mesh):
    n = 2048  # 17 GFLOP against 24 MiB: compute-bound on any TPU
    cost = hlo_cost.cost(_compile(mesh, lambda x, w: x @ w, [P(), P()], P(), [(n, n), (n, n)]).as_text(), _chip())
    assert cost.flops == 2 * n**3
    assert cost.compute_s == pytest.approx(2 * n**3 / V5P.peak_bf16_flops, rel=1e-6)
    # Memory-bound ops (copies of the operands and the result to and from on-chip memory) move at most the
    # three 8 MiB arrays.
    assert cost.collectives_s == 0 and cost.memory_s <= 3 * n * n * BF16 / V5P.hbm_bytes_per_s


def test_the_time_model_counts_an_elementwise_ops_bytes_at_hbm_bandwidth(mesh):
    cost = hlo_cost.cost(_compile(mesh, lambda x: x * 2 + 1, [P()], P(), [(1024, 1024)], jnp.float32).as_text(), _chip())
    assert cost.flops == 0 and cost.compute_s == 0
    assert cost.bytes == 2 * 1024 * 1024 * 4  # read once, written once: one fused op
    assert cost.memory_s == pytest.approx(cost.bytes / V5P.hbm_bytes_per_s)


def test_the_time_model_times_an_all_reduce_by_its_ring_traffic_over_ici_or_dcn(mesh):
    text = _compile(mesh, lambda x, w: x @ w, [P(None, "x"), P("x", None)], P(), [(256, 512), (512, 1024)]).as_text()
    ring = 2 * 3 / 4 * 256 * 1024 * BF16  # all-reduce over 4 chips: 2 (n - 1) / n of the result per chip
    ici = hlo_cost.cost(text, _chip())
    assert ici.ici_s == pytest.approx(ring / V5P.ici_bytes_per_s) and ici.dcn_s == 0
    dcn = hlo_cost.cost(text, _chip(slice_of=(0, 0, 1, 1)))  # the same group, across two slices
    assert dcn.dcn_s == pytest.approx(ring / V5P.dcn_bytes_per_s) and dcn.ici_s == 0
    assert ici.overlapped_s == max(ici.ops_s, ici.collectives_s) and ici.exposed_s == ici.ops_s + ici.collectives_s


def test_replica_groups_in_every_spelling():
    text = """HloModule m

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %a = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,2},{1,3}}, to_apply=%add
  %b = f32[8]{0} all-reduce(%x), channel_id=2, replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add
  %c = f32[8]{0} all-reduce(%x), channel_id=3, replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([4,2]T(1,0)) {'axis_0'}, to_apply=%add
  ROOT %d = f32[8]{0} all-reduce(%x), channel_id=4, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
}"""
    ins = hlo.parse(text)["main"].instructions
    groups = {k: hlo_cost.replica_groups(ins[k]).tolist() for k in "abcd"}
    assert groups["a"] == [[0, 2], [1, 3]]
    assert groups["b"] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # iota 0..7 as [4,2], transposed, in rows of 4
    # Mesh position (i, j) holds device_ids [4,2]T(1,0) = [[0,2],[4,6],[1,3],[5,7]][i][j]; a group runs over
    # axis_0 at fixed axis_1 (XLA's MeshAxesReplicaGroupList).
    assert groups["c"] == [[0, 4, 1, 5], [2, 6, 3, 7]]
    assert groups["d"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_tiled_bytes_pad_the_minor_dims_to_the_layouts_tile():
    assert hlo.tiled_bytes("bf16[3,100]{1,0:T(8,128)(2,1)}") == 8 * 128 * BF16
    assert hlo.tiled_bytes("bf16[4,8]{0,1:T(8,128)}") == 128 * 8 * BF16  # dim 0 is minor here
    assert hlo.tiled_bytes("f32[7]{0:T(1024)}") == 1024 * 4
    assert hlo.tiled_bytes("f32[2,3]") == hlo.shape_bytes("f32[2,3]") == 24
    # Memory space 1 is on-chip (VMEM): no HBM traffic.
    assert hlo.tiled_bytes("(f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)})", hbm_only=True) == 4096


def test_a_cross_slice_all_reduce_is_timed_over_dcn():
    """Across slices TPU writes the DCN part of an all-reduce as a host-transfer send to the megascale
    runtime (as compiled for 2 x v5p-16), which the time model reads as an all-reduce over the slices."""
    text = """HloModule m

ENTRY %main (x: bf16[256,1024]) -> bf16[256,1024] {
  %x = bf16[256,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %after-all = token[] after-all()
  %send = (bf16[256,1024]{1,0:T(8,128)(2,1)}, u32[], token[]) send(%x, %after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:7}",_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %y = bf16[256,1024]{1,0:T(8,128)(2,1)} copy(%x)
}"""
    cost = hlo_cost.cost(text, _chip(slice_of=(0,) * 8 + (1,) * 8))
    assert cost.dcn_s == pytest.approx(2 * 1 / 2 * 256 * 1024 * BF16 / V5P.dcn_bytes_per_s)
    assert cost.ici_s == 0 and cost.bytes == 2 * 256 * 1024 * BF16  # the copy; the send moves no HBM bytes here
    # The plan lists it among the collectives, by its DCN part.
    assert hlo.analyze(text).collectives["all-reduce across slices"] == hlo.Collective(1, 256 * 1024 * BF16)


def test_a_permute_within_a_slice_is_timed_over_ici_in_a_multi_slice_program():
    """A collective-permute crosses slices only if one of its hops does: the tensor-axis rings of a 2-slice
    program (as compiled for 2 x v5p-128) stay on ICI; it was charged at DCN bandwidth, 9 of 11.7 s a step."""
    text = """HloModule m

ENTRY %main (x: bf16[64,1024]) -> bf16[64,1024] {
  %x = bf16[64,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %s = (bf16[64,1024]{1,0:T(8,128)(2,1)}, bf16[64,1024]{1,0:T(8,128)(2,1)}) collective-permute-start(%x), channel_id=1, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  %a = bf16[64,1024]{1,0:T(8,128)(2,1)} collective-permute-done(%s)
  %t = (bf16[64,1024]{1,0:T(8,128)(2,1)}, bf16[64,1024]{1,0:T(8,128)(2,1)}) collective-permute-start(%a), channel_id=2, source_target_pairs={{0,2},{1,3},{2,0},{3,1}}
  ROOT %b = bf16[64,1024]{1,0:T(8,128)(2,1)} collective-permute-done(%t)
}"""
    assert hlo_cost.source_target_pairs(hlo.parse(text)["main"].instructions["s"]).tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]
    hop = 64 * 1024 * BF16  # a permute sends its result once
    cost = hlo_cost.cost(text, _chip(slice_of=(0, 0, 1, 1)))
    assert cost.ici_s == pytest.approx(hop / V5P.ici_bytes_per_s)  # %a: 0<->1 and 2<->3, each within a slice
    assert cost.dcn_s == pytest.approx(hop / V5P.dcn_bytes_per_s)  # %b: 0<->2 and 1<->3 cross


def test_a_computation_run_on_another_execution_thread_closes_where_it_ends():
    """libtpu 0.0.50.1 offloads the embedding gather to the SparseCore: that computation ends with
    '}, execution_thread="sparsecore"', and the computations after it must still be read."""
    text = """HloModule m

%called_computation (p: s32[8]) -> s32[8] {
  ROOT %p = s32[8]{0} parameter(0)
}, execution_thread="sparsecore"

%fused_computation.1 (q: f32[8]) -> f32[8] {
  %q = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%q)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  ROOT %f = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
}"""
    comps = hlo.parse(text)
    assert set(comps) == {"called_computation", "fused_computation.1", "main"}
    assert comps["fused_computation.1"].root.opcode == "negate" and comps["main"].is_entry
