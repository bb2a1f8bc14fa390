"""Import and export Hugging Face `LlamaForCausalLM` checkpoints (config.json + safetensors).

    config, params = load_hf_llama("path/to/Llama-3.2-1B")          # -> ModelConfig, params pytree
    save_hf_llama(config, params, "path/to/out")                      # -> transformers-loadable dir
    import_to_workdir(hf_dir, workdir) / export_from_workdir(workdir, hf_dir)   # what convert_hf runs

Weight layout. HF stores every projection as a torch Linear weight `[out, in]`; ours are Flax kernels
`[in..., out...]` that keep the head axes (see llama_jax.model.linear), so a conversion is a transpose plus a
reshape and nothing else (bit-exact both ways):

    q_proj.weight [H*hd, D]   <->  attn/q_proj/kernel [D, H, hd]     (k/v: KV instead of H)
    o_proj.weight [D, H*hd]   <->  attn/o_proj/kernel [H, hd, D]
    {gate,up}_proj.weight [F, D], down_proj.weight [D, F]  <->  kernels [D, F], [F, D]
    lm_head.weight [V, D]     <->  lm_head/kernel [D, V]; embed_tokens.weight [V, D] is the same array.

RoPE needs no permutation: HF checkpoints use the half-split rotation (dimension i pairs with
i + head_dim/2; HF's conversion script already permuted Meta's interleaved q/k rows into it), and so does
llama_jax.model.rope. This module therefore expects HF-format weights, not Meta's original `consolidated.*.pth`.

Only what the model can represent exactly is accepted: `model_type` "llama", SiLU (SwiGLU) MLP, RMSNorm,
rope_type "default" or "llama3", and `attention_bias == mlp_bias` (the model has one `use_bias` flag that
covers every projection). Anything else raises HFImportError / HFExportError naming the file, the key and
the fix, rather than producing a model that silently computes something else.

config.json <-> ModelConfig (both transformers 4.x and 5.x dialects) is llama_jax/tools/hf_config.py.

Outputs are built in a temporary directory beside the target and renamed into place at the end, so an
interrupted or failed conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llama_jax import checkpoint, model
from llama_jax.errors import HFExportError, HFImportError
from llama_jax.lora.workdir import restore_model_params
from llama_jax.model import ModelConfig
from llama_jax.tools.hf_config import CONFIG_FILE, TOKEN_ID_KEYS, config_from_hf, config_to_hf

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer files copied between an HF directory and a workdir's tokenizer/ (whichever exist). The chat
# template is tokenizer_config.json's "chat_template" (transformers < 4.43) or chat_template.jinja (newer
# save_pretrained), so a workdir keeps the template its model was tuned with (llama_jax.data.chat).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
# transformers' own default shard size for save_pretrained in 4.x; big enough that 1B models are one file.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Non-parameter buffers some older checkpoints saved; they are recomputed from the config, so skip them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# HF defaults (LlamaConfig) for keys a config.json may leave out.
# ---------------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the param it becomes.

    `linear` marks a torch Linear weight: HF `[out, in]` equals our kernel reshaped to `[in, out]` and
    transposed, where `in`/`out` flatten the kernel's leading/trailing axes (row-major, so head axes
    flatten exactly as HF's `view(..., heads, head_dim)` does). Other tensors only reshape.
    """

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    linear: bool = False

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return (w.T if self.linear else w).reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.linear:
            out_features, in_features = self.hf_shape
            return np.ascontiguousarray(x.reshape(in_features, out_features).T)  # [out, in]
        return np.ascontiguousarray(x.reshape(self.hf_shape))


def _linear(hf_name: str, path: tuple[str, ...], out_shape, in_shape, bias: bool) -> list[_Tensor]:
    """A Linear: kernel [*in_shape, *out_shape] <-> weight [prod(out), prod(in)], bias [*out] <-> [prod(out)]."""
    n_out, n_in = math.prod(out_shape), math.prod(in_shape)
    t = [_Tensor(f"{hf_name}.weight", (*path, "kernel"), (n_out, n_in), (*in_shape, *out_shape), linear=True)]
    if bias:
        t.append(_Tensor(f"{hf_name}.bias", (*path, "bias"), (n_out,), tuple(out_shape)))
    return t


