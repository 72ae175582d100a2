"""DiT's attention, adaLN LayerNorm and GELU with hand-written backward passes.

Each function computes exactly what its plain form computes (the forward values are the same
operations in the same order) and returns the same gradients up to float32 rounding; the
backward pass is written out (`jax.custom_vjp`) because JAX's automatic one, as XLA:CPU
compiles it, makes more passes over memory than the maths needs (README, "Performance").

* `attention(q, k, v)`: multi-head `softmax(q k^T * scale) v`, `(B, T, N, H)` in and out as
  `jax.nn.dot_product_attention` (whose `implementation="xla"` path it equals: float32 logits
  and softmax, probabilities cast to v's dtype), computed heads-first (`(B, N, T, H)`, so each
  product is a batched matmul with leading batch dimensions). With `P` the probabilities and
  `O = P V`, the backward is that of FlashAttention:

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) * scale,
    dQ = dS K,    dK = dS^T Q

  (`rowsum(dO * O) = rowsum(dP * P)`, a T x H product instead of a T x S one).
* `modulated_layer_norm(x, shift, scale, eps)`: `LN(x) * (1 + scale) + shift` over the last
  axis (parameter-free LayerNorm, two-pass float32 statistics as `nn.LayerNorm(
  use_fast_variance=False)`, shift and scale `(N, D)` broadcast over tokens); with
  `x_hat = (x - mean) * r`, `r = 1 / sqrt(var + eps)`, `g' = g * (1 + scale)`:

    d shift = sum_t g,  d scale = sum_t g * x_hat,
    dx = r * (g' - mean_D(g') - x_hat * mean_D(g' * x_hat))

* `dense_dot_general(x, w, ...)`: `nn.Dense`'s product `x w` (x `(..., K)`, w `(K, N)`), whose
  backward computes `dW = x2^T g2` from the 2-D views `x2 = x.reshape(-1, K)`,
  `g2 = g.reshape(-1, N)` and `dx = g w^T`. JAX's own transpose of a 3-D `x` contracts `dW`
  over two axes (batch and tokens), and XLA:CPU then copies operands about; from 2-D views
  DiT-S/2's CPU training step measured 11% faster (docs/performance.md).
* `gelu_tanh(x)`: `0.5 x (1 + tanh(u))`, `u = c (x + 0.044715 x^3)`, `c = sqrt(2 / pi)`
  (`jax.nn.gelu(approximate=True)`), with `d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u)
  c (1 + 3 * 0.044715 x^2)` from the saved input.
"""
from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def _logits(q, k):
  scale = jnp.float32(1.0 / math.sqrt(q.shape[-1]))
  s = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32)
  return s * scale, scale


@jax.custom_vjp
def _attention_heads_first(q, k, v):
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  s, _ = _logits(q, k)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bnts,bnsh->bnth", p, v)
  return o, (q, k, v, p, o)


def _attention_bwd(res, do):
  q, k, v, p, o = res
  scale = jnp.float32(1.0 / math.sqrt(q.shape[-1]))
  dv = jnp.einsum("bnts,bnth->bnsh", p, do)
  dp = jnp.einsum("bnth,bnsh->bnts", do, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p.astype(jnp.float32) * (dp - delta) * scale).astype(q.dtype)
  dq = jnp.einsum("bnts,bnsh->bnth", ds, k)
  dk = jnp.einsum("bnts,bnth->bnsh", ds, q)
  return dq, dk, dv


_attention_heads_first.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """`softmax(q k^T / sqrt(H)) v` per head; q `(B, T, N, H)`, k and v `(B, S, N, H)`."""
  heads_first = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
  o = _attention_heads_first(heads_first(q), heads_first(k), heads_first(v))
  return heads_first(o)


def _ln_stats(x32, eps):
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  xc = x32 - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  r = jax.lax.rsqrt(var + eps)
  return xc * r, r


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _modulated_ln(x, shift, scale, eps):
  return _modulated_ln_fwd(x, shift, scale, eps)[0]


def _modulated_ln_fwd(x, shift, scale, eps):
  x_hat, r = _ln_stats(x.astype(jnp.float32), eps)
  x_hat = x_hat.astype(x.dtype)
  out = x_hat * (1 + scale[:, None]) + shift[:, None]
  return out, (x_hat, r, scale)


def _modulated_ln_bwd(eps, res, g):
  del eps
  x_hat, r, scale = res
  d_shift = jnp.sum(g, axis=1)
  d_scale = jnp.sum(g * x_hat, axis=1)
  g_hat = (g * (1 + scale[:, None])).astype(jnp.float32)
  x_hat32 = x_hat.astype(jnp.float32)
  dx = r * (g_hat - jnp.mean(g_hat, axis=-1, keepdims=True)
            - x_hat32 * jnp.mean(g_hat * x_hat32, axis=-1, keepdims=True))
  return dx.astype(x_hat.dtype), d_shift, d_scale


_modulated_ln.defvjp(_modulated_ln_fwd, _modulated_ln_bwd)


def modulated_layer_norm(x: jax.Array, shift: jax.Array, scale: jax.Array,
                         eps: float) -> jax.Array:
  """`LN(x) * (1 + scale[:, None]) + shift[:, None]`; x `(N, T, D)`, shift, scale `(N, D)`."""
  return _modulated_ln(x, shift, scale, eps)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """`jax.nn.gelu(x, approximate=True)` with the backward above."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
  return jax.nn.gelu(x, approximate=True), x


def _gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  x2 = x32 * x32
  th = jnp.tanh(GELU_C * (x32 + GELU_A * x2 * x32))
  d = 0.5 * (1 + th) + 0.5 * x32 * (1 - th * th) * GELU_C * (1 + 3 * GELU_A * x2)
  return ((g * d).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
  """`lax.dot_general` for `nn.Dense(dot_general=...)`; Dense's contraction (lhs's last axis
  with rhs's first) goes through `_dense` (the backward above), anything else through
  `lax.dot_general` unchanged."""
  if (dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2
      or preferred_element_type is not None):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  return _dense(lhs, rhs, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, precision):
  return _dense_fwd(x, w, precision)[0]


def _dense_fwd(x, w, precision):
  y = lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  return y, (x, w)


def _dense_bwd(precision, res, g):
  x, w = res
  dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dw = jnp.matmul(x2.T, g2, precision=precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)
