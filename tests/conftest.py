"""Shared fixtures: tiny random transformers models and this port loaded from their
checkpoints; and one persistent XLA compilation cache for the whole session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from qwen_reference import VARIANTS, hf_model  # noqa: E402

from cpt_jax.data import build  # noqa: E402
from cpt_jax.models.qwen2_5_vl import from_pretrained  # noqa: E402

_CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = pytest.StashKey[str]()  # the cache folder this process made (and removes)


def pytest_configure(config: pytest.Config) -> None:
    """The tests compile the same tiny programs many times over (every `cpt_jax.train` run in a
    subprocess compiles its evaluation, step and sampler programs afresh), so the session shares
    one on-disk XLA cache: made by the first process (the xdist controller), inherited through
    the environment by the workers and every subprocess they start, removed at the end. Every
    program is still compiled once per session from nothing; a cache set from outside is kept."""
    if _CACHE_VARIABLE not in os.environ:
        config.stash[_OWN_CACHE] = os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(
            prefix="cpt_jax_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE in config.stash:
        shutil.rmtree(config.stash[_OWN_CACHE], ignore_errors=True)


@pytest.fixture(scope="module")
def synthetic_benchmark(tmp_path_factory) -> Path:
    """The synthetic benchmark, 16 training and 8 test rows per task: the trainer's data."""
    path = tmp_path_factory.mktemp("tfds")
    assert build.main(["--synthetic", "--train", "16", "--test", "8", "--data-dir",
                       str(path)]) == 0
    return path


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