def _tensor_specs(cfg: ModelConfig) -> list[_Tensor]:
    """Every tensor of an HF LlamaForCausalLM with `cfg`, in HF's state_dict order."""
    d, h, kv, hd, f, v = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    b = cfg.use_bias
    specs = [_Tensor("model.embed_tokens.weight", ("embed", "embedding"), (v, d), (v, d))]
    for i in range(cfg.num_layers):
        hf_p, p = f"model.layers.{i}", f"layers_{i}"
        specs += _linear(f"{hf_p}.self_attn.q_proj", (p, "attn", "q_proj"), (h, hd), (d,), b)
        specs += _linear(f"{hf_p}.self_attn.k_proj", (p, "attn", "k_proj"), (kv, hd), (d,), b)
        specs += _linear(f"{hf_p}.self_attn.v_proj", (p, "attn", "v_proj"), (kv, hd), (d,), b)
        specs += _linear(f"{hf_p}.self_attn.o_proj", (p, "attn", "o_proj"), (d,), (h, hd), b)
        specs += _linear(f"{hf_p}.mlp.gate_proj", (p, "mlp", "gate_proj"), (f,), (d,), b)
        specs += _linear(f"{hf_p}.mlp.up_proj", (p, "mlp", "up_proj"), (f,), (d,), b)
        specs += _linear(f"{hf_p}.mlp.down_proj", (p, "mlp", "down_proj"), (d,), (f,), b)
        specs.append(_Tensor(f"{hf_p}.input_layernorm.weight", (p, "attn_norm", "scale"), (d,), (d,)))
        specs.append(_Tensor(f"{hf_p}.post_attention_layernorm.weight", (p, "mlp_norm", "scale"), (d,), (d,)))
    specs.append(_Tensor("model.norm.weight", ("final_norm", "scale"), (d,), (d,)))
    if not cfg.tie_embeddings:
        specs.append(_Tensor("lm_head.weight", ("lm_head", "kernel"), (v, d), (d, v), linear=True))
    return specs


def _open_weights(path: pathlib.Path):
    """safe_open(path), with a truncated or corrupt file reported by name (the library's error names none).

    safe_open checks the whole header and that it covers the file, so a damaged file fails here, not later.
    """
    try:
        return safe_open(path, framework="np")
    except SafetensorError as e:
        raise HFImportError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt. Download or "
            "save it again."
        ) from e


