"""Hugging Face safetensors checkpoints in and out.

The table `checkpoint_keys` maps every Hugging Face key (in the original `visual.*` /
`model.*` / `lm_head.*` layout) to a parameter path of this port, the layer it fills in a
stacked (scanned) parameter, and how the tensor is laid out. transformers 5's layout
(`model.visual.*`, `model.language_model.*`) is mapped onto the original one on the way in.
Loading reads one tensor at a time into the final buffer of its parameter, so the host never
holds a second full copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import Qwen2_5_VLConfig, load_config
from .model import Qwen2_5_VL

# Files that travel with a checkpoint: tokenizer, chat template, processor, generation.
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
INDEX_FILE = "model.safetensors.index.json"

Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """Where one checkpoint tensor goes: parameter path, layer (for stacked params), layout.

    layout: `linear` (torch [out, in] -> kernel [in..., out...]), `vector` (bias / norm, reshaped
    to the parameter), `patch` (Conv3d [D, C, T, P, P] -> [C*T*P*P, D]), `embedding` (as is),
    `transpose` (lm_head [vocab, hidden] -> [hidden, vocab]).
    """

    path: Path_
    layer: int | None
    layout: str
    n_in: int = 1  # input axes of a linear kernel (2 for the [heads, head_dim] -> out maps)


def checkpoint_keys(config: Qwen2_5_VLConfig) -> dict[str, KeySpec]:
    """Every Hugging Face key of a checkpoint of this config, in the original layout."""
    keys: dict[str, KeySpec] = {}

    def add(hf: str, path: str, layout: str, layer: int | None = None, n_in: int = 1) -> None:
        keys[hf] = KeySpec(tuple(path.split(".")), layer, layout, n_in)

    def linear(hf: str, path: str, bias: bool, layer: int | None = None, n_in: int = 1) -> None:
        add(f"{hf}.weight", f"{path}.kernel", "linear", layer, n_in)
        if bias:
            add(f"{hf}.bias", f"{path}.bias", "vector", layer)

    add("visual.patch_embed.proj.weight", "visual.patch_embed.kernel", "patch")
    for i in range(config.vision.depth):
        hf, ours = f"visual.blocks.{i}", "visual.blocks"
        add(f"{hf}.norm1.weight", f"{ours}.norm1.scale", "vector", i)
        add(f"{hf}.norm2.weight", f"{ours}.norm2.scale", "vector", i)
        linear(f"{hf}.attn.qkv", f"{ours}.attn.qkv", True, i)
        linear(f"{hf}.attn.proj", f"{ours}.attn.proj", True, i, n_in=2)
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear(f"{hf}.mlp.{name}", f"{ours}.mlp.{name}", True, i)
    add("visual.merger.ln_q.weight", "visual.merger.ln_q.scale", "vector")
    linear("visual.merger.mlp.0", "visual.merger.fc1", True)
    linear("visual.merger.mlp.2", "visual.merger.fc2", True)

    add("model.embed_tokens.weight", "language_model.embed_tokens", "embedding")
    for i in range(config.text.num_hidden_layers):
        hf, ours = f"model.layers.{i}", "language_model.layers"
        add(f"{hf}.input_layernorm.weight", f"{ours}.input_layernorm.scale", "vector", i)
        add(f"{hf}.post_attention_layernorm.weight", f"{ours}.post_attention_layernorm.scale",
            "vector", i)
        for name in ("q_proj", "k_proj", "v_proj"):
            linear(f"{hf}.self_attn.{name}", f"{ours}.self_attn.{name}", True, i)
        linear(f"{hf}.self_attn.o_proj", f"{ours}.self_attn.o_proj", False, i, n_in=2)
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear(f"{hf}.mlp.{name}", f"{ours}.mlp.{name}", False, i)
    add("model.norm.weight", "language_model.norm.scale", "vector")
    if not config.tie_word_embeddings:
        add("lm_head.weight", "lm_head", "transpose")
    return keys


def canonical_key(key: str) -> str:
    """transformers 5 layout -> original layout (`model.visual.x` -> `visual.x`, ...)."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def from_pretrained(path: str | Path, *, dtype: jnp.dtype = jnp.float32,
                    param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
                    scan_layers: bool = True,
                    max_frame_patches: int | None = None) -> Qwen2_5_VL:
    """Builds the model from a Hugging Face folder (config.json + one or many safetensors);
    the keyword options are `Qwen2_5_VL`'s."""
    path = Path(path)
    config = load_config(path)
    model = nnx.eval_shape(lambda: Qwen2_5_VL(config, dtype=dtype, param_dtype=param_dtype,
                                              remat=remat, scan_layers=scan_layers,
                                              max_frame_patches=max_frame_patches,
                                              rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    params = {tuple(str(p) for p in var_path): var for var_path, var in flat}
    specs = checkpoint_keys(config)
    tensors = _checkpoint_index(path)

    found = {canonical_key(k): (k, f) for k, f in tensors.items()}
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # tied checkpoints may still carry a copy
    unexpected = sorted(found.keys() - specs.keys())
    if unexpected:
        raise ValueError(f"{path}: unexpected key(s) in the checkpoint: "
                         f"{_preview([found[k][0] for k in unexpected])}")
    missing = sorted(specs.keys() - found.keys())
    if missing:
        raise ValueError(f"{path}: key(s) missing from the checkpoint: {_preview(missing)}")

    by_param: dict[Path_, list[str]] = {}
    for key, spec in specs.items():
        by_param.setdefault(spec.path, []).append(key)
    handles: dict[Path, object] = {}
    try:
        for param_path, hf_keys in by_param.items():
            var = params[param_path]
            buffer = np.empty(var.shape, dtype=np.dtype(param_dtype))
            for key in hf_keys:
                spec = specs[key]
                original, file = found[key]
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="numpy")
                target = buffer if spec.layer is None else buffer[spec.layer]
                expected = hf_shape(spec, target.shape, config)
                stored = tuple(handles[file].get_slice(original).get_shape())
                if stored != expected:
                    raise ValueError(
                        f"{file.name}: {original} has shape {list(stored)} but this config "
                        f"needs {list(expected)} (is config.json the checkpoint's own?)")
                tensor = handles[file].get_tensor(original)
                target[...] = _to_param_layout(tensor, spec, target.shape)
            var.set_value(jnp.asarray(buffer))
            del buffer
    finally:
        handles.clear()
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.pretrained_path = str(path)
    return model


def save_pretrained(model: Qwen2_5_VL, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
                    assets_from: str | Path | None = None) -> None:
    """Writes a Hugging Face folder: config.json, safetensors shards (+ index), and the
    tokenizer / processor files of `assets_from` (default: the folder the model came from)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: Qwen2_5_VLConfig = model.config
    state = nnx.state(model, nnx.Param)
    params = {tuple(str(p) for p in var_path): var for var_path, var in nnx.to_flat_state(state)}
    dtype_name = {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(
        np.dtype(params[("language_model", "embed_tokens")].get_value().dtype), "float32")

    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    names: list[str] = []

    def flush() -> None:
        nonlocal shard_bytes
        if shards[-1]:
            name = f"model-{len(names) + 1:05d}.safetensors"
            save_file(shards[-1], str(path / name), metadata={"format": "pt"})
            names.append(name)
            shards[-1] = {}
            shard_bytes = 0

    weight_map: dict[str, int] = {}
    total = 0
    for key, spec in checkpoint_keys(config).items():
        value = params[spec.path].get_value()
        if spec.layer is not None:
            value = value[spec.layer]
        value = np.asarray(jax.device_get(value))
        tensor = _to_checkpoint_layout(value, spec, hf_shape(spec, value.shape, config))
        if shard_bytes and shard_bytes + tensor.nbytes > max_shard_bytes:
            flush()
        shards[-1][key] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
        weight_map[key] = len(names)
    flush()

    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        if stale.name not in names and stale.exists():
            stale.unlink()
    if len(names) == 1:
        (path / names[0]).rename(path / "model.safetensors")
    else:
        total_names = len(names)
        final = [f"model-{i + 1:05d}-of-{total_names:05d}.safetensors" for i in range(total_names)]
        for old, new in zip(names, final, strict=True):
            (path / old).rename(path / new)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: final[i] for k, i in weight_map.items()}}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))

    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = dtype_name
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    source = assets_from or getattr(model, "pretrained_path", None)
    if source is not None and Path(source).resolve() != path.resolve():
        for name in ASSET_FILES:
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, path / name)


def _checkpoint_index(path: Path) -> dict[str, Path]:
    """key -> file, from the index file when there is one, else from every safetensors file."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: path / file for key, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                if key in out:
                    raise ValueError(
                        f"{path}: key {key!r} is in both {out[key].name} and {file.name}")
                out[key] = file
    return out


def hf_shape(spec: KeySpec, shape: tuple[int, ...], config: Qwen2_5_VLConfig) -> tuple[int, ...]:
    """The checkpoint shape of a tensor that fills a parameter (slice) of `shape`."""
    if spec.layout == "linear":
        return (int(np.prod(shape[spec.n_in:])), int(np.prod(shape[:spec.n_in])))
    if spec.layout == "patch":
        v = config.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if spec.layout == "transpose":
        return shape[::-1]
    if spec.layout == "vector":
        return (int(np.prod(shape)),)
    return shape


def _to_param_layout(tensor: np.ndarray, spec: KeySpec, shape: tuple[int, ...]) -> np.ndarray:
    if spec.layout == "linear":
        return tensor.T.reshape(shape)
    if spec.layout == "patch":
        return tensor.reshape(tensor.shape[0], -1).T
    if spec.layout == "transpose":
        return tensor.T
    return tensor.reshape(shape)


def _to_checkpoint_layout(value: np.ndarray, spec: KeySpec,
                          expected: tuple[int, ...]) -> np.ndarray:
    if spec.layout in ("linear", "patch"):
        return np.ascontiguousarray(value.reshape(-1, expected[0]).T.reshape(expected))
    if spec.layout == "transpose":
        return np.ascontiguousarray(value.T)
    return np.ascontiguousarray(value.reshape(expected))


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")
