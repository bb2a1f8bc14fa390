"""Causal grouped-query attention with segment ids, a KV cache, and three kernels.

Masking is defined by *slots* and *segments*: query i may see key j iff slot(j) <= slot(i) and
segment(j) == segment(i). Slots are positions in the (possibly cached) sequence buffer; segment 0 marks
padding and empty cache slots. Packed training documents, left-padded prompts and cached decoding are all
this one rule.

Kernels (`model.attention_impl`):
- "xla": einsum + f32 softmax; runs everywhere. Without a cache it is `causal_attention`, which skips
  fully masked blocks; `xla_attention`, the dense masked form, is the reference every kernel is tested
  against.
- "dot_product": `jax.nn.dot_product_attention`. Compiled for a GPU with bf16/fp16 compute it resolves to
  "cudnn"; elsewhere (or in f32) it is that function's XLA implementation.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash attention (GPU only;
  bf16/fp16). Named explicitly because jax's default implementation (None) is XLA's, not cuDNN's: it
  materializes every [q_len, kv_len] score matrix in f32.
- "splash": Pallas splash attention, compiled by Mosaic for TPU.
- "splash_interpret": the same kernel in Pallas interpret mode, on any backend: tests on CPU verify the
  exact kernel a TPU user runs.
- "auto": splash on TPU, cudnn on GPU (dot_product in f32), xla on CPU.
"auto", "dot_product" and "splash" are resolved for the platform the step is *compiled for*
(`for_platform`, called with the mesh's devices), not the host's runtime backend: compiling ahead of time
for a TPU topology on a CPU host must produce the TPU kernel.
Splash needs sequence lengths that are multiples of 128; other lengths take the xla path.
Decoding with a KV cache always uses `cached_attention` (XLA): a handful of query tokens gains nothing
from a flash kernel.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.model.config import ModelConfig
from llama_jax.model.linear import dense
from llama_jax.model.norm import Norm
from llama_jax.model.rope import apply_rope, inverse_frequencies

# Finite, so that a fully masked row (a padding query) gives a uniform softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# Compute dtypes cuDNN's fused attention takes (it refuses f32).
CUDNN_DTYPES = ("bfloat16", "float16")


def resolve_impl(impl: str, platform: str, dtype: str = "bfloat16") -> str:
    """The kernel `impl` means on `platform` ("tpu", "gpu", "cpu") with compute `dtype`: auto picks,
    dot_product on a GPU in bf16/fp16 is cuDNN's, splash off-TPU interprets."""
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "dot_product"}.get(platform, "xla")
    if impl == "dot_product" and platform == "gpu" and dtype in CUDNN_DTYPES:
        impl = "cudnn"
    if impl == "splash" and platform != "tpu":
        impl = "splash_interpret"
    return impl


def for_platform(config: ModelConfig, platform: str) -> ModelConfig:
    """`config` with its attention kernel resolved for `platform` (the compile target's, e.g.
    `mesh.devices.flat[0].platform`). Every jitted program builds its model from this."""
    return config.replace(attention_impl=resolve_impl(config.attention_impl, platform, config.dtype))


def make_mask(q_slots, k_slots, q_segment_ids, k_segment_ids):
    """Boolean [batch, q_len, kv_len]: causal by slot, and same segment.

    q_slots: [q_len]; k_slots: [kv_len]; segment ids: [batch, q_len] / [batch, kv_len].
    """
    causal = q_slots[:, None] >= k_slots[None, :]  # [q_len, kv_len]
    same_segment = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]  # [batch, q_len, kv_len]
    return causal[None] & same_segment


def _to_rows(q, kv_heads: int):
    """[batch, q_len, heads, head_dim] -> [batch, kv_heads, q_len * q_per_kv, head_dim].

    Rows are (position, group)-major: every dot below is a plain batched matmul against heads-major
    keys, and a run of positions is a contiguous run of rows.
    """
    b, t, h, d = q.shape
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [batch, q_len, kv_heads, q_per_kv, head_dim]
    return q.transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, -1, d)  # [batch, kv_heads, rows, head_dim]


def _from_rows(out, q_len: int):
    """Inverse of `_to_rows`: [batch, kv_heads, rows, head_dim] -> [batch, q_len, heads, head_dim]."""
    b, kv, _, d = out.shape
    out = out.reshape(b, kv, q_len, -1, d)  # [batch, kv_heads, q_len, q_per_kv, head_dim]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, q_len, -1, d)


def _attend(q, k, v, mask):
    """q: [batch, kv_heads, rows, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim]; mask [batch, rows, kv_len]."""
    scores = jnp.einsum("bkrd,bksd->bkrs", q, k, preferred_element_type=jnp.float32)
    # scores: [batch, kv_heads, rows, kv_len]
    probs = _masked_softmax(scores, mask).astype(v.dtype)
    return jnp.einsum("bkrs,bksd->bkrd", probs, v)  # [batch, kv_heads, rows, head_dim]


def _masked_softmax(scores, mask):
    """scores: [batch, kv_heads, rows, keys] f32; mask: [batch, rows, keys]."""
    return jax.nn.softmax(jnp.where(mask[:, None], scores, MASK_VALUE), axis=-1)


