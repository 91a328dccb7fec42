"""The model-FLOP formulas (what MFU divides by) against XLA's own count of the compiled
forward pass, on shapes where the compiled program does no masked or padded work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax.flops import text_forward_flops, vision_forward_flops
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, VisionInputs, preset


def _xla_flops(fn, state) -> float:
    cost = jax.jit(fn).lower(state).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_formulas_match_xla_within_the_elementwise_work(name):
    """XLA counts every multiply-add of the matmuls and attention, plus the elementwise work
    (norms, softmax, activations) the formulas leave out: a few percent more, never less.
    Layers unrolled, so that XLA counts every layer (it counts a loop body once)."""
    cfg = preset(name)
    graphdef, state = nnx.split(Qwen2_5_VL(cfg, scan_layers=False, rngs=nnx.Rngs(0)))
    length = 64
    ids = jnp.ones((1, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length)[None, None], (3, 1, length))
    mask = jnp.ones((1, length), bool)
    text = _xla_flops(lambda s: nnx.merge(graphdef, s).forward(ids, positions, mask)[0], state)
    assert 1.0 <= text / text_forward_flops(cfg.text, [length]) <= 1.05

    side = cfg.vision.window_size // cfg.vision.patch_size  # one window: no masked pairs
    vision = VisionInputs.build(np.zeros((side * side, cfg.vision.patch_dim), np.float32),
                                np.array([[1, side, side]]), cfg.vision)
    counted = _xla_flops(lambda s: nnx.merge(graphdef, s).visual(vision), state)
    assert 1.0 <= counted / vision_forward_flops(cfg.vision, [side * side]) <= 1.1


def test_the_head_counted_at_some_positions_matches_xla():
    """The output head over 8 of 64 positions (an SFT loss's response window)."""
    cfg = preset("small")
    graphdef, state = nnx.split(Qwen2_5_VL(cfg, scan_layers=False, rngs=nnx.Rngs(0)))
    length, kept = 64, 8
    ids = jnp.ones((1, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length)[None, None], (3, 1, length))
    mask = jnp.ones((1, length), bool)

    def windowed(s):
        model = nnx.merge(graphdef, s)
        hidden, _ = model.hidden_states(ids, positions, mask)
        return model.logits(hidden[:, -kept:])

    counted = _xla_flops(windowed, state)
    formula = text_forward_flops(cfg.text, [length], [kept])
    assert 1.0 <= counted / formula <= 1.05
    # The head is about a fifth of this forward: 56 of 64 positions without it save 17 %.
    assert formula < 0.85 * text_forward_flops(cfg.text, [length])
