"""Building blocks with hand-written gradients equal autodiff's of their formula."""

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.models.qwen2_5_vl.layers import gated_silu


def _formula(gate, up):
    return jax.nn.silu(gate) * up


def _inputs(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(4 * jax.random.normal(key, (64, 48), dtype) for key in keys)


def test_gated_silu_value_and_gradient_equal_autodiff():
    gate, up, cotangent = _inputs(jnp.float32)
    np.testing.assert_allclose(gated_silu(gate, up), _formula(gate, up), rtol=1e-6)
    got = jax.vjp(gated_silu, gate, up)[1](cotangent)
    want = jax.vjp(_formula, gate, up)[1](cotangent)
    for have, expected in zip(got, want, strict=True):
        np.testing.assert_allclose(have, expected, rtol=1e-5, atol=1e-5)


def test_gated_silu_gradient_in_bfloat16_is_as_close_to_exact_as_autodiffs():
    """In bfloat16 both round differently; measured against the float32 gradient of the same
    inputs, ours is no further off than autodiff's, and stays bfloat16."""
    inputs = _inputs(jnp.bfloat16)
    exact = jax.vjp(_formula, *(x.astype(jnp.float32) for x in inputs[:2]))[1](
        inputs[2].astype(jnp.float32))
    ours = jax.vjp(gated_silu, *inputs[:2])[1](inputs[2])
    autodiff = jax.vjp(_formula, *inputs[:2])[1](inputs[2])
    for have, reference, truth in zip(ours, autodiff, exact, strict=True):
        assert have.dtype == jnp.bfloat16
        error = float(jnp.abs(have.astype(jnp.float32) - truth).max())
        assert error <= 1.5 * float(jnp.abs(reference.astype(jnp.float32) - truth).max())
