"""Tiny random transformers Qwen2.5-VL models and multimodal batches for the parity tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import transformers

IMAGE, VIDEO, VSTART, VEND, PAD = 250, 251, 252, 253, 0
VOCAB = 256
PATCH_DIM = 3 * 2 * 14 * 14
MERGE = 2


@dataclasses.dataclass(frozen=True)
class Variant:
    """A tiny configuration; the three used by the tests differ in every axis the issue names."""

    name: str
    tie: bool
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    window_size: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    fullatt: tuple[int, ...]
    tokens_per_second: int = 2


VARIANTS = (
    Variant("tied-2l-gqa2-win56", tie=True, layers=2, hidden=64, heads=4, kv_heads=2,
            mrope_section=(2, 3, 3), window_size=56, vision_depth=2, vision_hidden=32,
            vision_heads=2, fullatt=(1,)),
    Variant("untied-3l-gqa4-win112", tie=False, layers=3, hidden=96, heads=4, kv_heads=1,
            mrope_section=(4, 4, 4), window_size=112, vision_depth=3, vision_hidden=48,
            vision_heads=2, fullatt=(0, 2), tokens_per_second=4),
    Variant("untied-1l-mha-win84", tie=False, layers=1, hidden=64, heads=2, kv_heads=2,
            mrope_section=(4, 6, 6), window_size=84, vision_depth=4, vision_hidden=64,
            vision_heads=4, fullatt=(3,)),
)


def hf_config(v: Variant) -> transformers.Qwen2_5_VLConfig:
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=v.hidden, intermediate_size=2 * v.hidden + 8,
            num_hidden_layers=v.layers, num_attention_heads=v.heads,
            num_key_value_heads=v.kv_heads, rms_norm_eps=1e-6, tie_word_embeddings=v.tie,
            bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": list(v.mrope_section)},
        ),
        vision_config=dict(
            depth=v.vision_depth, hidden_size=v.vision_hidden,
            intermediate_size=2 * v.vision_hidden + 4, num_heads=v.vision_heads,
            out_hidden_size=v.hidden, window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt), tokens_per_second=v.tokens_per_second,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
        tie_word_embeddings=v.tie,
    )
    config._attn_implementation = "eager"
    return config


def hf_model(v: Variant, seed: int = 0) -> transformers.Qwen2_5_VLForConditionalGeneration:
    """A random fp32 model with weights large enough that a layout mistake shows in the logits."""
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(v)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name or "ln_q" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise * (1.5 / fan_in**0.5))
    return model


def save_hf(model: transformers.PreTrainedModel, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None

    def ours(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k != "input_ids" and v is not None}

    def torch(self) -> dict:
        return {k: torch.from_numpy(np.asarray(v)) for k, v in dataclasses.asdict(self).items()
                if v is not None}


def _vision_tokens(token: int, grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [VSTART] + [token] * (t * (h // MERGE) * (w // MERGE)) + [VEND]


def _text(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, 240, size=n).tolist()


def pad_left(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def _with_pixels(rng: np.random.Generator, rows: list[list[int]],
                 image_grids: list[tuple[int, int, int]],
                 video_grids: list[tuple[int, int, int]]) -> Batch:
    """The rows left-padded, with random patches for the images and videos they hold."""
    ids, mask = pad_left(rows)
    n_image = sum(t * h * w for t, h, w in image_grids)
    n_video = sum(t * h * w for t, h, w in video_grids)
    return Batch(ids, mask,
                 pixel_values=rng.standard_normal((n_image, PATCH_DIM)).astype(np.float32),
                 image_grid_thw=np.asarray(image_grids, np.int64),
                 pixel_values_videos=rng.standard_normal((n_video, PATCH_DIM)).astype(np.float32),
                 video_grid_thw=np.asarray(video_grids, np.int64))


def multimodal_batch(seed: int = 0) -> Batch:
    """Row 0: two images (windows split unevenly) between text, left-padded.
    Row 1: a two-frame video and an image. Row 2: text only, left-padded."""
    rng = np.random.default_rng(seed)
    image_grids = [(1, 10, 14), (1, 6, 4), (1, 8, 8)]
    video_grids = [(2, 4, 6)]
    rows = [
        _text(rng, 3) + _vision_tokens(IMAGE, image_grids[0]) + _text(rng, 4)
        + _vision_tokens(IMAGE, image_grids[1]) + _text(rng, 2),
        _text(rng, 2) + _vision_tokens(VIDEO, video_grids[0]) + _text(rng, 3)
        + _vision_tokens(IMAGE, image_grids[2]) + _text(rng, 30),
        _text(rng, 11),
    ]
    return _with_pixels(rng, rows, image_grids, video_grids)


def many_images_batch(seed: int = 2) -> Batch:
    """Six small images and a two-frame video over three rows: many frames, none over 64
    patches, so that attention bounded to a frame's neighbourhood differs from attention over
    all packed patches."""
    rng = np.random.default_rng(seed)
    image_grids = [(1, 8, 8), (1, 4, 6), (1, 6, 4), (1, 8, 8), (1, 2, 4), (1, 6, 10)]
    video_grids = [(2, 4, 6)]
    rows = [
        _text(rng, 2) + _vision_tokens(IMAGE, image_grids[0]) + _text(rng, 3)
        + _vision_tokens(IMAGE, image_grids[1]) + _vision_tokens(IMAGE, image_grids[2]),
        _text(rng, 4) + _vision_tokens(VIDEO, video_grids[0]) + _text(rng, 2)
        + _vision_tokens(IMAGE, image_grids[3]) + _text(rng, 5),
        _vision_tokens(IMAGE, image_grids[4]) + _text(rng, 6)
        + _vision_tokens(IMAGE, image_grids[5]) + _text(rng, 3),
    ]
    return _with_pixels(rng, rows, image_grids, video_grids)


def same_size_images_batch(window_size: int, seed: int = 3) -> Batch:
    """Three rows of one image each, all of one size, two windows a side: every window and
    every frame fills its own block of the packed patches (the vision tower's exact-block
    attention) when the bound on a frame is the image."""
    rng = np.random.default_rng(seed)
    side = 2 * window_size // 14
    grids = [(1, side, side)] * 3
    rows = [_text(rng, 2 + i) + _vision_tokens(IMAGE, grid) + _text(rng, 5 - i)
            for i, grid in enumerate(grids)]
    return dataclasses.replace(_with_pixels(rng, rows, grids, []), pixel_values_videos=None,
                               video_grid_thw=None)


def text_batch(seed: int = 1) -> Batch:
    rng = np.random.default_rng(seed)
    ids, mask = pad_left([_text(rng, 9), _text(rng, 5), _text(rng, 7)])
    return Batch(ids, mask)


def hf_positions(model: transformers.Qwen2_5_VLForConditionalGeneration,
                 batch: Batch) -> torch.Tensor:
    """transformers' own 3-D positions for the batch (its get_rope_index)."""
    ids = torch.from_numpy(batch.input_ids)
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == IMAGE] = 1
    types[ids == VIDEO] = 2

    def grid(g: np.ndarray | None) -> torch.Tensor | None:
        return None if g is None else torch.from_numpy(g)

    positions, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=grid(batch.image_grid_thw),
        video_grid_thw=grid(batch.video_grid_thw),
        attention_mask=torch.from_numpy(batch.attention_mask))
    return positions


def hf_logits(model: transformers.Qwen2_5_VLForConditionalGeneration, batch: Batch) -> np.ndarray:
    with torch.no_grad():
        out = model(**batch.torch(), position_ids=hf_positions(model, batch))
    return out.logits.float().numpy()
