"""The model config: a frozen, self-validating dataclass with derived sizes and FLOPs.

`ModelConfig.from_dict(config.model)` is the only place an experiment's `config.model` becomes a model
config: every field of the ConfigDict maps one-to-one onto a field here, so an ablation flag is one
field with a default, read in one place (the module that uses it).

Derived values are never stored as inputs: `head_dim=0` means dim // num_heads, and `to_dict()` writes 0
back unless head_dim was set explicitly, so overriding `dim` or `num_heads` of a preset (on the command
line, in a sweep, or through `replace`) derives head_dim again instead of keeping the preset's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from llama_jax.errors import ConfigError
from llama_jax.sections import Section

NORMS = ("rmsnorm", "layernorm")
MLP_ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu2")
GATED_ACTIVATIONS = ("swiglu", "geglu")
POSITIONS = ("rope", "none")
ROPE_SCALINGS = ("none", "llama3")
ATTENTION_IMPLS = ("auto", "xla", "dot_product", "cudnn", "splash", "splash_interpret")
# What each remat policy keeps in memory for the backward pass, by the names the block gives its
# activations (`checkpoint_name`): everything else in a layer is recomputed. Every policy keeps each
# layer's input (the residual stream). Per layer and token, in units of `dim` elements (Llama-3-8B:
# dim 4096, 8 kv heads of 128, ffn 14336): qkv_proj 1.5 (q, k, v after RoPE), attn_out 1, out_proj 1,
# mlp_in 2 * ffn/dim = 7 (gate and up). (The MLP's output needs no name: no gradient reads it.) Ordered
# from least memory (most recompute) to most.
REMAT_SAVES = {
    "full": (),
    "save_qkv_proj": ("qkv_proj",),
    "save_attn": ("qkv_proj", "attn_out"),
    "save_dots_except_mlp": ("qkv_proj", "attn_out", "out_proj"),
    "save_dots": ("qkv_proj", "attn_out", "out_proj", "mlp_in"),
}
REMAT_POLICIES = ("none", *REMAT_SAVES)  # "none": no remat, every intermediate is kept
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    SECTION = "model"

    vocab_size: int = 384
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # Grouped-query attention: 1 <= num_kv_heads <= num_heads; 1 is multi-query attention.
    num_kv_heads: int = 4
    # 0 means dim // num_heads (LLaMA's convention); set it to decouple head width from model width.
    head_dim: int = 0
    ffn_dim: int = 172
    max_seq_len: int = 256

    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp_activation: str = "swiglu"
    position: str = "rope"
    rope_theta: float = 10000.0
    # Llama-3.1 frequency scaling ("llama3"); the four numbers below are ignored when "none".
    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qk_norm: bool = False
    tie_embeddings: bool = False
    parallel_block: bool = False
    use_bias: bool = False

    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the params
    attention_impl: str = "auto"
    remat_policy: str = "none"
    scan_layers: bool = False
    # Sequence positions per chunk of the LM head + cross-entropy (model/loss.py); 0 computes the whole
    # [batch, seq, vocab] f32 logits at once. Chunks bound that buffer to [batch, loss_chunk, vocab].
    loss_chunk: int = 0

    def __post_init__(self):
        def check(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"invalid model config: {msg}")

        check(self.loss_chunk >= 0, f"model.loss_chunk={self.loss_chunk} must be >= 0 (0: no chunking).")
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, f"model.{name}={v!r} must be a positive integer.")
        check(
            self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.num_kv_heads}; "
            "set num_kv_heads to a divisor of num_heads (num_heads for MHA, 1 for MQA).",
        )
        if self.head_dim == 0:
            check(
                self.dim % self.num_heads == 0,
                f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them or set model.head_dim explicitly.",
            )
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
            object.__setattr__(self, "_derived_head_dim", True)
        check(self.head_dim > 0, f"model.head_dim={self.head_dim} must be positive (0 derives it).")
        if self.position == "rope":
            check(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}.")
            check(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be positive.")
        for name, allowed in (
            ("norm", NORMS),
            ("mlp_activation", MLP_ACTIVATIONS),
            ("position", POSITIONS),
            ("rope_scaling", ROPE_SCALINGS),
            ("attention_impl", ATTENTION_IMPLS),
            ("remat_policy", REMAT_POLICIES),
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
        ):
            v = getattr(self, name)
            check(v in allowed, f"model.{name}={v!r} is not one of {allowed}.")
        if self.rope_scaling == "llama3":
            check(
                self.rope_high_freq_factor > self.rope_low_freq_factor,
                "llama3 rope scaling needs rope_high_freq_factor > rope_low_freq_factor.",
            )
        check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be positive.")

    def to_dict(self) -> dict[str, Any]:
        """The input fields: a derived head_dim is written as 0, so it is derived again when read back."""
        d = dataclasses.asdict(self)
        if getattr(self, "_derived_head_dim", False):
            d["head_dim"] = 0
        return d

    # ------------------------------------------------------------------ derived sizes
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_activation in GATED_ACTIVATIONS

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def _norm_params(self, width: int) -> int:
        return width * (2 if self.norm == "layernorm" else 1)

    def layer_param_count(self) -> int:
        d, h, kv, hd, f = self.dim, self.num_heads, self.num_kv_heads, self.head_dim, self.ffn_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        mlp = (3 if self.gated_mlp else 2) * d * f
        n = attn + mlp
        if self.use_bias:
            n += h * hd + 2 * kv * hd + d  # q, k, v, o biases
            n += (2 * f if self.gated_mlp else f) + d  # gate/up, down biases
        if self.qk_norm:
            n += 2 * self._norm_params(hd)
        n += self._norm_params(d) * (1 if self.parallel_block else 2)
        return n

    def param_count(self) -> int:
        n = self.vocab_size * self.dim  # embedding
        n += self.num_layers * self.layer_param_count()
        n += self._norm_params(self.dim)  # final norm
        if not self.tie_embeddings:
            n += self.dim * self.vocab_size
        return n

    def matmul_param_count(self) -> int:
        """Params that take part in a matmul per token: the blocks' projections and the LM head.

        The embedding lookup is a gather (no FLOPs); the head matmul happens whether or not it is tied.
        """
        d, h, kv, hd, f = self.dim, self.num_heads, self.num_kv_heads, self.head_dim, self.ffn_dim
        per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + (3 if self.gated_mlp else 2) * d * f
        return self.num_layers * per_layer + self.dim * self.vocab_size

    def flops_per_token(self, seq_len: int, *, training: bool = True, causal_halving: bool = True,
                        adapter_params: int | None = None, weight_grad_params: int = 0) -> float:
        """Model FLOPs per token: 2N forward (6N with backward) plus attention scores and values.

        `adapter_params` (LoRA training, the sum of r * (in + out) over adapted kernels): the frozen base
        computes activation gradients but no weight gradients, so 4N, and each adapter pair A, B costs
        2 * r * (in + out) forward and twice that backward: 4N + 6 * adapter_params (+ attention). (The
        first layer's input gradient, which nothing needs, is counted: 1/num_layers of the 2N backward.)
        `weight_grad_params`: those of the N that train fully next to the adapters (lora.train_also's LM
        head) and so do get weight gradients, 2 each.
        With `seq_len` 0, the matmul FLOPs alone.

        Attention adds 4 * L * heads * head_dim * seq_len FLOPs forward per token (QK^T and AV). With
        `causal_halving` (the default) that term is halved, because a causal token attends on average
        to half the context: this is the work a causal kernel must do, so MFU is not inflated by
        masked-out FLOPs. PaLM's appendix-B formula is `causal_halving=False`.
        """
        attn = 4 * self.num_layers * self.num_heads * self.head_dim * seq_len
        if causal_halving:
            attn /= 2
        fwd = 2 * self.matmul_param_count() + attn
        if adapter_params is None:
            return float(3 * fwd if training else fwd)
        frozen_weight_grads = 2 * (self.matmul_param_count() - weight_grad_params) if training else 0
        return float((3 if training else 1) * (fwd + 2 * adapter_params) - frozen_weight_grads)


# ---------------------------------------------------------------------- presets
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192)
_LLAMA3_2 = dict(
    _LLAMA3,
    max_seq_len=131072,
    rope_scaling="llama3",
    rope_scaling_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_position=8192,
    tie_embeddings=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Two layers, GQA, small enough that every test compiles it in seconds. 384 >= the byte tokenizer's
    # 259 ids, and divisible by 8 so the vocab shards over any test mesh.
    "tiny": dict(vocab_size=384, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=172, max_seq_len=128),
    # The README main job: sized for a 5-minute CPU budget (2 cores), where a narrow model that takes ~1000
    # optimizer steps beats a wider one that takes a few hundred. Vocab 1024 fits the BPE it trains.
    "shakespeare": dict(
        vocab_size=1024, dim=128, num_layers=4, num_heads=2, num_kv_heads=2, ffn_dim=352, max_seq_len=256
    ),
    "llama2_7b": dict(_LLAMA2, dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_dim=11008),
    "llama2_13b": dict(_LLAMA2, dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, ffn_dim=13824),
    "llama2_70b": dict(_LLAMA2, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_dim=28672),
    "llama3_8b": dict(_LLAMA3, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=14336),
    "llama3_70b": dict(_LLAMA3, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_dim=28672),
    "llama3_2_1b": dict(_LLAMA3_2, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_dim=8192),
    "llama3_2_3b": dict(_LLAMA3_2, dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_dim=8192),
    "smollm2_135m": dict(
        vocab_size=49152,
        dim=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        ffn_dim=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named model (PRESETS) with `overrides` applied; derived sizes follow the overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return ModelConfig(**{**PRESETS[name], **overrides})
