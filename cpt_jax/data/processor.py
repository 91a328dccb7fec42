"""Qwen2.5-VL image preprocessing on the host: decode, smart_resize, normalise, patchify.

Equal to transformers 5.24's `Qwen2VLImageProcessorPil` (the PIL/NumPy backend) with
`min_pixels` / `max_pixels` set, so patches fed to this port match those a transformers or
vLLM pipeline would feed the reference model. `tests/test_processor.py` checks the parity.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# The paper's pixel budget per image (EasyR1 `min_pixels` / `max_pixels`).
MIN_PIXELS = 200_704  # 256 * 28 * 28
MAX_PIXELS = 1_003_520  # 1280 * 28 * 28
# The paper's data filter: images whose shorter side is below this are dropped.
MIN_SIDE = 28

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class ImageError(ValueError):
    """An image the data builders skip and count: undecodable, or too small for the filter."""


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen's target size: sides multiples of `factor`, area near [min_pixels, max_pixels].

    Same arithmetic as transformers 5.24, including its quirks: the first rounding is Python's
    round-half-to-even (42 px -> 56, 70 px -> 56), a side of at most factor/2 rounds to 0 and
    is then upscaled through the min_pixels branch (no error for tiny images), and the result may
    leave [min_pixels, max_pixels] for extreme aspect ratios. Aspect ratios above 200 are an
    error, as in transformers; non-positive sides are an error here (a ZeroDivisionError there).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got "
            f"{max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image(data: bytes, *, source: str) -> Image.Image:
    """Decodes encoded image bytes fully, applying the paper's shorter-side >= 28 px filter.

    Raises `ImageError` naming `source` (e.g. "scienceqa/train row 17") so that a data builder
    can skip the example and count why.
    """
    image = _open(data, source)
    if min(image.size) < MIN_SIDE:
        raise ImageError(
            f"{source}: image {image.size[0]}x{image.size[1]} has its shorter side below "
            f"{MIN_SIDE} px (the paper's data filter drops such images)"
        )
    return image


def preprocess_image(
    image: Image.Image | bytes | np.ndarray,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values [N, 3*T*P*P] float32, grid_thw (1, H/P, W/P)).

    Rows follow Qwen's order: each merge_size x merge_size block of patches is contiguous and
    every patch is flattened as (C, T, P, P), the frame repeated T times. Arrays must be
    uint8 (H, W) or (H, W, C); bytes are decoded without the size filter of `decode_image`.
    """
    rgb = _to_rgb(_as_pil(image))
    factor = patch_size * merge_size
    height, width = smart_resize(
        rgb.height, rgb.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    resized = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    # transformers rescales in float64 and casts to float32, then normalises in float32.
    x = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - CLIP_MEAN) / CLIP_STD  # [H, W, C]
    gh, gw, m, p = height // patch_size, width // patch_size, merge_size, patch_size
    x = x.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    # [h/m, w/m, m, m, C, P, P] -> repeat the frame along T after C: [..., C, T, P, P]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return x.reshape(gh * gw, 3 * temporal_patch_size * p * p), (1, gh, gw)


def _open(data: bytes, source: str) -> Image.Image:
    """Decodes all pixels now, so corrupt or truncated data fails here, not in a worker later."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"{source}: cannot decode image ({type(err).__name__}: {err})") from err
    return image


def _as_pil(image: Image.Image | bytes | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        return _open(bytes(image), "image bytes")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"image arrays must be uint8 (H, W) or (H, W, C), got {array.dtype} {array.shape}"
        )
    return Image.fromarray(array)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers converts it: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
