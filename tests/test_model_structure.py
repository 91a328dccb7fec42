"""Shapes, logical axes, scanning, rematerialisation, dtypes and input checks of the NNX model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qwen_reference import IMAGE, VEND, VIDEO, VSTART, multimodal_batch

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset

LOGICAL_AXES = {"layers", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab",
                "vision_embed", "vision_mlp", "vision_heads", None}


def _param_count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name, expected", [("qwen2_5_vl_7b", 8_292_166_656),
                                            ("qwen2_5_vl_3b", 3_754_622_976)])
def test_real_presets_build_abstractly_with_the_published_size(name, expected):
    model = nnx.eval_shape(lambda: Qwen2_5_VL(preset(name), param_dtype=jnp.bfloat16,
                                              rngs=nnx.Rngs(0)))
    count = _param_count(model)
    print(f"{name}: {count:,} parameters")
    assert count == expected


def test_small_presets_have_their_stated_size():
    tiny = nnx.eval_shape(lambda: Qwen2_5_VL(preset("tiny"), rngs=nnx.Rngs(0)))
    small = nnx.eval_shape(lambda: Qwen2_5_VL(preset("small"), rngs=nnx.Rngs(0)))
    assert 100_000 <= _param_count(tiny) <= 900_000
    assert 20_000_000 <= _param_count(small) <= 50_000_000


def test_every_parameter_carries_logical_axes():
    config = preset("qwen2_5_vl_7b")
    model = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        name = ".".join(map(str, path))
        assert len(axes) == len(var.shape), name
        assert set(axes) <= LOGICAL_AXES, (name, axes)
        stacked = "layers" in path or "blocks" in path
        assert (axes[0] == "layers") == stacked, (name, axes)
    q = model.language_model.layers.self_attn.q_proj.kernel
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    assert q.shape == (config.text.num_hidden_layers, 3584, 28, 128)


def _tiny(**overrides):
    config = preset("tiny")
    text = dataclasses.replace(config.text, **overrides)
    return dataclasses.replace(config, text=text)


def _jaxpr_size(config, remat=False) -> int:
    model = Qwen2_5_VL(config, remat=remat, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.ones((2, 16), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (3, 2, 16))
    mask = jnp.ones((2, 16), bool)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state).forward(ids, positions, mask)
        return logits.mean()

    return len(jax.make_jaxpr(jax.grad(loss))(state).jaxpr.eqns)


def test_layers_are_scanned_not_unrolled():
    """The traced program has the same size for 2 and 12 decoder layers: one layer body."""
    assert _jaxpr_size(_tiny(num_hidden_layers=2)) == _jaxpr_size(_tiny(num_hidden_layers=12))


def test_remat_changes_the_program_not_the_gradient():
    config = preset("tiny")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 400, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12), (3, 2, 12))
    mask = jnp.ones((2, 12), bool)

    def grads(remat):
        model = Qwen2_5_VL(config, remat=remat, rngs=nnx.Rngs(1))
        loss = lambda m: jnp.mean(m.forward(ids, positions, mask)[0] ** 2)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(nnx.grad(loss))(model))
        return nnx.grad(loss)(model), jaxpr

    plain, plain_jaxpr = grads(False)
    remat, remat_jaxpr = grads(True)
    assert "remat" in remat_jaxpr or "checkpoint" in remat_jaxpr
    assert "remat" not in plain_jaxpr and "checkpoint" not in plain_jaxpr
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_with_float32_storage():
    config = preset("tiny")
    fp32 = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    bf16 = Qwen2_5_VL(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
    ids = np.random.default_rng(0).integers(0, 400, (2, 10))
    jaxpr = str(jax.make_jaxpr(lambda m: m(ids))(bf16))
    assert "bf16" in jaxpr
    a, b = np.asarray(fp32(ids)), np.asarray(bf16(ids))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3


def test_image_token_count_mismatch_is_a_clear_error():
    batch = multimodal_batch()
    config = preset("tiny")
    config = dataclasses.replace(config, image_token_id=IMAGE, video_token_id=VIDEO,
                                 vision_start_token_id=VSTART, vision_end_token_id=VEND)
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    kwargs = batch.ours()
    kwargs["image_grid_thw"] = np.asarray([[1, 10, 14], [1, 6, 4], [1, 8, 12]])
    with pytest.raises(ValueError, match=r"image tokens and image features do not match.*"
                                         r"holds 57 image tokens.*give 65 merged patches"):
        model(batch.input_ids, **kwargs)