def xla_attention(q, k, v, mask):
    """The dense masked reference every kernel is tested against.

    q: [batch, q_len, heads, head_dim] (pre-scaled); k, v: [batch, kv_len, kv_heads, head_dim];
    mask: [batch, q_len, kv_len]. Returns [batch, q_len, heads, head_dim].
    """
    kv = k.shape[2]
    g = q.shape[2] // kv
    k = k.transpose(0, 2, 1, 3)  # [batch, kv_heads, kv_len, head_dim]
    v = v.transpose(0, 2, 1, 3)
    return _from_rows(_attend(_to_rows(q, kv), k, v, jnp.repeat(mask, g, axis=1)), q.shape[1])


# Query rows per block of `causal_attention`: with 256 tokens, 2 blocks skip a quarter of the scores.
CAUSAL_BLOCK = 128


def causal_attention(q, k, v, segment_ids, block: int = CAUSAL_BLOCK):
    """Causal attention over one whole sequence (no cache), skipping the key blocks a query block cannot see.

    Query block [r0, r1) only scores keys [0, r1): the fully masked upper-right blocks are never computed,
    nor their softmax, nor their gradients. Equal to `xla_attention` with `make_mask`
    (tests/test_model.py), and 1.9x faster forward+backward than it on XLA:CPU at 256 tokens.

    q: [batch, seq, heads, head_dim] (pre-scaled); k, v: [batch, seq, kv_heads, head_dim];
    segment_ids: [batch, seq].
    """
    t = q.shape[1]
    kv = k.shape[2]
    g = q.shape[2] // kv
    q = _to_rows(q, kv)  # [batch, kv_heads, seq * q_per_kv, head_dim]
    k = k.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
    v = v.transpose(0, 2, 1, 3)
    outs = []
    for r0 in range(0, t, block):
        r1 = min(r0 + block, t)
        rows = jnp.repeat(jnp.arange(r0, r1), g)  # the position of each query row
        seg_rows = jnp.repeat(segment_ids[:, r0:r1], g, axis=1)  # [batch, rows]
        mask = make_mask(rows, jnp.arange(r1), seg_rows, segment_ids[:, :r1])  # [batch, rows, r1]
        outs.append(_attend(q[:, :, r0 * g : r1 * g], k[:, :, :r1], v[:, :, :r1], mask))
    return _from_rows(jnp.concatenate(outs, axis=2), t)  # [batch, seq, heads, head_dim]


def cached_attention(q, k, v, k_buf, v_buf, q_slots, segment_ids, k_segment_ids, index):
    """This call's queries over the cache's filled slots (< index) and over this call's own keys.

    The buffers are read as they were before this call's write, and the new keys separately, so no op
    reads the buffer that the update writes and XLA updates it in place. Attending to the updated
    buffer instead made XLA:CPU copy every layer's cache 4 times per token at batch 1.

    q: [batch, seq, heads, head_dim] (pre-scaled); k, v: [batch, kv_heads, seq, head_dim];
    k_buf, v_buf: [batch, kv_heads, max_len, head_dim]; q_slots: [seq]; segment_ids: [batch, seq];
    k_segment_ids: [batch, max_len].
    """
    kv, max_len = k_buf.shape[1], k_buf.shape[2]
    g = q.shape[2] // kv
    slots = jnp.arange(max_len)
    mask_cached = make_mask(q_slots, slots, segment_ids, k_segment_ids) & (slots < index)  # [batch, seq, max_len]
    mask_new = make_mask(q_slots, q_slots, segment_ids, segment_ids)  # [batch, seq, seq]
    mask = jnp.repeat(jnp.concatenate([mask_cached, mask_new], -1), g, axis=1)  # [batch, rows, max_len + seq]
    q = _to_rows(q, kv)  # [batch, kv_heads, rows, head_dim]
    scores = jnp.concatenate(
        [
            jnp.einsum("bkrd,bksd->bkrs", q, k_buf, preferred_element_type=jnp.float32),
            jnp.einsum("bkrd,bksd->bkrs", q, k, preferred_element_type=jnp.float32),
        ],
        axis=-1,
    )  # [batch, kv_heads, rows, max_len + seq]
    probs = _masked_softmax(scores, mask).astype(v.dtype)
    out = jnp.einsum("bkrs,bksd->bkrd", probs[..., :max_len], v_buf)  # [batch, kv_heads, rows, head_dim]
    out = out + jnp.einsum("bkrs,bksd->bkrd", probs[..., max_len:], v)
    return _from_rows(out, q_slots.shape[0])  # [batch, seq, heads, head_dim]


