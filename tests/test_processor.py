"""The image processor against transformers 5.24's Qwen2VLImageProcessorPil, and decode errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from cpt_jax.data.processor import (
    MAX_PIXELS,
    MIN_PIXELS,
    ImageError,
    decode_image,
    preprocess_image,
    smart_resize,
)

# (min_pixels, max_pixels): tiny (fast tests), a middle budget, and the paper's.
SETTINGS = [(3136, 12544), (12544, 50176), (MIN_PIXELS, MAX_PIXELS)]


def _sizes(seed: int = 0) -> list[tuple[int, int, tuple[int, int]]]:
    """(height, width, setting) cases: random, extreme aspect, below min and above max."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(56):
        lo, hi = setting = SETTINGS[i % 3] if i % 7 else SETTINGS[2]
        kind = i % 4
        if kind == 0:  # anywhere around the budget
            h, w = rng.integers(8, int(2.5 * hi**0.5), size=2)
        elif kind == 1:  # extreme aspect ratio, up to ~1:150, either orientation
            short = int(rng.integers(3, 40))
            h, w = short, int(short * rng.uniform(20, 150))
            h, w = (h, w) if rng.random() < 0.5 else (w, h)
        elif kind == 2:  # below min_pixels: upscaled
            area = rng.uniform(0.05, 0.9) * lo
            aspect = rng.uniform(0.3, 3.0)
            h, w = max(1, int((area * aspect) ** 0.5)), max(1, int((area / aspect) ** 0.5))
        else:  # above max_pixels: downscaled
            area = rng.uniform(1.2, 2.5) * hi
            aspect = rng.uniform(0.3, 3.0)
            h, w = int((area * aspect) ** 0.5), int((area / aspect) ** 0.5)
        cases.append((int(h), int(w), setting))
    # Rounding edges: half-way sides (round half to even), sides below factor / 2, exact fits.
    cases += [(42, 70, SETTINGS[0]), (14, 98, SETTINGS[0]), (13, 200, SETTINGS[0]),
              (1, 1, SETTINGS[0]), (56, 112, SETTINGS[0]), (7, 1050, SETTINGS[2])]
    return cases


def _reference(image: Image.Image, setting: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    processor = Qwen2VLImageProcessorPil(min_pixels=setting[0], max_pixels=setting[1])
    out = processor(images=[image], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


@pytest.mark.parametrize("seed", [0, 1])
def test_preprocess_matches_transformers(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for height, width, setting in _sizes(seed):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected, grid = _reference(image, setting)
        pixels, ours = preprocess_image(image, min_pixels=setting[0], max_pixels=setting[1])
        where = f"{height}x{width} with {setting}"
        assert ours == grid, where
        assert pixels.dtype == np.float32 and pixels.shape == (grid[1] * grid[2], 1176), where
        assert np.abs(pixels - expected).max() <= 1e-5, where


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "P-transparency", "CMYK"])
def test_preprocess_modes_match_transformers(mode: str) -> None:
    """RGB conversion as transformers does it: transparency composited onto white."""
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 80, 4), dtype=np.uint8), "RGBA")
    if mode == "P-transparency":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 3
    else:
        image = rgba.convert(mode)
    expected, grid = _reference(image, SETTINGS[0])
    pixels, ours = preprocess_image(image, min_pixels=SETTINGS[0][0], max_pixels=SETTINGS[0][1])
    assert ours == grid
    assert np.abs(pixels - expected).max() <= 1e-5


def test_preprocess_bytes_and_arrays() -> None:
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    png = io.BytesIO()
    image.save(png, format="PNG")
    kwargs = dict(min_pixels=SETTINGS[0][0], max_pixels=SETTINGS[0][1])
    expected, grid = preprocess_image(image, **kwargs)
    for other in (png.getvalue(), array):
        pixels, ours = preprocess_image(other, **kwargs)
        assert ours == grid and np.array_equal(pixels, expected)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(array.astype(np.float32), **kwargs)


def test_patch_order() -> None:
    """Row k is merge block k // 4, sub-patch k % 4 (row-major), flattened as (C, T, 14, 14)."""
    rng = np.random.default_rng(5)
    array = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)  # exact fit: no resampling
    pixels, grid = preprocess_image(array, min_pixels=56 * 84, max_pixels=56 * 84)
    assert grid == (1, 4, 6)
    normed = (array / 255.0 - [0.48145466, 0.4578275, 0.40821073]) / [
        0.26862954, 0.26130258, 0.27577711]
    row = 4 * (1 * 3 + 2) + 2 * 1 + 0  # block (1, 2), sub-patch (1, 0): patch (3, 4)
    patch = pixels[row].reshape(3, 2, 14, 14)
    np.testing.assert_allclose(patch[:, 0], normed[42:56, 56:70].transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(patch[:, 0], patch[:, 1])


def test_smart_resize_matches_transformers() -> None:
    rng = np.random.default_rng(11)
    sides = np.concatenate([np.arange(1, 120), rng.integers(1, 4000, 400)])
    for min_pixels, max_pixels in [*SETTINGS, (56 * 56, 28 * 28 * 1280)]:
        for height, width in zip(sides, rng.permutation(sides), strict=True):
            height, width = int(height), int(width)
            if max(height, width) / min(height, width) > 200:
                continue
            expected = hf_smart_resize(height, width, 28, min_pixels, max_pixels)
            assert smart_resize(
                height, width, min_pixels=min_pixels, max_pixels=max_pixels
            ) == expected, (height, width, min_pixels, max_pixels)


def test_smart_resize_quirks() -> None:
    """Round half to even, tiny sides upscaled (no error), the budget overshot, ratio > 200."""
    assert smart_resize(42, 70, min_pixels=28 * 28, max_pixels=10**6) == (56, 56)
    assert smart_resize(10, 10, min_pixels=3136, max_pixels=12544) == (56, 56)
    # 1:150 upscaled past max_pixels (28 * 700 = 19600 > 12544), as in transformers.
    assert smart_resize(10, 1500, min_pixels=3136, max_pixels=12544) == (28, 700)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        smart_resize(10, 2001, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image() -> None:
    image = decode_image(_png(28, 300), source="ok row")
    assert image.size == (28, 300)
    with pytest.raises(ImageError, match="bad row 3: cannot decode"):
        decode_image(b"definitely not an image", source="bad row 3")
    png = _png(300, 300)
    with pytest.raises(ImageError, match="cut row: cannot decode"):
        decode_image(png[: len(png) // 2], source="cut row")
    with pytest.raises(ImageError, match=r"small row: image 20x300 .*below 28 px"):
        decode_image(_png(20, 300), source="small row")
    assert issubclass(ImageError, ValueError)
