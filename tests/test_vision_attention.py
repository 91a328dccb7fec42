"""Memory-bounded attention (the vision tower's full attention, the decoder's attention in query
chunks) equals the dense masked attention, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.models.qwen2_5_vl.layers import chunked_attention, dot_product_attention
from cpt_jax.models.qwen2_5_vl.vision import local_segment_attention, segment_attention


def _dense(q, k, v, ids):
    mask = ids[:, None] == ids[None, :]
    return dot_product_attention(q[None], k[None], v[None], mask[None])[0]


@pytest.mark.parametrize("query_chunk", [16, 37, 1024])
def test_chunked_segment_attention_equals_dense_values_and_gradients(query_chunk):
    n, heads, head_dim = 150, 2, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (n, heads, head_dim)) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], (n, heads, head_dim))
    # Three images of unequal size and a padding segment, as the packed patches come.
    ids = jnp.asarray(np.repeat([0, 1, 2, -1], [40, 64, 30, 16]), jnp.int32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, ids) * cotangent)

    chunked = lambda q, k, v, ids: segment_attention(q, k, v, ids, query_chunk)  # noqa: E731
    np.testing.assert_allclose(chunked(q, k, v, ids), _dense(q, k, v, ids), atol=1e-5)
    grads = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(_dense, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("chunk", "reach", "query_chunk"),
                         [(16, 1, 1024), (32, 2, 1024), (21, 3, 1024), (32, 2, 40)])
def test_local_segment_attention_equals_dense_values_and_gradients(chunk, reach, query_chunk):
    """Segments of at most reach * chunk + 1 tokens (the bound of the neighbourhood), unequal
    and unaligned with the chunks; the last case also takes the query chunks in groups."""
    keys = jax.random.split(jax.random.key(2), 4)
    sizes = [reach * chunk + 1, 5, reach * chunk - 3, 1, 17]
    n, heads, head_dim = sum(sizes), 2, 8
    q, k, v = (jax.random.normal(key, (n, heads, head_dim)) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], (n, heads, head_dim))
    ids = jnp.asarray(np.repeat(np.arange(len(sizes)), sizes), jnp.int32)

    def local(q, k, v, ids):
        return local_segment_attention(q, k, v, ids, chunk, reach, query_chunk)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, ids) * cotangent)

    np.testing.assert_allclose(local(q, k, v, ids), _dense(q, k, v, ids), atol=1e-5)
    grads = jax.grad(lambda *a: loss(local, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(_dense, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_chunked_attention_memory_grows_linearly_not_quadratically():
    """The compiled backward pass of 16k packed patches fits in a few hundred MB: the dense
    form would hold 2 heads x 16k x 16k fp32 scores (2 GiB) per call."""
    n, heads, head_dim = 16384, 2, 8
    q = jax.ShapeDtypeStruct((n, heads, head_dim), jnp.float32)
    ids = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(q, k, v, ids):
        return jnp.sum(segment_attention(q, k, v, ids, 512))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q, ids).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 300 * 2**20


@pytest.mark.parametrize("query_chunk", [8, 13])
def test_chunked_causal_attention_equals_dense_values_and_gradients(query_chunk):
    """The decoder's attention in query chunks (grouped-query heads, causal and padding
    masks, a length that the chunk does not divide) equals the dense form."""
    batch, length, heads, kv_heads, head_dim = 2, 30, 4, 2, 8
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim))
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    real = jnp.arange(length)[None, :] >= jnp.asarray([[0], [7]])  # row 1 left-padded
    mask = jnp.tril(jnp.ones((length, length), bool))[None] & real[:, None, :]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * cotangent)

    chunked = lambda q, k, v, m: chunked_attention(q, k, v, m, query_chunk)  # noqa: E731
    np.testing.assert_allclose(chunked(q, k, v, mask), dot_product_attention(q, k, v, mask),
                               atol=1e-5)
    grads = jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(dot_product_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
