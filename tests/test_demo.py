"""The quickstart demo runs end to end, and its image patching matches Qwen's processor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "cpt_jax.demo", "--preset", "tiny", "--new-tokens", "4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "cache check: OK" in output, output


@pytest.mark.parametrize("size", [(112, 84), (56, 84), (28, 56)])
def test_image_patches_match_the_qwen_image_processor(size):
    transformers = pytest.importorskip("transformers")
    from cpt_jax.demo import _image_patches, _synthetic_image

    image = _synthetic_image(*size, seed=1)
    patches, grid = _image_patches(image)
    processor = transformers.Qwen2VLImageProcessor()
    expected = processor(images=[image], do_resize=False, return_tensors="np")
    assert np.asarray(expected["image_grid_thw"]).tolist() == [list(grid)]
    np.testing.assert_allclose(patches, np.asarray(expected["pixel_values"]), atol=1e-6)
