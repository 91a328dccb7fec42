"""SFT loss and step, and the optimiser: the loss against NumPy, gradient accumulation against
one big batch, one compilation for many batches, the schedule, clipping, bf16 moments, and the
loss falling on the synthetic benchmark."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpt_jax import sft
from cpt_jax.data import build
from cpt_jax.data.pipeline import EncodeOptions, collate, sft_dataset
from cpt_jax.data.sources import load_source
from cpt_jax.data.synthetic import SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS
from cpt_jax.data.tokenizer import build_tokenizer, preset_special_tokens
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset
from cpt_jax.optim import current_learning_rate, make_optimizer, make_schedule
from cpt_jax.sft import (
    TrainState,
    make_sft_step,
    make_sft_steps,
    sft_loss,
    stack_micro_batches,
)

CONFIG = preset("tiny")
OPTIONS = EncodeOptions(length_buckets=(32, 48), min_patches=64)


def _example(rng: np.random.Generator, n_response: int, grid: tuple[int, int, int] | None,
             prompt: int = 8) -> dict:
    """An encoded SFT example as the pipeline's `encode_sft` gives it: random text, an image's
    placeholder tokens when `grid` is given, then `n_response` tokens in the loss."""
    image, patches, grids = [], [], []
    if grid is not None:
        image = ([CONFIG.vision_start_token_id] + [CONFIG.image_token_id] * (math.prod(grid) // 4)
                 + [CONFIG.vision_end_token_id])
        patches = [rng.standard_normal((math.prod(grid), CONFIG.vision.patch_dim),
                                       dtype=np.float32)]
        grids = [grid]
    text = rng.integers(0, 490, prompt + n_response).tolist()
    ids = text[:2] + image + text[2:]
    return {"input_ids": np.asarray(ids, np.int32),
            "loss_mask": np.asarray([0] * (len(ids) - n_response) + [1] * n_response, np.int32),
            "patches": patches, "grids": grids, "instance_id": 0, "answer": ""}


def _batch(examples: list[dict], options: EncodeOptions = OPTIONS) -> dict[str, np.ndarray]:
    return collate(examples, options=options, pad_id=CONFIG.pad_token_id, left_pad=False)


def _model(seed: int = 0) -> Qwen2_5_VL:
    return Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(seed))


def _numpy_loss(logits: np.ndarray, batch: dict[str, np.ndarray]) -> tuple[float, float, int]:
    logits = logits[:, :-1].astype(np.float64)
    targets = batch["input_ids"][:, 1:]
    weights = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(bool)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == targets
    return nll[weights].mean(), correct[weights].mean(), int(weights.sum())


def test_loss_is_the_token_mean_over_response_tokens():
    rng = np.random.default_rng(0)
    batch = _batch([_example(rng, 2, (1, 4, 4)), _example(rng, 9, None),
                    _example(rng, 5, (1, 6, 4), prompt=20)])
    model = _model()
    inputs = jax.tree.map(lambda x: x[0], stack_micro_batches([batch], model))
    graphdef, params = nnx.split(model)

    @jax.jit  # one compiled program instead of many eager ones
    def logits_and_loss(params, inputs):
        model = nnx.merge(graphdef, params)
        logits, _ = model.forward(inputs["input_ids"], inputs["positions"],
                                  inputs["attention_mask"], inputs["vision"])
        return logits, sft_loss(model, inputs)

    logits, (loss, metrics) = logits_and_loss(params, inputs)
    expected_loss, expected_accuracy, expected_tokens = _numpy_loss(np.asarray(logits), batch)
    assert expected_tokens == 16
    assert float(metrics["tokens"]) == expected_tokens
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), expected_accuracy, atol=1e-6)


def test_the_loss_in_chunks_of_positions_equals_the_whole_sequence(monkeypatch):
    """The vocabulary projection taken 7 positions at a time (with padding at the end) gives
    the same loss, accuracy and gradients as all 48 positions at once."""
    rng = np.random.default_rng(3)
    batch = _batch([_example(rng, 5, (1, 4, 4), prompt=30), _example(rng, 9, None)])
    model = _model()
    inputs = jax.tree.map(lambda x: x[0], stack_micro_batches([batch], model))
    graphdef, params = nnx.split(model)

    def loss_and_grads():
        def loss(params):
            return sft_loss(nnx.merge(graphdef, params), inputs)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (whole, whole_metrics), whole_grads = loss_and_grads()
    monkeypatch.setattr(sft, "LOGIT_CHUNK", 7)
    assert inputs["input_ids"].shape[1] % 7
    (chunked, chunked_metrics), chunked_grads = loss_and_grads()
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    assert float(chunked_metrics["accuracy"]) == float(whole_metrics["accuracy"])
    for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads),
                         strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6 * (1 + np.abs(want).max()))


def test_loss_windows_cover_every_response_token():
    mask = np.zeros((4, 200), np.int32)
    mask[0, 40:45] = 1    # 5 tokens: predicted from positions 39..43
    mask[1, 190:200] = 1  # at the end: the window starts earlier to stay inside the row
    mask[2, 10:47] = 1   # the longest, 37 tokens: windows of 64
    windows = sft.loss_windows(mask)  # row 3 has no response
    assert windows.shape == (4, 64) and windows.dtype == np.int32
    assert np.all(np.diff(windows, axis=1) == 1) and windows.min() >= 0 and windows.max() < 200
    for row in range(3):
        needed = np.flatnonzero(mask[row]) - 1
        assert np.isin(needed, windows[row]).all(), row
    assert windows[0, 0] == 39 and windows[1, -1] == 199 and windows[3, 0] == 0
    assert sft.loss_windows(mask[:1]).shape == (1, sft.MIN_LOSS_WINDOW)
    assert sft.loss_windows(mask[:, :20]).shape == (4, 20)  # never wider than the row


def test_the_loss_over_response_windows_equals_every_position(monkeypatch):
    """Long prompts, short answers: the logits at the response windows alone (32 of 160
    positions) give the loss, accuracy and gradients of the logits at every position."""
    rng = np.random.default_rng(5)
    batch = _batch([_example(rng, 3, (1, 4, 4), prompt=120), _example(rng, 7, None, prompt=60),
                    _example(rng, 30, None, prompt=100)],
                   options=EncodeOptions(length_buckets=(160,), min_patches=16))
    model = _model()
    graphdef, params = nnx.split(model)

    def loss_and_grads():
        inputs = jax.tree.map(lambda x: x[0], stack_micro_batches([batch], model))

        def loss(params):
            return sft_loss(nnx.merge(graphdef, params), inputs)
        return inputs, jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    windowed, ((loss, metrics), grads) = loss_and_grads()
    assert windowed["loss_positions"].shape == (3, 32) and windowed["input_ids"].shape[1] == 160
    monkeypatch.setattr(sft, "MIN_LOSS_WINDOW", 1024)
    every, ((want, want_metrics), want_grads) = loss_and_grads()
    np.testing.assert_array_equal(every["loss_positions"][0], np.arange(160))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert float(metrics["tokens"]) == float(want_metrics["tokens"]) == 3 + 7 + 30
    assert float(metrics["accuracy"]) == float(want_metrics["accuracy"])
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-6 * (1 + np.abs(expected).max()))


def test_accumulated_micro_batches_equal_one_big_batch():
    """2 micro-batches of 2 rows == 1 batch of 4 rows: the same token-mean gradient.

    The micro-batches hold 3 and 23 response tokens, so a mean of micro-batch means would weigh
    a token of the first 7.7 times as much as one of the second. Plain SGD (lr 1) makes the
    update the gradient itself; Adam's first update is about lr * sign(gradient) and would hide
    a wrong scale. The second micro-batch is text-only among image batches (a blank image).
    """
    rng = np.random.default_rng(1)
    rows = [_example(rng, 1, (1, 4, 4)), _example(rng, 2, (1, 4, 6)),
            _example(rng, 9, None, prompt=20), _example(rng, 14, None)]
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    results = {}
    for micro, batches in ((1, [_batch(rows)]), (2, [_batch(rows[:2]), _batch(rows[2:])])):
        model = _model()
        state = TrainState.create(model, optimizer)
        step = make_sft_step(model, optimizer, micro_batches=micro)
        state, metrics = step(state, stack_micro_batches(batches, model))
        results[micro] = [np.asarray(p) for p in jax.tree.leaves(state.params)], metrics
    (params_one, metrics_one), (params_two, metrics_two) = results[1], results[2]
    assert float(metrics_one["tokens"]) == float(metrics_two["tokens"]) == 26
    np.testing.assert_allclose(float(metrics_two["loss"]), float(metrics_one["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics_two["grad_norm"]), float(metrics_one["grad_norm"]),
                               rtol=1e-6)
    for one, two in zip(params_one, params_two, strict=True):
        assert np.abs(two - one).max() <= 1e-6 * np.abs(one).max()  # relative to the tensor


def test_new_batches_of_the_same_buckets_reuse_the_compiled_step(monkeypatch):
    traces: list[int] = []
    token_sums = sft._token_sums

    def counted(model, batch):
        traces.append(1)  # runs once per trace, never per call
        return token_sums(model, batch)

    monkeypatch.setattr(sft, "_token_sums", counted)
    rng = np.random.default_rng(2)
    optimizer = make_optimizer(learning_rate=1e-3, total_steps=10)
    model = _model()
    state = TrainState.create(model, optimizer)
    step = make_sft_step(model, optimizer, micro_batches=2)
    losses = []
    for prompts in ((6, 30), (40, 4), (35, 12), (3, 38)):  # a 32- and a 48-token bucket each
        batches = [_batch([_example(rng, 3, None, p), _example(rng, 5, None)]) for p in prompts]
        state, metrics = step(state, stack_micro_batches(batches, model))
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    assert int(state.step) == 4 and len(set(losses)) == 4


def test_several_steps_per_call_equal_as_many_single_steps(monkeypatch):
    """3 AdamW updates (warm-up + cosine: each update has its own rate) of 2 micro-batches in
    one `make_sft_steps` call == 3 `make_sft_step` calls: the same parameters, optimiser
    state and per-step metrics. The calls' batches span two length buckets and a text-only
    micro-batch, which the call pads to one shape; a second call with new data reuses the
    program."""
    rng = np.random.default_rng(5)

    def micro_batches(prompt: int) -> list[dict]:
        return [_batch([_example(rng, 3, (1, 4, 4)), _example(rng, 5, None, prompt)]),
                _batch([_example(rng, 6, None), _example(rng, 2, (1, 4, 6))])]

    calls = [[micro_batches(p) for p in prompts] for prompts in ((6, 30, 12), (35, 4, 20))]
    optimizer = make_optimizer(learning_rate=1e-2, total_steps=8, warmup_ratio=0.25)
    single_model = _model()
    single = TrainState.create(single_model, optimizer)
    step = make_sft_step(single_model, optimizer, micro_batches=2)
    single_metrics = []
    for call in calls:
        for parts in call:
            single, metrics = step(single, stack_micro_batches(parts, single_model))
            single_metrics.append(metrics)

    traces: list[int] = []
    token_sums = sft._token_sums

    def counted(model, batch):
        traces.append(1)  # once per trace of an update, never per call
        return token_sums(model, batch)

    monkeypatch.setattr(sft, "_token_sums", counted)
    model = _model()
    state = TrainState.create(model, optimizer)
    steps = make_sft_steps(model, optimizer, micro_batches=2, steps=3)
    stacked_metrics = []
    for call in calls:
        inputs = stack_micro_batches([b for parts in call for b in parts], model, steps=3)
        assert inputs["input_ids"].shape[:2] == (3, 2)
        state, metrics = steps(state, inputs)
        stacked_metrics += [{k: v[i] for k, v in metrics.items()} for i in range(3)]
    assert len(traces) == 1
    assert int(state.step) == int(single.step) == 6

    for got, want in zip(stacked_metrics, single_metrics, strict=True):
        assert float(got["tokens"]) == float(want["tokens"])
        for key in ("loss", "accuracy", "grad_norm", "learning_rate"):
            np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
    rates = [float(m["learning_rate"]) for m in single_metrics]
    assert len(set(rates)) == 6  # the schedule moved at every update
    for got, want in zip(jax.tree.leaves((state.params, state.opt_state)),
                         jax.tree.leaves((single.params, single.opt_state)), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5 * (1 + np.abs(want).max()))
    with pytest.raises(ValueError, match="expected 3 steps"):
        steps(state, stack_micro_batches(calls[0][0], model))
    with pytest.raises(ValueError, match="do not split into 3 steps"):
        stack_micro_batches(calls[0][0], model, steps=3)


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    lr, total, ratio = 1e-5, 50, 0.1
    schedule = make_schedule(learning_rate=lr, total_steps=total, warmup_ratio=ratio)
    warmup = math.ceil(ratio * total)
    for step in range(total + 3):
        if step < warmup:
            expected = lr * step / warmup
        else:
            progress = min(1.0, (step - warmup) / (total - warmup))
            expected = lr * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-6 * lr), step
    constant = make_schedule(learning_rate=lr, total_steps=total, schedule="constant")
    assert [float(constant(s)) for s in (0, 7, 60)] == pytest.approx([lr] * 3)


def test_optimizer_clips_the_gradient_and_decays_weights_decoupled():
    params = {"w": jnp.full((4, 8), 0.5), "b": jnp.zeros(8)}
    optimizer = make_optimizer(learning_rate=0.1, total_steps=10, schedule="constant",
                               weight_decay=0.01, grad_clip=1.0)
    huge = {"w": jnp.full((4, 8), 10.0), "b": jnp.full(8, -10.0)}  # global norm ~ 63
    _, state = optimizer.update(huge, optimizer.init(params), params)
    adam = state.inner_state[1]
    # The first moment is (1 - b1) * the gradient Adam saw: clipped to global norm 1.
    assert float(optax.tree.norm(adam.mu)) == pytest.approx(0.1, rel=1e-5)
    assert float(current_learning_rate(state)) == pytest.approx(0.1)
    small = jax.tree.map(lambda x: x / 200, huge)  # norm ~ 0.3: unclipped
    _, state = optimizer.update(small, optimizer.init(params), params)
    assert float(optax.tree.norm(state.inner_state[1].mu)) == pytest.approx(
        0.1 * float(optax.tree.norm(small)), rel=1e-5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.01 * 0.5, rtol=1e-6)


def test_vision_lr_scale_moves_the_vision_tower_by_exactly_the_scaled_step():
    rng = np.random.default_rng(4)
    batch = _batch([_example(rng, 4, (1, 4, 4)), _example(rng, 3, (1, 4, 4), prompt=12)])
    deltas, structures = {}, {}
    for scale in (1.0, 0.1):
        optimizer = make_optimizer(learning_rate=1e-2, total_steps=10, schedule="constant",
                                   weight_decay=0.1, vision_lr_scale=scale)
        model = _model()
        before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
        state = TrainState.create(model, optimizer)
        step = make_sft_step(model, optimizer, micro_batches=1)
        state, metrics = step(state, stack_micro_batches([batch], model))
        assert float(metrics["learning_rate"]) == pytest.approx(1e-2)  # the schedule's, logged
        structures[scale] = jax.tree.structure(state.opt_state)
        deltas[scale] = jax.tree.map(lambda new, old: np.asarray(new) - old, state.params,
                                     before)
    assert structures[1.0] == jax.tree.structure(
        make_optimizer(learning_rate=1e-2, total_steps=10).init(state.params))
    for part, factor in (("visual", 0.1), ("language_model", 1.0)):
        reference, scaled = jax.tree.leaves(deltas[1.0][part]), jax.tree.leaves(deltas[0.1][part])
        assert len(reference) == len(scaled) > 0
        for r, x in zip(reference, scaled, strict=True):
            assert np.abs(r).max() > 1e-3  # every tensor moved (Adam's first step: ~lr)
            np.testing.assert_allclose(x, factor * r, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="vision_lr_scale"):
        make_optimizer(learning_rate=1e-3, total_steps=1, vision_lr_scale=-1.0)


def test_bf16_moments_stay_bf16_and_the_loss_falls():
    rng = np.random.default_rng(3)
    batch = _batch([_example(rng, 6, None), _example(rng, 4, None, prompt=14)])
    optimizer = make_optimizer(learning_rate=3e-3, total_steps=20, schedule="constant",
                               moments_dtype=jnp.bfloat16)
    model = _model()
    state = TrainState.create(model, optimizer)
    step = make_sft_step(model, optimizer, micro_batches=1)
    inputs = stack_micro_batches([batch], model)
    losses = []
    for _ in range(6):
        state, metrics = step(state, inputs)
        losses.append(float(metrics["loss"]))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert losses[-1] < 0.8 * losses[0], losses


def test_tiny_model_learns_a_synthetic_task(tmp_path):
    """30 steps of batch 8 (2 micro-batches of 4) on syn_texture (yes / no): the loss on the
    response tokens falls well below its start. Honest scope: at this size and length this is
    the answer format and the yes/no prior being learnt, not the textures being read."""
    assert build.main(["--synthetic", "--train", "64", "--test", "16",
                       "--data-dir", str(tmp_path)]) == 0
    task = "syn_texture"
    source = load_source(task, "train", data_dir=tmp_path)
    tokenizer = build_tokenizer(vocab_size=CONFIG.text.vocab_size,
                                special_token_ids=preset_special_tokens(CONFIG),
                                corpus=[e["problem"] for e in source])
    # One length bucket and a patch floor of 4 images x 64 patches: one compiled program.
    options = EncodeOptions(length_buckets=(384,), min_pixels=SYNTHETIC_MIN_PIXELS,
                            max_pixels=SYNTHETIC_MAX_PIXELS, min_patches=256)
    batches = iter(sft_dataset(source, task=task, tokenizer=tokenizer, batch_size=4, seed=0,
                               options=options))
    steps = 30
    optimizer = make_optimizer(learning_rate=3e-3, total_steps=steps, warmup_ratio=0.1)
    model = Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(0))
    state = TrainState.create(model, optimizer)
    step = make_sft_step(model, optimizer, micro_batches=2)
    losses = []
    for _ in range(steps):
        inputs = stack_micro_batches([next(batches), next(batches)], model)
        state, metrics = step(state, inputs)
        losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"syn_texture SFT loss: first 5 steps {first:.3f}, last 5 {last:.3f}")
    assert last < 0.7 * first, losses
    assert float(metrics["learning_rate"]) == pytest.approx(
        float(make_schedule(learning_rate=3e-3, total_steps=steps, warmup_ratio=0.1)(steps - 1)))
