"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries its logical axis names (`out_sharding` metadata, not applied eagerly),
so that the sharding rules of a later stage can map them onto a mesh without touching the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

INIT_STD = 0.02  # transformers' initializer_range for Qwen2.5-VL


def make_param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Axes, dtype: jnp.dtype,
               init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names; `init` is `normal` (std 0.02), `zeros` or `ones`."""
    shape = tuple(shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32, scaled in the input dtype (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = make_param(rngs, (dim,), (axis_name,), param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class Dense(nnx.Module):
    """A linear map whose kernel may have several input and output axes.

    `in_shape` and `out_shape` let attention keep heads as their own (shardable) axes: the q
    projection is `[embed] -> [heads, head_dim]` rather than a flat `[embed, heads*head_dim]`.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, in_axes: Axes,
                 out_axes: Axes, use_bias: bool, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = make_param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), param_dtype)
        self.bias = (make_param(rngs, out_shape, out_axes, param_dtype, init="zeros")
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = matmul_flat(x.astype(self.dtype), kernel, self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def matmul_flat(x: jax.Array, kernel: jax.Array, n_in: int = 1,
                **dot_kwargs: Any) -> jax.Array:
    """x [..., *in] times kernel [*in, *out] -> [..., *out], with x's leading axes flattened
    into one: XLA's CPU backend computes the kernel's gradient (a contraction over every
    leading axis) about twice as fast over one axis as over batch and sequence apart."""
    lead, n_lead = x.shape[:x.ndim - n_in], x.ndim - n_in
    flat = x.reshape(-1, *x.shape[n_lead:])
    contract = (tuple(range(1, n_in + 1)), tuple(range(n_in)))
    y = jax.lax.dot_general(flat, kernel, (contract, ((), ())), **dot_kwargs)
    return y.reshape(*lead, *y.shape[1:])


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); `axes` names the (model, hidden) axes of the kernels."""

    def __init__(self, dim: int, hidden: int, *, axes: tuple[str, str], use_bias: bool,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        model_axis, hidden_axis = axes
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense((dim,), (hidden,), in_axes=(model_axis,), out_axes=(hidden_axis,),
                               **kw)
        self.up_proj = Dense((dim,), (hidden,), in_axes=(model_axis,), out_axes=(hidden_axis,),
                             **kw)
        self.down_proj = Dense((hidden,), (dim,), in_axes=(hidden_axis,), out_axes=(model_axis,),
                               **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(gated_silu(self.gate_proj(x), self.up_proj(x)))


@jax.custom_vjp
def gated_silu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, with a hand-written gradient: one pass over (gate, up, cotangent) that
    XLA's CPU backend fuses, where autodiff's several passes (sigmoid, its derivative, the
    products and their sums) were about 7 % of a `small` train step's op time."""
    return jax.nn.silu(gate) * up


def _gated_silu_forward(gate: jax.Array, up: jax.Array):
    return gated_silu(gate, up), (gate, up)


def _gated_silu_backward(residuals, d_out):
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    silu = gate * sigmoid
    return d_out * up * (sigmoid + silu * (1 - sigmoid)), d_out * silu


gated_silu.defvjp(_gated_silu_forward, _gated_silu_backward)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], count: int,
                 rngs: nnx.Rngs) -> nnx.Module:
    """`count` independently initialised layers whose parameters are stacked on a leading
    `layers` axis, so that `scan_layers` compiles one layer body instead of `count`."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make(layer_rngs)

    return build(rngs)


def scan_layers(layers: nnx.Module, step: Callable[..., tuple[jax.Array, Any]], carry: jax.Array,
                per_layer: Any = None, *, remat: bool, scan: bool = True) -> tuple[jax.Array, Any]:
    """Runs `step(layer, carry, per_layer_slice) -> (carry, output)` over stacked layers with
    `lax.scan`; `remat` recomputes each layer in the backward pass instead of storing it.

    `scan=False` unrolls the layers into straight-line code instead: longer compiles, but no
    loop for XLA to carry residuals through. On a CPU that loop cost 15-20 % of a train step
    of `small` (zero-filled residual stacks, dynamic slices and updates: benchmarks/README.md)."""
    graphdef, state = nnx.split(layers)

    def body(x, xs):
        layer_state, extra = xs
        return step(nnx.merge(graphdef, layer_state), x, extra)

    if remat:
        body = jax.checkpoint(body)
    if scan:
        return jax.lax.scan(body, carry, (state, per_layer))
    outputs = []
    for xs in split_stacks((state, per_layer)):
        carry, out = body(carry, xs)
        outputs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


def split_stacks(tree: Any) -> list[Any]:
    """A tree of arrays stacked on axis 0 -> one tree per index of that axis.

    Split (not indexed): the gradient of a split is one concatenation, that of L indexings L
    zero-padded stacks summed."""
    leaves, treedef = jax.tree.flatten(tree)
    count = leaves[0].shape[0]
    pieces = [[jnp.squeeze(p, 0) for p in jnp.split(leaf, count)] for leaf in leaves]
    return [jax.tree.unflatten(treedef, [p[i] for p in pieces]) for i in range(count)]


def unstack_layers(layers: nnx.Module) -> list[nnx.Module]:
    """`stack_layers`' module as one module per layer, each weight split out of its stack."""
    graphdef, state = nnx.split(layers)
    return [nnx.merge(graphdef, layer_state) for layer_state in split_stacks(state)]


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rotary; `cos`/`sin` broadcast over the head axis (`[..., seq, 1, head_dim]`)."""
    return x * cos + rotate_half(x) * sin


def attention_probs(scores: jax.Array, mask: jax.Array, head_dim: int,
                    dtype: jnp.dtype) -> jax.Array:
    """Softmax of scaled scores [batch, kv_heads, groups, q_len, kv_len] in fp32 over the keys
    that mask [batch, q_len, kv_len] shows. Hidden logits take the dtype's minimum, as
    transformers' eager path does, so a row with no visible key gives a finite (uniform)
    result instead of NaN."""
    scores = (scores * (head_dim**-0.5)).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          heads_major: bool = False) -> jax.Array:
    """Grouped-query attention with a boolean mask, softmax in fp32.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim], or with
    `heads_major` [batch, kv_heads, kv_len, head_dim] (a per-layer KV cache, read as it is);
    mask: [batch, q_len, kv_len] (True = attend). Returns [batch, q_len, heads, head_dim].
    Masked logits take the dtype's minimum, as transformers' eager path does, so a row with no
    visible key gives a finite (uniform) result instead of NaN.

    The products run heads-major, as plain batched matmuls over (batch, KV head) with a KV
    head's query groups stacked as rows: XLA's CPU backend runs those 1.5x faster than the
    same products over slot-major operands. The gradient is `_grouped_attention`'s own.
    """
    batch, q_len, heads, head_dim = q.shape
    if not heads_major:
        k, v = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    rows = jnp.transpose(q.reshape(batch, q_len, kv_heads, groups, head_dim), (0, 2, 3, 1, 4))
    out = _grouped_attention(rows.reshape(batch, kv_heads, groups * q_len, head_dim), k, v,
                             mask)
    out = jnp.transpose(out.reshape(batch, kv_heads, groups, q_len, head_dim), (0, 3, 1, 2, 4))
    return out.reshape(batch, q_len, heads, head_dim)


def _batched_matmul(a: jax.Array, b: jax.Array, a_contract: int, b_contract: int,
                    **dot_kwargs: Any) -> jax.Array:
    """A product over the last two axes, batched over the leading (batch, KV head) pair."""
    return jax.lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))),
                               **dot_kwargs)


def _grouped_probs(q: jax.Array, k: jax.Array, mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`attention_probs` of heads-major query rows [b, kv_heads, groups * q_len, d] against
    keys [b, kv_heads, kv_len, d], in the rows' layout [b, kv_heads, groups * q_len, kv_len]."""
    batch, kv_heads, rows, head_dim = q.shape
    scores = _batched_matmul(q, k, 3, 3)
    scores = scores.reshape(batch, kv_heads, rows // mask.shape[1], mask.shape[1], -1)
    return attention_probs(scores, mask, head_dim, dtype).reshape(batch, kv_heads, rows, -1)


@jax.custom_vjp
def _grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over heads-major operands (`_grouped_probs`' layout),
    returning [b, kv_heads, groups * q_len, d].

    Its gradient is FlashAttention's: the softmax's backward pass needs, per query row, the sum
    of dO * O over head_dim (a [rows, d] product) instead of the sum of P * dP over the keys
    that autodiff forms on the [rows, kv_len] scores. On a CPU that reduction and the copies
    around it were most of attention's backward pass (benchmarks/README.md)."""
    return _batched_matmul(_grouped_probs(q, k, mask, v.dtype), v, 3, 2)


def _grouped_attention_forward(q, k, v, mask):
    probs = _grouped_probs(q, k, mask, v.dtype)
    out = _batched_matmul(probs, v, 3, 2)
    return out, (q, k, v, mask, probs, out)


def _grouped_attention_backward(residuals, d_out):
    q, k, v, mask, probs, out = residuals
    batch, kv_heads, rows, head_dim = q.shape
    d_v = _batched_matmul(probs, d_out, 2, 2)
    d_probs = _batched_matmul(d_out, v, 3, 3, preferred_element_type=jnp.float32)
    row_sums = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                       keepdims=True)
    d_scores = probs.astype(jnp.float32) * (d_probs - row_sums)
    # Hidden logits were replaced by a constant: no gradient reaches them (it matters in a row
    # with no visible key, whose uniform probabilities are not zero).
    d_scores = d_scores.reshape(batch, kv_heads, rows // mask.shape[1], mask.shape[1], -1)
    d_scores = jnp.where(mask[:, None, None], d_scores * (head_dim**-0.5), 0.0)
    d_scores = d_scores.reshape(batch, kv_heads, rows, -1).astype(q.dtype)
    return (_batched_matmul(d_scores, k, 3, 2), _batched_matmul(d_scores, q, 2, 2), d_v, None)


_grouped_attention.defvjp(_grouped_attention_forward, _grouped_attention_backward)


def shared_prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                            prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array,
                            heads_major: bool = False) -> jax.Array:
    """Attention of a group's answers over their prompt's keys, held once, and their own.

    Rows are prompt-major: row r answers prompt r // n, with n = rows / prompts. q: [rows,
    q_len, heads, head_dim]; k, v, mask: each row's own keys (as in `dot_product_attention`);
    prefix_k, prefix_v: [prompts, prefix_len, kv_heads, head_dim] (or heads-major);
    prefix_mask: [prompts, prefix_len], True = visible to every query of the prompt's rows.

    One softmax spans both key sets, so this equals `dot_product_attention` over each row's
    prefix copy concatenated with its own keys; but the n answers' queries meet the prompt's
    keys in one product per prompt, so the prompt's cache is read once per group instead of n
    times (and stored once: a prompt of a thousand image tokens dwarfs 8 answers' worth).
    """
    rows, q_len, heads, head_dim = q.shape
    prompts, kv_heads = prefix_k.shape[0], prefix_k.shape[1 if heads_major else 2]
    n, groups = rows // prompts, heads // kv_heads
    key_axes = "bhkd" if heads_major else "bkhd"
    grouped = q.reshape(prompts, n, q_len, kv_heads, groups, head_dim)
    shared = jnp.einsum(f"bnqhgd,{key_axes}->bnhgqk", grouped, prefix_k)
    shared = shared.reshape(rows, kv_heads, groups, q_len, -1)
    own = jnp.einsum(f"rqhgd,{key_axes.replace('b', 'r')}->rhgqk",
                     q.reshape(rows, q_len, kv_heads, groups, head_dim), k)
    visible = jnp.concatenate([
        jnp.broadcast_to(jnp.repeat(prefix_mask, n, axis=0)[:, None, :],
                         (rows, q_len, prefix_mask.shape[1])), mask], axis=-1)
    probs = attention_probs(jnp.concatenate([shared, own], axis=-1), visible, head_dim,
                            v.dtype)
    prefix_len = prefix_mask.shape[1]
    shared_probs = probs[..., :prefix_len].reshape(prompts, n, kv_heads, groups, q_len, -1)
    out = (jnp.einsum(f"bnhgqk,{key_axes}->bnqhgd", shared_probs, prefix_v)
           .reshape(rows, q_len, kv_heads, groups, head_dim)
           + jnp.einsum(f"rhgqk,{key_axes.replace('b', 'r')}->rqhgd", probs[..., prefix_len:], v))
    return out.reshape(rows, q_len, heads, head_dim)


QUERY_CHUNK = 1024


def map_in_chunks(fn: Callable[..., Any], xs: Sequence[jax.Array], chunk: int) -> Any:
    """`fn(*xs)` for arrays `xs` that share a leading axis, taken `chunk` rows at a time past
    that length (zero-padded to a multiple) with each chunk recomputed in the backward pass:
    what bounds the memory of attention scores and of the vocabulary projection. `fn` must
    map rows to rows: every output has the same leading axis as its inputs."""
    n = xs[0].shape[0]
    if n <= chunk:
        return fn(*xs)
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    parts = tuple(jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
                  .reshape(chunks, chunk, *x.shape[1:]) for x in xs)
    out = jax.lax.map(jax.checkpoint(lambda part: fn(*part)), parts)
    return jax.tree.map(lambda o: o.reshape(chunks * chunk, *o.shape[2:])[:n], out)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      query_chunk: int | None = None, heads_major: bool = False) -> jax.Array:
    """`dot_product_attention` with the queries taken `query_chunk` at a time past that
    length, each chunk recomputed in the backward pass: memory heads x chunk x kv_len instead
    of heads x q_len x kv_len (28 heads x 7,168^2 float32 scores are 5.8 GB per layer)."""
    def attend(queries: jax.Array, rows: jax.Array) -> jax.Array:  # query-major
        out = dot_product_attention(jnp.moveaxis(queries, 0, 1), k, v, jnp.moveaxis(rows, 0, 1),
                                    heads_major)
        return jnp.moveaxis(out, 1, 0)

    out = map_in_chunks(attend, (jnp.moveaxis(q, 1, 0), jnp.moveaxis(mask, 1, 0)),
                        query_chunk or QUERY_CHUNK)
    return jnp.moveaxis(out, 0, 1)
