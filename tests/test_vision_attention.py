"""Attention: its hand-written gradient equals autodiff's of the plain formula, and the
memory-bounded forms (the vision tower's full attention, window and frame blocks, the decoder's
attention in query chunks) equal the dense masked attention, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.models.qwen2_5_vl.layers import chunked_attention, dot_product_attention
from cpt_jax.models.qwen2_5_vl.vision import (
    blocked_segment_attention,
    local_segment_attention,
    segment_attention,
    segments_in_blocks,
)


def _autodiff_attention(q, k, v, mask):
    """The formula as transformers' eager path writes it, differentiated by JAX."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) / np.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(batch, q_len, heads, head_dim)


@pytest.mark.parametrize("heads_major", [False, True])
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (3, 3)])
def test_attention_gradient_equals_autodiff_of_the_formula(heads_major, heads, kv_heads):
    """Grouped and plain heads, a random mask with a row that sees no key (uniform
    probabilities, and no gradient through its hidden logits), keys heads-major as a cache
    holds them or slot-major."""
    batch, q_len, kv_len, head_dim = 2, 7, 9, 8
    keys = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k, v = (jax.random.normal(key, (batch, kv_len, kv_heads, head_dim)) for key in keys[1:3])
    mask = jax.random.bernoulli(keys[3], 0.6, (batch, q_len, kv_len)).at[1, 2].set(False)
    cotangent = jax.random.normal(keys[4], q.shape)

    def ours(q, k, v):
        if heads_major:
            k, v = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))
        return dot_product_attention(q, k, v, mask, heads_major=heads_major)

    np.testing.assert_allclose(ours(q, k, v), _autodiff_attention(q, k, v, mask), atol=1e-6)
    got = jax.grad(lambda *a: jnp.sum(ours(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(_autodiff_attention(*a, mask) * cotangent),
                    argnums=(0, 1, 2))(q, k, v)
    for have, expected in zip(got, want, strict=True):
        np.testing.assert_allclose(have, expected, atol=1e-6)
    assert float(jnp.abs(want[0][1, 2]).max()) == 0.0  # the blind row's query gets nothing


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


@pytest.mark.parametrize(("sizes", "in_blocks"), [
    ([16, 16, 8, 8, 16, 12, 4, 20], True),  # whole and shared blocks, padding (-1) crossing
    ([16, 8, 16, 8, 16, 12, 4, 20], False),  # the third segment crosses a block boundary
])
def test_blocked_segment_attention_equals_dense_in_both_forms(sizes, in_blocks):
    """`segments_in_blocks` tells whether any real segment crosses a block boundary (padding
    may), and attention within blocks, or over neighbouring chunks when one does, equals the
    dense form in values and gradients."""
    block, heads, head_dim = 16, 2, 8
    ids = np.repeat(np.arange(len(sizes)), sizes)
    ids[-sizes[-1]:] = -1  # the padding patches' segment
    ids = jnp.asarray(ids, jnp.int32)
    assert bool(segments_in_blocks(ids, block)) is in_blocks
    keys = jax.random.split(jax.random.key(4), 4)
    n = int(sum(sizes))
    q, k, v = (jax.random.normal(key, (n, heads, head_dim)) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], (n, heads, head_dim))
    real = np.asarray(ids) >= 0

    def blocked(q, k, v, ids):
        return blocked_segment_attention(q, k, v, ids, block, segments_in_blocks(ids, block),
                                         reach=2)

    def loss(fn, q, k, v):  # padding patches' outputs are never read
        return jnp.sum(jnp.where(real[:, None, None], fn(q, k, v, ids) * cotangent, 0.0))

    np.testing.assert_allclose(blocked(q, k, v, ids)[real], _dense(q, k, v, ids)[real],
                               atol=1e-5)
    grads = jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(_dense, *a), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
