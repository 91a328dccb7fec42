"""Qwen2.5-VL configuration: typed dataclasses, presets, and Hugging Face `config.json` in and out.

Hugging Face checkpoints come in two layouts: the original flat one (text fields at the top
level, `rope_scaling` with `mrope_section`) and transformers 5's nested one (`text_config`,
`rope_parameters`). Both are read; the flat one is written because every transformers version
loads it. Unknown fields are errors, so a typo or an unsupported feature never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).resolve().parents[3] / "configs" / "model"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one flattened patch row: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_patches(self) -> int:
        """Patches in a full attention window (edge windows hold fewer)."""
        return (self.window_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        text, vision = self.text, self.vision
        _require(text.hidden_size % text.num_attention_heads == 0,
                 "text.hidden_size must be divisible by text.num_attention_heads")
        _require(text.num_attention_heads % text.num_key_value_heads == 0,
                 "text.num_attention_heads must be divisible by text.num_key_value_heads")
        _require(2 * sum(text.mrope_section) == text.head_dim,
                 f"text.mrope_section {list(text.mrope_section)} must sum to head_dim/2 = "
                 f"{text.head_dim // 2}")
        _require(vision.hidden_size % vision.num_heads == 0,
                 "vision.hidden_size must be divisible by vision.num_heads")
        _require(vision.head_dim % 4 == 0, "vision head_dim must be a multiple of 4 (2-D rotary)")
        _require(vision.window_size % (vision.patch_size * vision.spatial_merge_size) == 0,
                 "vision.window_size must be a multiple of patch_size * spatial_merge_size")
        _require(all(0 <= i < vision.depth for i in vision.fullatt_block_indexes),
                 f"vision.fullatt_block_indexes {list(vision.fullatt_block_indexes)} must lie in "
                 f"[0, {vision.depth})")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id", "bos_token_id", "eos_token_id"):
            _require(0 <= getattr(self, name) < text.vocab_size,
                     f"{name}={getattr(self, name)} is outside the vocabulary ({text.vocab_size})")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Qwen2_5_VLConfig:
        """Builds a config from this project's own form: `{vision: {...}, text: {...}, ...}`."""
        data = dict(data)
        vision = _build(VisionConfig, data.pop("vision", {}), f"{source}: vision")
        text = _build(TextConfig, data.pop("text", {}), f"{source}: text")
        return _build(cls, data, source, vision=vision, text=text)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> Qwen2_5_VLConfig:
        """Reads a Hugging Face Qwen2.5-VL `config.json` in the flat or the nested layout."""
        hf = dict(hf)
        model_type = hf.pop("model_type", "qwen2_5_vl")
        _require(model_type == "qwen2_5_vl",
                 f"{source}: model_type is {model_type!r}, expected 'qwen2_5_vl'")
        text_src = dict(hf.pop("text_config", None) or {})
        text_src.pop("model_type", None)
        # transformers 5 keeps the special token ids in text_config only.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in text_src and key not in hf:
                hf[key] = text_src.pop(key)
        # In the flat layout the text fields live at the top level.
        for key in list(hf):
            if key in _HF_TEXT_KEYS and key not in _HF_TOP_KEYS:
                text_src.setdefault(key, hf.pop(key))
        vision = _vision_from_hf(dict(hf.pop("vision_config", None) or {}), source)
        text = _text_from_hf(text_src, source)
        top = {k: hf.pop(k) for k in list(hf) if k in _HF_TOP_KEYS}
        for key in _HF_IGNORED_KEYS:
            hf.pop(key, None)
        _reject_unknown(hf, source)
        # transformers 5 keeps tie_word_embeddings inside text_config as well.
        tie_text = text.pop("tie_word_embeddings", False)
        tie = bool(top.pop("tie_word_embeddings", False) or tie_text)
        top.pop("vision_token_id", None)
        return cls(vision=VisionConfig(**vision), text=TextConfig(**text), tie_word_embeddings=tie,
                   **top)

    def to_hf_dict(self) -> dict[str, Any]:
        """The original flat layout, which transformers 4.x and 5.x both load."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "max_position_embeddings": t.max_position_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            **({"pad_token_id": self.pad_token_id} if self.pad_token_id is not None else {}),
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "out_hidden_size": v.out_hidden_size,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
                "hidden_act": "silu",
            },
        }


def load_config(path: str | Path) -> Qwen2_5_VLConfig:
    """Reads a Hugging Face `config.json` (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    with open(path) as f:
        return Qwen2_5_VLConfig.from_hf_dict(json.load(f), source=str(path))


def preset(name: str) -> Qwen2_5_VLConfig:
    """A named preset from `configs/model/<name>.yaml` (tiny, small, qwen2_5_vl_3b, ...)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
    with open(path) as f:
        return Qwen2_5_VLConfig.from_dict(yaml.safe_load(f), source=str(path))


# Fields that the flat layout keeps at the top level and the nested one in text_config.
_HF_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "hidden_act", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types", "attention_dropout",
    "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "dtype", "torch_dtype",
}
_HF_TOP_KEYS = {
    "tie_word_embeddings", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
}
# Bookkeeping fields that do not change the computation.
_HF_IGNORED_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "attention_dropout", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "task_specific_params", "bad_words_ids",
}


def _text_from_hf(src: dict[str, Any], source: str) -> dict[str, Any]:
    src = {k: v for k, v in src.items() if k not in _HF_IGNORED_KEYS}
    _require(src.pop("hidden_act", "silu") == "silu", f"{source}: hidden_act must be 'silu'")
    _require(not src.pop("use_sliding_window", False),
             f"{source}: use_sliding_window=true is not supported")
    for key in ("sliding_window", "max_window_layers", "attention_dropout",
                "initializer_range", "use_cache", "dtype", "torch_dtype"):
        src.pop(key, None)
    layer_types = src.pop("layer_types", None)
    _require(layer_types is None or set(layer_types) <= {"full_attention"},
             f"{source}: layer_types other than full_attention are not supported")
    rope = dict(src.pop("rope_parameters", None) or src.pop("rope_scaling", None) or {})
    src.pop("rope_scaling", None)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    _require(rope_type in ("default", "mrope"),
             f"{source}: rope type {rope_type!r} is not supported (only mrope)")
    if "rope_theta" in rope:
        src.setdefault("rope_theta", rope.pop("rope_theta"))
    if "mrope_section" in rope:
        src["mrope_section"] = tuple(rope.pop("mrope_section"))
    rope.pop("mrope_interleaved", None)
    _reject_unknown(rope, f"{source}: rope_scaling")
    out: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(TextConfig)}
    for key in list(src):
        if key in fields:
            out[key] = src.pop(key)
    # token ids and tying may be duplicated into text_config; they belong to the top level
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        src.pop(key, None)
    if src.pop("tie_word_embeddings", False):
        out["tie_word_embeddings"] = True
    _reject_unknown(src, f"{source}: text_config")
    return out


def _vision_from_hf(src: dict[str, Any], source: str) -> dict[str, Any]:
    src = {k: v for k, v in src.items() if k not in _HF_IGNORED_KEYS}
    _require(src.pop("hidden_act", "silu") == "silu", f"{source}: vision hidden_act must be 'silu'")
    src.pop("model_type", None)
    for key in ("initializer_range", "dtype", "torch_dtype", "spatial_patch_size"):
        src.pop(key, None)
    if "in_chans" in src:
        src.setdefault("in_channels", src.pop("in_chans"))
        src.pop("in_chans", None)
    rope = dict(src.pop("rope_parameters", None) or {})
    if "rope_theta" in rope:
        src["rope_theta"] = rope.pop("rope_theta")
    rope.pop("rope_type", None)
    _reject_unknown(rope, f"{source}: vision_config.rope_parameters")
    if "fullatt_block_indexes" in src:
        src["fullatt_block_indexes"] = tuple(src["fullatt_block_indexes"])
    fields = {f.name for f in dataclasses.fields(VisionConfig)}
    out = {k: src.pop(k) for k in list(src) if k in fields}
    _reject_unknown(src, f"{source}: vision_config")
    return out


def _build(cls: type, data: Any, source: str, **extra: Any) -> Any:
    _require(isinstance(data, dict), f"{source}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown({k: v for k, v in data.items() if k not in fields}, source)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs, **extra)


def _reject_unknown(leftover: dict[str, Any], source: str) -> None:
    if leftover:
        raise ValueError(f"{source}: unknown field(s) {sorted(leftover)}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
