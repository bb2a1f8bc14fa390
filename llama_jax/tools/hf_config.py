"""Hugging Face Llama config.json <-> ModelConfig (llama_jax/tools/hf.py moves the weights).

Both config.json dialects are read: transformers v4 (`rope_theta` plus `rope_scaling`) and v5
(`rope_parameters` holding rope_theta and rope_type). Export writes both, so the directory loads the same
in transformers 4.x and 5.x. What the model cannot represent exactly raises HFImportError / HFExportError
naming the key and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_jax.errors import ConfigError, HFExportError, HFImportError
from llama_jax.model import ModelConfig

CONFIG_FILE = "config.json"
# HF config entries that say nothing about the network but that generation needs; carried through a workdir.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_HF_DEFAULT_RMS_EPS = 1e-6
_HF_DEFAULT_MAX_POSITIONS = 2048
_HF_DEFAULT_ROPE_THETA = 10000.0


def _rope_from_hf(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig rope fields from either config.json dialect (v5 `rope_parameters`, v4 `rope_scaling`)."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if params and legacy and _rope_key(params) != _rope_key(legacy):
        # Ambiguous: transformers 5 would silently prefer rope_scaling, transformers 4 ignores rope_parameters.
        raise HFImportError(
            f"{where}: rope_parameters {params} and rope_scaling {legacy} disagree; "
            "keep one of them (transformers 5 writes rope_parameters)."
        )
    rope = dict(params or legacy or {})
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", _HF_DEFAULT_ROPE_THETA)))
    rope_type = _rope_type(rope)
    if rope_type == "default":
        return {"rope_theta": rope_theta, "rope_scaling": "none"}
    if rope_type != "llama3":
        raise HFImportError(
            f"{where}: rope_type {rope_type!r} is not supported; llama_jax implements 'default' and 'llama3' "
            "(Llama 3.1+) RoPE only. Convert a checkpoint trained with one of those."
        )
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    if missing:
        raise HFImportError(f"{where}: llama3 rope scaling is missing {missing}; add them to the rope dict.")
    # transformers' default for original_max_position_embeddings is the model's max_position_embeddings.
    original = rope.get(
        "original_max_position_embeddings", hf.get("max_position_embeddings", _HF_DEFAULT_MAX_POSITIONS)
    )
    return {
        "rope_theta": rope_theta,
        "rope_scaling": "llama3",
        "rope_scaling_factor": float(rope["factor"]),
        "rope_low_freq_factor": float(rope["low_freq_factor"]),
        "rope_high_freq_factor": float(rope["high_freq_factor"]),
        "rope_original_max_position": int(original),
    }


def _rope_type(rope: Mapping[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _rope_key(rope: Mapping[str, Any]) -> dict[str, Any]:
    """A rope dict made comparable across dialects: one type key, and rope_theta (often top-level) left out."""
    return {k: v for k, v in rope.items() if k not in ("type", "rope_type", "rope_theta")} | {
        "rope_type": _rope_type(rope)
    }


def config_from_hf(hf: Mapping[str, Any], *, where: str = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig an HF Llama config.json describes; raises HFImportError for what it cannot represent.

    `where` names the file in error messages.
    """
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise HFImportError(
            f"{where}: model_type is {model_type!r}, but only 'llama' checkpoints can be imported "
            "(LlamaForCausalLM); other architectures differ in ways this model does not implement."
        )
    if hf.get("quantization_config"):
        raise HFImportError(f"{where}: quantized checkpoints are not supported; use the unquantized weights.")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers maps both names to torch's SiLU
        raise HFImportError(
            f"{where}: hidden_act={act!r}; the model implements LLaMA's SwiGLU MLP, which needs 'silu'."
        )
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise HFImportError(
            f"{where}: attention_bias={attention_bias} but mlp_bias={mlp_bias}; the model has one use_bias flag "
            "for every projection, so both must be equal."
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise HFImportError(f"{where}: missing {missing}; a Llama config.json must set them.")
    num_heads = int(hf["num_attention_heads"])
    try:
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or 0),
            ffn_dim=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", _HF_DEFAULT_MAX_POSITIONS)),
            norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", _HF_DEFAULT_RMS_EPS)),
            mlp_activation="swiglu",
            position="rope",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            use_bias=attention_bias,
            initializer_range=float(hf.get("initializer_range", 0.02)),
            **_rope_from_hf(hf, where),
        )
    except ConfigError as e:
        raise HFImportError(f"{where}: {e}") from e


def config_to_hf(
    config: ModelConfig, *, dtype: str = "float32", extra: Mapping[str, Any] | None = None
) -> dict:
    """An HF config.json dict for `config`; raises HFExportError if HF's LlamaForCausalLM cannot express it."""
    unsupported = {
        "norm": (config.norm, "rmsnorm"),
        "mlp_activation": (config.mlp_activation, "swiglu"),
        "position": (config.position, "rope"),
        "qk_norm": (config.qk_norm, False),
        "parallel_block": (config.parallel_block, False),
    }
    bad = [
        f"model.{k}={got!r} (HF Llama needs {want!r})"
        for k, (got, want) in unsupported.items()
        if got != want
    ]
    if bad:
        raise HFExportError(
            f"this model cannot be written as an HF Llama checkpoint: {', '.join(bad)}. Only LLaMA-architecture "
            "models export; keep the workdir format for the others."
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position,
        }
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.use_bias,
        "mlp_bias": config.use_bias,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling. Write both.
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": (
            {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling == "llama3" else None
        ),
        "dtype": dtype,
        # Otherwise LlamaConfig's defaults (bos 1, eos 2) apply, which are wrong for most tokenizers.
        **{k: None for k in TOKEN_ID_KEYS},
    }
    hf.update(extra or {})
    return hf
