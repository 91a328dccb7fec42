"""Grain pipelines over the built synthetic benchmark: shapes, masks, order, state, sharding,
and a batch that the tiny model consumes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from cpt_jax.data import build
from cpt_jax.data.pipeline import (
    EncodeOptions,
    eval_dataset,
    merge_shares,
    rl_dataset,
    sft_dataset,
)
from cpt_jax.data.processor import decode_image, preprocess_image
from cpt_jax.data.sources import load_source
from cpt_jax.data.synthetic import SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS
from cpt_jax.data.tokenizer import build_tokenizer, preset_special_tokens
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset

TASK = "syn_count"
OPTIONS = EncodeOptions(length_buckets=(256, 320, 384), min_pixels=SYNTHETIC_MIN_PIXELS,
                        max_pixels=SYNTHETIC_MAX_PIXELS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    assert build.main(["--synthetic", "--train", "24", "--test", "10",
                       "--data-dir", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def config():
    return preset("tiny")


@pytest.fixture(scope="module")
def tokenizer(config, data_dir):
    corpus = [e["problem"] for e in load_source(TASK, "train", data_dir=data_dir)]
    return build_tokenizer(vocab_size=config.text.vocab_size,
                           special_token_ids=preset_special_tokens(config), corpus=corpus)


def _sft(data_dir, tokenizer, **kwargs):
    kwargs = {"batch_size": 4, "seed": 0, "options": OPTIONS, **kwargs}
    return sft_dataset(load_source(TASK, "train", data_dir=data_dir), task=TASK,
                       tokenizer=tokenizer, **kwargs)


def test_sft_batch_shapes_and_loss_mask(data_dir, tokenizer, config):
    batch = next(iter(_sft(data_dir, tokenizer)))
    ids, mask, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert ids.shape[0] == 4 and ids.shape[1] in OPTIONS.length_buckets
    assert ids.shape == mask.shape == loss.shape
    assert batch["pixel_values"].shape[0] in (64, 128, 256) and batch["valid"].all()
    for row in range(4):
        target = tokenizer.decode(ids[row][loss[row] == 1])
        assert target == f"{batch['answer'][row]}<|im_end|>"
        real = ids[row][mask[row] == 1]
        assert mask[row, :len(real)].all()  # right padding for SFT
    n_image_tokens = int((ids == config.image_token_id).sum())
    assert n_image_tokens * 4 == int(batch["image_grid_thw"].prod(-1).sum())
    assert batch["num_patches"] == int(batch["image_grid_thw"].prod(-1).sum())


def test_patches_are_the_processor_output_in_row_order(data_dir, tokenizer):
    source = load_source(TASK, "train", data_dir=data_dir)
    batch = next(iter(_sft(data_dir, tokenizer)))
    by_id = {e["instance_id"]: e for e in source}
    expected = [preprocess_image(decode_image(by_id[i]["images"][0], source="test"),
                                 min_pixels=OPTIONS.min_pixels, max_pixels=OPTIONS.max_pixels)[0]
                for i in batch["instance_id"]]
    expected = np.concatenate(expected)
    np.testing.assert_array_equal(batch["pixel_values"][:len(expected)], expected)
    assert not batch["pixel_values"][len(expected):].any()


def test_batches_feed_the_model(data_dir, tokenizer, config):
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    for batch in (next(iter(_sft(data_dir, tokenizer))),
                  next(iter(rl_dataset(load_source(TASK, "train", data_dir=data_dir), task=TASK,
                                       tokenizer=tokenizer, batch_size=4, seed=0,
                                       options=OPTIONS)))):
        n = int(batch["num_patches"])
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"][:n],
                       image_grid_thw=batch["image_grid_thw"])
        assert logits.shape == (*batch["input_ids"].shape, config.text.vocab_size)
        assert np.isfinite(np.asarray(logits)).all()


def test_epochs_cover_every_example_in_a_new_order(data_dir, tokenizer):
    batches = list(_sft(data_dir, tokenizer, num_epochs=2))
    ids = np.concatenate([b["instance_id"] for b in batches])
    assert len(ids) == 48
    first, second = ids[:24], ids[24:]
    assert sorted(first) == sorted(second) == list(range(24))
    assert not np.array_equal(first, second)


def test_same_seed_same_batches_other_seed_other_order(data_dir, tokenizer):
    def order(seed):
        return np.concatenate([b["instance_id"] for b in _sft(data_dir, tokenizer, seed=seed,
                                                               num_epochs=1)])
    assert np.array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))


def test_iterator_state_resumes_exactly(data_dir, tokenizer):
    iterator = iter(_sft(data_dir, tokenizer))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]  # crosses an epoch boundary
    resumed = iter(_sft(data_dir, tokenizer))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_processes_encode_disjoint_shares_that_merge_into_the_one_process_batches(
        data_dir, tokenizer):
    """Two processes each encode every other example of each global batch; their shares
    merged are the batches one process makes alone (the gather between them is a collective,
    run by tests/test_distributed.py)."""
    single = _sft(data_dir, tokenizer, num_epochs=1)
    shares = [list(_sft(data_dir, tokenizer, num_epochs=1, process_index=i,
                        process_count=2).shares) for i in range(2)]
    expected = list(single)
    assert len(shares[0]) == len(shares[1]) == len(expected) == 6
    for want, share0, share1 in zip(expected, *shares, strict=True):
        assert [e is None for e in share0] == [False, True, False, True]
        assert [e is None for e in share1] == [True, False, True, False]
        got = single.collate(merge_shares([share0, share1]))
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_rl_prompts_are_left_padded_and_end_with_the_assistant_turn(data_dir, tokenizer):
    batch = next(iter(rl_dataset(load_source(TASK, "train", data_dir=data_dir), task=TASK,
                                 tokenizer=tokenizer, batch_size=4, seed=0, options=OPTIONS)))
    assert "loss_mask" not in batch
    assert batch["attention_mask"][:, -1].all()
    for row in batch["input_ids"]:
        assert tokenizer.decode(row).endswith("<|im_start|>assistant\n")


def test_eval_sees_every_example_once_in_full_batches(data_dir, tokenizer):
    batches = list(eval_dataset(load_source(TASK, "test", data_dir=data_dir), task=TASK,
                                tokenizer=tokenizer, batch_size=4, options=OPTIONS))
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)
    valid = np.concatenate([b["valid"] for b in batches])
    ids = np.concatenate([b["instance_id"] for b in batches])
    assert valid.sum() == 10 and sorted(ids[valid]) == list(range(10))


def test_overlong_example_names_the_instance(data_dir, tokenizer):
    short = dataclasses.replace(OPTIONS, length_buckets=(16,))
    with pytest.raises(ValueError, match=r"instance \d+ has \d+ tokens.*length bucket 16"):
        next(iter(_sft(data_dir, tokenizer, options=short)))
