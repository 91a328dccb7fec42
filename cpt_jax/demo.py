"""Demo: a randomly initialised Qwen2.5-VL preset on a synthetic image + text batch.

    python -m cpt_jax.demo --preset tiny [--new-tokens 8] [--seed 0] [--dtype float32]

Builds the model from `configs/model/<preset>.yaml` with RANDOM weights (real weights come
from `cpt_jax.models.qwen2_5_vl.from_pretrained`), draws two synthetic images, and runs a
left-padded batch of two image + text prompts through: a full forward pass, a jitted prefill
into a KV cache, and greedy decoding. It then checks that the cached decode gives the same
tokens as a full forward pass over prompt + generated tokens, and prints timings.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from cpt_jax.data.processor import preprocess_image
from cpt_jax.data.synthetic import SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset


def _synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A light background with four coloured rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (235, 230, 215))
    draw = ImageDraw.Draw(image)
    for k in range(4):
        x, y = int(rng.integers(0, width - 16)), int(rng.integers(0, height - 16))
        size, fill = int(rng.integers(12, 36)), tuple(rng.integers(0, 256, 3).tolist())
        (draw.ellipse if k % 2 else draw.rectangle)((x, y, x + size, y + size), fill=fill)
    return image


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def _jitted(model: Qwen2_5_VL):
    """jax.jit over (params, ...) of `model.forward` and `model.decode`.

    Split once and merge inside the trace: nnx.jit(model, ...) also works but re-walks the
    module graph on every call, which costs more than a decode step on CPU.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, *a: nnx.merge(graphdef, s).forward(*a))
    decode = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c))
    return (lambda *a: forward(state, *a)), (lambda t, c: decode(state, t, c))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="a name under configs/model/")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")

    cfg = preset(args.preset)
    model, t_init = _timed(
        lambda: Qwen2_5_VL(
            cfg, dtype=jnp.dtype(args.dtype), param_dtype=jnp.float32, rngs=nnx.Rngs(args.seed)
        )
    )
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"preset {args.preset}: {n_params:,} parameters, RANDOM weights (use from_pretrained "
        f"for real ones), compute dtype {args.dtype}, built in {t_init:.2f} s "
        f"on {jax.devices()[0].platform}"
    )

    # Two images (landscape 112x84, portrait 56x84) -> two prompts, one per image.
    images = [
        _synthetic_image(w, h, args.seed + i) for i, (w, h) in enumerate([(112, 84), (56, 84)])
    ]
    patches, grids = zip(
        *(
            preprocess_image(
                image, min_pixels=SYNTHETIC_MIN_PIXELS, max_pixels=SYNTHETIC_MAX_PIXELS
            )
            for image in images
        ),
        strict=True,
    )
    pixel_values, grid_thw = np.concatenate(patches), np.array(grids)
    rng = np.random.default_rng(args.seed)
    special = min(
        i
        for i in (
            cfg.bos_token_id,
            cfg.eos_token_id,
            cfg.image_token_id,
            cfg.video_token_id,
            cfg.vision_start_token_id,
            cfg.vision_end_token_id,
            cfg.pad_token_id,
        )
        if i is not None
    )
    rows = []
    for (t, h, w), (before, after) in zip(grids, [(3, 9), (2, 4)], strict=True):
        n_image = t * h * w // cfg.vision.merge_unit
        rows.append(
            [
                *rng.integers(0, special, before),
                cfg.vision_start_token_id,
                *[cfg.image_token_id] * n_image,
                cfg.vision_end_token_id,
                *rng.integers(0, special, after),
            ]
        )
    prompt_len = max(map(len, rows))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    input_ids = np.array([[pad] * (prompt_len - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (prompt_len - len(r)) + [1] * len(r) for r in rows], np.int32)
    print(
        f"batch: 2 prompts, lengths {[len(r) for r in rows]}, left-padded to {prompt_len}; "
        f"image grids {grid_thw.tolist()}, pixel_values {pixel_values.shape}"
    )
    vision_kw = dict(pixel_values=pixel_values, image_grid_thw=grid_thw)

    # 1. Full forward pass through the host-side API (eager; the first call traces the scans).
    (logits, dt1), (_, dt2) = (
        _timed(lambda: model(input_ids, attention_mask=mask, **vision_kw)) for _ in range(2)
    )
    print(
        f"full forward model(...): logits {logits.shape} {logits.dtype}; first call "
        f"{dt1:.3f} s, second {dt2:.3f} s"
    )

    # 2. Jitted prefill into a KV cache, then greedy decoding.
    max_len = prompt_len + args.new_tokens
    forward, decode = _jitted(model)
    ids, positions, pmask, vision, _ = model.prepare_inputs(
        input_ids, attention_mask=mask, **vision_kw
    )
    ((logits, cache), dt1), (_, dt2) = (
        _timed(forward, ids, positions, pmask, vision, model.init_cache(2, max_len))
        for _ in range(2)
    )
    print(
        f"prefill (jit, {max_len} cache slots): first call (compile) {dt1:.3f} s, "
        f"second {dt2:.3f} s"
    )
    step_logits = [logits[:, -1]]
    tokens = [jnp.argmax(logits[:, -1], axis=-1)]
    decode_times = []
    for _ in range(args.new_tokens - 1):
        (logits, cache), dt = _timed(decode, tokens[-1][:, None], cache)
        decode_times.append(dt)
        step_logits.append(logits[:, -1])
        tokens.append(jnp.argmax(logits[:, -1], axis=-1))
    generated = np.stack([np.asarray(t) for t in tokens], axis=1)
    print(f"generated token ids: {generated.tolist()}")
    if len(decode_times) > 1:
        print(
            f"decode (jit): first step (compile) {decode_times[0]:.3f} s, then "
            f"{1e3 * np.mean(decode_times[1:]):.2f} ms/token over {len(decode_times) - 1} steps"
        )

    # 3. Consistency: the cached decode must match one full forward over prompt + generated
    # tokens. Random weights give flat logits, so compare the logits as well as the argmax;
    # an argmax mismatch passes only where the top two logits tie within the tolerance.
    full_ids = np.concatenate([input_ids, generated], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(generated)], axis=1)
    full = model(full_ids, attention_mask=full_mask, **vision_kw)
    full = full[:, prompt_len - 1 : prompt_len - 1 + args.new_tokens]
    diff = float(jnp.max(jnp.abs(full - jnp.stack(step_logits, axis=1))))
    tol = (1e-3 if args.dtype == "float32" else 1e-1) * float(jnp.std(full))
    gap = full.max(-1) - jnp.take_along_axis(full, generated[..., None], -1)[..., 0]
    ties = int(np.sum(np.asarray(jnp.argmax(full, axis=-1)) != generated))
    if diff > tol or float(gap.max()) > tol:
        raise RuntimeError(
            f"cache check FAILED: max |logit diff| {diff:.3g} (tolerance {tol:.3g}); cached decode "
            f"gave {generated.tolist()}, a full forward {np.asarray(full.argmax(-1)).tolist()}"
        )
    print(
        f"cache check: OK (max |logit diff| vs full forward {diff:.2e}, tolerance {tol:.1e}"
        + (f", {ties} near-tie(s))" if ties else ")")
    )


if __name__ == "__main__":
    main()