def _weight_files(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """tensor name -> the safetensors file holding it, from the index json or the single file's header."""
    index = hf_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise HFImportError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        files = {name: hf_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.exists():
                raise HFImportError(f"{index} lists shard {path.name}, which is missing from {hf_dir}.")
        return files
    single = hf_dir / SINGLE_FILE
    if single.exists():
        with _open_weights(single) as f:
            return {name: single for name in f.keys()}
    others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(p.name for p in hf_dir.glob("*.pth"))
    hint = (
        f" Found {others}: re-save them as safetensors (LlamaForCausalLM.from_pretrained(dir)"
        ".save_pretrained(out)) first."
        if others
        else ""
    )
    raise HFImportError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir}.{hint}")


# safetensors header dtypes that import, and their numpy names.
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _storage_dtype(dtypes: set[str], requested: str | None) -> str:
    """The params' dtype: the requested one, else the checkpoint's if uniform and supported, else float32."""
    if requested is not None:
        return str(jnp.dtype(requested))
    if len(dtypes) == 1 and dtypes <= {"float32", "bfloat16", "float16"}:
        return next(iter(dtypes))
    return "float32"


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def load_hf_llama(hf_dir, *, scan_layers: bool = False, dtype: str | None = None):
    """Read an HF Llama checkpoint dir -> (ModelConfig, params).

    dtype: the params' storage dtype ("float32", "bfloat16", ...); None keeps the checkpoint's own dtype
    (float32 if its tensors mix dtypes). The returned config's `param_dtype` says which; its compute
    `dtype` is left at float32 (`config.replace(dtype="bfloat16")` for bf16 compute).
    scan_layers: return the stacked `layers/...` layout (and a config with scan_layers=True).
    """
    hf_dir = pathlib.Path(hf_dir)
    config_path = hf_dir / CONFIG_FILE
    cfg = _read_hf_config(config_path)
    specs = _tensor_specs(cfg)
    files = _weight_files(hf_dir)
    tied_head = cfg.tie_embeddings and "lm_head.weight" in files
    _check_tensor_names(hf_dir, config_path, specs, files, tied_head)
    by_file: dict[pathlib.Path, list[_Tensor]] = {}
    for s in specs:
        by_file.setdefault(files[s.hf_name], []).append(s)
    # Pass 1, headers only: shapes and dtypes are checked before any tensor is read.
    param_dtype = _storage_dtype(_check_headers(by_file, config_path), dtype)
    cfg = cfg.replace(param_dtype=param_dtype, scan_layers=scan_layers)
    # Pass 2: one tensor at a time, read -> transpose/reshape -> cast -> jax array, so host memory peaks at
    # about one model in the target dtype plus one tensor (this matters at 8B+).
    params: dict = {}
    for path, file_specs in by_file.items():
        with _open_weights(path) as f:
            for s in file_specs:
                w = s.to_ours(f.get_tensor(s.hf_name)).astype(jnp.dtype(param_dtype))
                _set(params, s.path, jnp.asarray(w))
    if tied_head:
        _check_tied_head(files)
    return cfg, model.to_layout(params, cfg)


def _read_hf_config(config_path: pathlib.Path) -> ModelConfig:
    if not config_path.exists():
        raise HFImportError(f"{config_path} does not exist; point --hf_dir at an HF model directory.")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise HFImportError(f"{config_path} is not valid JSON: {e}") from e
    return config_from_hf(hf_config, where=str(config_path))


def _check_tensor_names(hf_dir, config_path, specs: list[_Tensor], files: dict, tied_head: bool) -> None:
    """Every tensor the config implies is present, and nothing else is (rotary caches aside)."""
    expected = {s.hf_name for s in specs}
    unknown = sorted(
        n
        for n in files
        if n not in expected
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (tied_head and n == "lm_head.weight")
    )
    if unknown:
        shown = ", ".join(f"{n} ({files[n].name})" for n in unknown[:5]) + (
            " ..." if len(unknown) > 5 else ""
        )
        raise HFImportError(
            f"{hf_dir}: {len(unknown)} tensor(s) that a Llama with {config_path.name}'s settings does not have: "
            f"{shown}. The checkpoint is not a plain LlamaForCausalLM, or config.json does not match it."
        )
    missing = [s for s in specs if s.hf_name not in files]
    if missing:
        # With no index, every tensor would be in the single file; name it so the user knows where we looked.
        where = hf_dir / (INDEX_FILE if (hf_dir / INDEX_FILE).exists() else SINGLE_FILE)
        names = ", ".join(s.hf_name for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise HFImportError(
            f"{where}: missing weight(s) {names} ({len(missing)} in all) that {config_path} implies; "
            "the checkpoint is incomplete or config.json does not describe it."
        )


def _check_headers(by_file: dict[pathlib.Path, list[_Tensor]], config_path) -> set[str]:
    """Shapes and dtypes from the safetensors headers (no tensor read); returns the stored dtypes."""
    stored_dtypes = set()
    for path, file_specs in by_file.items():
        with _open_weights(path) as f:
            present = set(f.keys())
            for s in file_specs:
                if s.hf_name not in present:
                    raise HFImportError(
                        f"{path}: weight {s.hf_name} is listed in {INDEX_FILE} but not in the file."
                    )
                info = f.get_slice(s.hf_name)
                shape = tuple(info.get_shape())
                if shape != s.hf_shape:
                    raise HFImportError(
                        f"{path}: weight {s.hf_name} has shape {shape}, but {config_path} implies {s.hf_shape}; "
                        "config.json does not match the weights."
                    )
                if info.get_dtype() not in _FLOAT_DTYPES:
                    raise HFImportError(
                        f"{path}: weight {s.hf_name} has dtype {info.get_dtype()}; only unquantized float weights "
                        f"({sorted(_FLOAT_DTYPES)}) import."
                    )
                stored_dtypes.add(_FLOAT_DTYPES[info.get_dtype()])
    return stored_dtypes


def _check_tied_head(files: dict) -> None:
    """Some tied checkpoints store the head anyway; accept it only if it really is the embedding."""
    with _open_weights(files["lm_head.weight"]) as f:
        head = f.get_tensor("lm_head.weight")
    with _open_weights(files["model.embed_tokens.weight"]) as f:
        same = np.array_equal(head, f.get_tensor("model.embed_tokens.weight"))
    if not same:
        raise HFImportError(
            f"{files['lm_head.weight']}: tie_word_embeddings is true but lm_head.weight differs from "
            "model.embed_tokens.weight; set tie_word_embeddings to false in config.json to keep both."
        )


# ---------------------------------------------------------------------- export
@contextlib.contextmanager
def _atomic_dir(out_dir, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a fresh temp dir beside `out_dir`; on success it replaces `out_dir`, on error it is deleted.

    The temp dir is a sibling so the final rename stays on one filesystem (atomic, no copy).
    """
    out_dir = pathlib.Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise HFExportError(f"{out_dir} exists and is not a directory; choose another output path.")
        if any(out_dir.iterdir()) and not overwrite:
            raise HFExportError(
                f"{out_dir} exists and is not empty; choose a new directory or pass overwrite=True."
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if out_dir.exists():
            # Move the old directory aside first, so a failure here still leaves one complete copy.
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "d")
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normal_permissions(root: pathlib.Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would (the umask applied).

    mkdtemp makes `root` 0700 and safetensors writes its files 0600, so without this a converted
    checkpoint would be readable by its owner alone. The mode of a probe directory is the umask (and
    any default ACL) applied to 0777, read without os.umask's process-wide set-and-restore.
    """
    probe = root / ".mode-probe"
    probe.mkdir()
    dir_mode = stat.S_IMODE(probe.stat().st_mode)
    probe.rmdir()
    for d, _, files in os.walk(root):
        os.chmod(d, dir_mode)
        for name in files:
            os.chmod(os.path.join(d, name), dir_mode & 0o666)  # no file here is executable


def _write_hf_files(
    directory: pathlib.Path, config: ModelConfig, params, dtype: str, max_shard_bytes: int, extra_config=None
) -> None:
    """Write config.json and the safetensors shard(s) (+ index json when sharded) into `directory`."""
    target = np.dtype(jnp.dtype(dtype))
    hf_config = config_to_hf(config, dtype=str(jnp.dtype(dtype)), extra=extra_config)
    specs = _tensor_specs(config)
    params = model.unstack_layers(params)
    for s in specs:
        try:
            leaf = _get(params, s.path)
        except (KeyError, TypeError) as e:
            raise HFExportError(
                f"params have no {'/'.join(s.path)}, which a model with this config needs; "
                "pass the params that belong to this config."
            ) from e
        if tuple(leaf.shape) != s.shape:
            raise HFExportError(
                f"param {'/'.join(s.path)} has shape {tuple(leaf.shape)}, the config implies {s.shape}."
            )

    # Group tensors into shards by byte size (computed from shapes, so nothing is materialised early).
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for s in specs:
        nbytes = math.prod(s.hf_shape) * target.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for fname, shard in zip(names, shards):
        tensors = {
            s.hf_name: s.to_hf(np.asarray(jax.device_get(_get(params, s.path))).astype(target)) for s in shard
        }
        save_file(tensors, directory / fname, metadata={"format": "pt"})  # transformers requires "pt"
        del tensors
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(math.prod(s.hf_shape) * target.itemsize for s in specs)},
            "weight_map": {s.hf_name: fname for fname, shard in zip(names, shards) for s in shard},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))


