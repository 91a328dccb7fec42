"""Offline rollout-based instance filtering: pass counts for every instance (the last batch's
filler rows excluded), the solvable / learnable selections, the saved counts, and the filtered
source."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from cpt_jax.data import build
from cpt_jax.data.pipeline import EncodeOptions
from cpt_jax.data.sources import load_source
from cpt_jax.data.synthetic import SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS
from cpt_jax.data.tokenizer import build_tokenizer, preset_special_tokens
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset
from cpt_jax.rl.rif import PassCounts, count_passes, select
from cpt_jax.rl.sampler import SamplingConfig

TASK = "syn_count"
CONFIG = preset("tiny")
OPTIONS = EncodeOptions(length_buckets=(384,), min_pixels=SYNTHETIC_MIN_PIXELS,
                        max_pixels=SYNTHETIC_MAX_PIXELS, min_patches=256)
N = 4


def _rigged(texts, answers):
    """answer % 3 == 0: all N answers correct; 1: none; 2: only the first."""
    kind = int(answers[0]) % 3
    correct = [kind == 0 or (kind == 2 and i == 0) for i in range(len(texts))]
    return [{"overall": float(c), "format": 0.0, "accuracy": float(c)} for c in correct]


def _expected(answer: str) -> int:
    return {0: N, 1: 0, 2: 1}[int(answer) % 3]


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    assert build.main(["--synthetic", "--train", "11", "--test", "2", "--data-dir",
                       str(path)]) == 0
    source = load_source(TASK, "train", data_dir=path)
    tokenizer = build_tokenizer(vocab_size=CONFIG.text.vocab_size,
                                special_token_ids=preset_special_tokens(CONFIG),
                                corpus=[e["problem"] for e in source])
    model = Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(0))
    counts = count_passes(model, nnx.split(model)[1:], source, task=TASK, tokenizer=tokenizer,
                          score_fn=_rigged, sampling=SamplingConfig(4, group_size=N),
                          batch_size=4, options=OPTIONS, key=jax.random.key(0),
                          stop_ids=[CONFIG.eos_token_id])
    return source, counts


def test_every_instance_is_counted_once(counted):
    source, counts = counted
    expected = {e["instance_id"]: _expected(e["answer"]) for e in source}
    assert len(source) == 11  # three batches of 4, the last with one filler row
    assert counts.counts == expected and counts.group_size == N


def test_solvable_and_learnable_selections(counted):
    source, counts = counted
    answers = {e["instance_id"]: int(e["answer"]) % 3 for e in source}
    assert counts.kept_ids("solvable") == sorted(i for i, k in answers.items() if k != 1)
    assert counts.kept_ids("learnable") == sorted(i for i, k in answers.items() if k == 2)
    summary = counts.summary()
    assert summary["kept_fraction/solvable"] == pytest.approx(
        sum(k != 1 for k in answers.values()) / 11)
    assert summary["all_correct_fraction"] == pytest.approx(
        sum(k == 0 for k in answers.values()) / 11)
    with pytest.raises(ValueError, match="unknown RIF mode"):
        counts.kept_ids("easy")


def test_counts_round_trip_and_select_the_source(counted, tmp_path):
    source, counts = counted
    counts.save(tmp_path / "pass_counts.json")
    loaded = PassCounts.load(tmp_path / "pass_counts.json")
    assert loaded == counts
    kept = select(source, counts.kept_ids("learnable"))
    assert [e["instance_id"] for e in kept] == counts.kept_ids("learnable")
    assert all(int(e["answer"]) % 3 == 2 for e in kept)
    with pytest.raises(ValueError, match="not in the source"):
        select(source, [10_000])
    (tmp_path / "bad.json").write_text('{"task": "x"}')
    with pytest.raises(ValueError, match="bad.json"):
        PassCounts.load(tmp_path / "bad.json")