def dot_product_attention(q, k, v, segment_ids, implementation: str | None = None):
    """jax.nn.dot_product_attention; causal, with a segment mask only when packing.

    implementation: None (jax's default, which is XLA's) or "cudnn" (cuDNN flash attention, GPU only; a
    segment mask reaches it as an additive bias).
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [batch, 1, q_len, kv_len]
    # q is pre-scaled, hence scale=1.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=1.0,
                                        implementation=implementation)


SPLASH_BLOCK_MULTIPLE = 128


# Splash's own default block sizes (MaxText's too): a multiple of the 128-lane vector width that Mosaic
# tiles by, large enough that the per-block grid overhead is small, and small enough for VMEM at
# head_dim 128 in every generation from v4 to v6e (compiled in tests/tools/test_plan.py).
SPLASH_BLOCK = 512


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = min(SPLASH_BLOCK, seq_len)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    # Built per trace, not cached: the kernel holds mask-info arrays that would leak from one trace to the next.
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, segment_ids, interpret: bool):
    """Splash on one device's block: q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, ...]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, d = q.shape
    kernel = _splash_kernel(h, t, interpret=interpret)
    q = q.transpose(0, 2, 1, 3)  # [batch, heads, q_len, head_dim]
    k = k.transpose(0, 2, 1, 3)  # [batch, kv_heads, kv_len, head_dim]
    v = v.transpose(0, 2, 1, 3)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        seg = sk.SegmentIds(q=segment_ids, kv=segment_ids)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)  # [batch, q_len, heads, head_dim]


def splash_attention(q, k, v, segment_ids, interpret: bool = False):
    """Pallas splash attention; the causal mask is static, so fully masked blocks are skipped.

    A Mosaic kernel cannot be auto-partitioned, so under a device mesh it runs inside shard_map, each
    device on its own batch rows and heads, laid out by the same logical rules as the activations.
    """
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, segment_ids)
    q_spec = nn.logical_to_mesh_axes(("batch", "length", "heads", None))
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", None))
    seg_spec = nn.logical_to_mesh_axes(("batch", "length"))
    if q_spec[1] is not None:
        raise NotImplementedError(
            "splash attention does not support a sharded sequence ('length') axis; use attention_impl=xla."
        )
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False
    )(q, k, v, segment_ids)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv_cache=None):
        """x: [batch, seq, embed]; positions: [batch, seq]; segment_ids: [batch, seq] or None.

        kv_cache: None, or (k_buf, v_buf, k_segment_ids, index) with buffers [batch, kv_heads, max_len,
        head_dim], where this call's tokens are written at slots index..index+seq-1. Returns
        (out [batch, seq, embed], (k_buf, v_buf) or None).
        """
        cfg = self.config
        q = dense(cfg, (cfg.num_heads, cfg.head_dim), "q_proj")(x)  # [batch, seq, heads, head_dim]
        k = dense(cfg, (cfg.num_kv_heads, cfg.head_dim), "k_proj")(x)  # [batch, seq, kv_heads, head_dim]
        v = dense(cfg, (cfg.num_kv_heads, cfg.head_dim), "v_proj")(x)  # [batch, seq, kv_heads, head_dim]
        if cfg.qk_norm:
            q = Norm(cfg, name="q_norm")(q)
            k = Norm(cfg, name="k_norm")(k)
        if cfg.position == "rope":
            inv_freq = inverse_frequencies(cfg)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        # Names for the remat policies (config.REMAT_SAVES).
        q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", None))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", None))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", None))
        q = q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)

        seq = x.shape[1]
        new_cache = None
        if kv_cache is not None:
            k_buf, v_buf, k_segment_ids, index = kv_cache
            k_new = k.transpose(0, 2, 1, 3).astype(k_buf.dtype)  # [batch, kv_heads, seq, head_dim]
            v_new = v.transpose(0, 2, 1, 3).astype(v_buf.dtype)
            q_slots = index + jnp.arange(seq)
            out = cached_attention(
                q, *(t.astype(q.dtype) for t in (k_new, v_new, k_buf, v_buf)), q_slots, segment_ids,
                k_segment_ids, index,
            )
            new_cache = (
                jax.lax.dynamic_update_slice_in_dim(k_buf, k_new, index, axis=2),
                jax.lax.dynamic_update_slice_in_dim(v_buf, v_new, index, axis=2),
            )
        else:
            impl = cfg.attention_impl
            if impl == "auto":  # a direct Llama.apply, not a program built by for_platform: the runtime's
                impl = resolve_impl(impl, jax.default_backend(), cfg.dtype)
            if impl.startswith("splash") and seq % SPLASH_BLOCK_MULTIPLE:
                impl = "xla"  # the kernel tiles the sequence in blocks of 128 (e.g. init's 1-token call)
            if impl == "xla":
                seg = segment_ids if segment_ids is not None else jnp.ones(x.shape[:2], jnp.int32)
                out = causal_attention(q, k, v, seg)
            elif impl in ("dot_product", "cudnn"):
                cudnn = "cudnn" if impl == "cudnn" else None
                out = dot_product_attention(q, k, v, segment_ids, implementation=cudnn)
            else:
                out = splash_attention(q, k, v, segment_ids, interpret=impl == "splash_interpret")
        out = checkpoint_name(out, "attn_out")
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", None))
        out = dense(cfg, cfg.dim, "o_proj", num_contract=2)(out)  # [batch, seq, embed]
        out = checkpoint_name(out, "out_proj")
        return out, new_cache
