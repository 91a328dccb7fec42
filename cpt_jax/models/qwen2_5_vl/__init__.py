"""Qwen2.5-VL in Flax NNX: model, configuration, positions, and Hugging Face weights."""

from .config import Qwen2_5_VLConfig, TextConfig, VisionConfig, load_config, preset
from .model import Qwen2_5_VL
from .rope_index import get_rope_index
from .text import GroupCache, KVCache, PromptKV
from .vision import VisionInputs
from .weights import checkpoint_keys, from_pretrained, save_pretrained

__all__ = [
    "GroupCache", "KVCache", "PromptKV", "Qwen2_5_VL", "Qwen2_5_VLConfig", "TextConfig",
    "VisionConfig", "VisionInputs", "checkpoint_keys", "from_pretrained", "get_rope_index",
    "load_config", "preset", "save_pretrained",
]
