"""Shared fixtures: tiny random transformers models and this port loaded from their checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from qwen_reference import VARIANTS, hf_model  # noqa: E402

from cpt_jax.models.qwen2_5_vl import from_pretrained  # noqa: E402


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v.name)
def pair(request, tmp_path_factory):
    """(variant, transformers model, our model loaded from the transformers checkpoint)."""
    variant = request.param
    reference = hf_model(variant)
    path = tmp_path_factory.mktemp(variant.name)
    reference.save_pretrained(path)
    return variant, reference, from_pretrained(path)


@pytest.fixture(scope="module")
def scanned_and_unrolled(tmp_path_factory):
    """One checkpoint (three layers, four query heads per KV head) loaded twice: with scanned
    layers and with unrolled ones (whose KV cache is one array per layer)."""
    variant = max(VARIANTS, key=lambda v: v.layers)
    path = tmp_path_factory.mktemp(f"{variant.name}-unrolled")
    hf_model(variant).save_pretrained(path)
    return from_pretrained(path), from_pretrained(path, scan_layers=False)