def save_hf_llama(
    config: ModelConfig,
    params,
    out_dir,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: Mapping[str, Any] | None = None,
) -> None:
    """Write `params` as an HF LlamaForCausalLM checkpoint dir (config.json + safetensors).

    Either param layout (scanned or not) is accepted. Weights are cast to `dtype`. Checkpoints over
    `max_shard_bytes` are split into `model-0000i-of-0000n.safetensors` with an index json, as
    transformers does. `extra_config` entries (e.g. token ids) are merged into config.json.
    Refuses a non-empty `out_dir` unless `overwrite`; nothing is visible at `out_dir` until all is written.
    """
    with _atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_hf_files(tmp, config, params, dtype, max_shard_bytes, extra_config)


# ---------------------------------------------------------------------- workdirs
def _copy_tokenizer_files(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def import_to_workdir(hf_dir, workdir, *, scan_layers: bool = False, dtype: str | None = None) -> ModelConfig:
    """Create a llama_jax workdir from an HF checkpoint: config.json, params at step 0, tokenizer files.

    The workdir's config.json is minimal: {"model": ModelConfig dict, "source": {hf_dir, token ids}};
    training merges its own full config over it. Refuses an existing non-empty workdir.
    """
    hf_dir = pathlib.Path(hf_dir).absolute()
    workdir = pathlib.Path(workdir).absolute()
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise HFImportError(f"workdir {workdir} exists and is not empty; choose a new --workdir.")
    cfg, params = load_hf_llama(hf_dir, scan_layers=scan_layers, dtype=dtype)
    overflow = "weights past 65504 overflow float16: import with --dtype=bfloat16 or float32."
    checkpoint.check_finite(params, where=str(hf_dir), error=HFImportError,
                            advice=overflow if dtype == "float16" else "Import an intact checkpoint.")
    hf_config = json.loads((hf_dir / CONFIG_FILE).read_text())
    source = {"hf_dir": str(hf_dir), **{k: hf_config[k] for k in TOKEN_ID_KEYS if k in hf_config}}
    with _atomic_dir(workdir) as tmp:
        checkpoint.write_config(tmp, {"model": cfg.to_dict(), "source": source})
        checkpoint.save_params(tmp, params, step=0)
        _copy_tokenizer_files(hf_dir, pathlib.Path(checkpoint.tokenizer_dir(tmp)))
    return cfg


def export_from_workdir(workdir, hf_dir, *, dtype: str | None = None, step: int | None = None) -> ModelConfig:
    """Write a workdir's params (latest step, or `step`) as an HF checkpoint dir, with its tokenizer files.

    dtype: the saved weights' dtype; None keeps the workdir's `param_dtype`. Refuses a non-empty `hf_dir`.
    """
    workdir = pathlib.Path(workdir).absolute()
    hf_dir = pathlib.Path(hf_dir).absolute()
    if hf_dir.exists() and (not hf_dir.is_dir() or any(hf_dir.iterdir())):
        raise HFExportError(f"{hf_dir} exists and is not empty; choose a new --hf_dir.")
    cfg = checkpoint.read_model_config(workdir)
    source = checkpoint.read_config(workdir).get("source", {})
    extra = {k: source[k] for k in TOKEN_ID_KEYS if k in source}
    config_to_hf(cfg)  # fail on an unexportable architecture before reading any weights
    # A LoRA run's adapters are merged into its base: the export is an ordinary checkpoint.
    params = restore_model_params(workdir, checkpoint.read_config(workdir), model.param_shapes(cfg), step=step)
    step = checkpoint.latest_step(workdir) if step is None else step
    steps = checkpoint.all_steps(workdir)
    checkpoint.check_finite(params, where=f"{workdir} step {step}", error=HFExportError,
                            advice=f"Export an earlier checkpoint with --step=N (the steps are {steps}).")
    with _atomic_dir(hf_dir) as tmp:
        _write_hf_files(tmp, cfg, params, dtype or cfg.param_dtype, DEFAULT_MAX_SHARD_BYTES, extra)
        _copy_tokenizer_files(pathlib.Path(checkpoint.tokenizer_dir(workdir)), tmp)
    return cfg
