"""models/ops.py: each hand-written backward pass equals JAX's automatic one of the plain form.

The plain forms are the library's own (`jax.nn.dot_product_attention(implementation="xla")`,
flax `nn.LayerNorm` then `modulate`, `jax.nn.gelu(approximate=True)`); values and vector-
Jacobian products agree to float32 rounding (matmuls at "highest" precision), in bfloat16
within a few bfloat16 roundings (2%: the hand-written
backward passes compute in float32 where JAX's stay in bfloat16), at shapes where every term of each backward matters (O(1) inputs,
unequal T and S, non-zero shift and scale).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from conftest import rel_err

from dit_jax.models import dit, ops


def _check(fast, plain, args, tol):
  """Values and the VJP of a random cotangent agree within `tol` (rel_err per output)."""
  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(fast, *args)
    ref, vjp_ref = jax.vjp(plain, *args)
    g = jax.random.normal(jax.random.key(9), out.shape, jnp.float32).astype(out.dtype)
    assert out.dtype == ref.dtype
    assert rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) <= tol
    for i, (a, b) in enumerate(zip(vjp(g), vjp_ref(g), strict=True)):
      assert a.dtype == b.dtype, i
      assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) <= tol, i


def _normal(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_attention_matches_jax(dtype, tol):
  q = _normal(0, (2, 12, 3, 8), dtype, 2.0)  # (B, T, N, H); logits O(1) to O(10)
  k = _normal(1, (2, 7, 3, 8), dtype, 2.0)   # S = 7 != T
  v = _normal(2, (2, 7, 3, 8), dtype)
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
  _check(ops.attention, plain, (q, k, v), tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_modulated_layer_norm_matches_flax(dtype, tol):
  x = _normal(3, (2, 5, 16), dtype, 3.0) + 1.5  # non-zero mean
  shift = _normal(4, (2, 16), dtype)
  scale = _normal(5, (2, 16), dtype)
  norm = dit.layer_norm(dtype=dtype)
  plain = lambda x, s, c: dit.modulate(norm.apply({}, x), s, c)  # noqa: E731
  fast = lambda x, s, c: ops.modulated_layer_norm(x, s, c, dit.LN_EPS)  # noqa: E731
  _check(fast, plain, (x, shift, scale), tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 16)])
def test_dense_dot_general_matches_lax(dtype, tol, shape):
  x = _normal(6, shape, dtype)
  w = _normal(7, (16, 12), dtype)
  dims = (((len(shape) - 1,), (0,)), ((), ()))
  _check(lambda x, w: ops.dense_dot_general(x, w, dims),  # noqa: E731
         lambda x, w: jax.lax.dot_general(x, w, dims), (x, w), tol)


def test_dense_dot_general_routing():
  """The blocks' Dense layers take it on a CPU backend only; other contractions pass through."""
  assert dit.dense_dot_general("cpu") is ops.dense_dot_general
  assert dit.dense_dot_general("gpu") is None and dit.dense_dot_general("tpu") is None
  x, w = _normal(0, (3, 4), jnp.float32), _normal(1, (3, 5), jnp.float32)
  dims = (((0,), (0,)), ((), ()))  # Not Dense's contraction: plain lax.dot_general.
  jaxpr = str(jax.make_jaxpr(lambda x, w: ops.dense_dot_general(x, w, dims))(x, w))
  assert "custom_vjp_call" not in jaxpr
  layer = dit.Mlp(8)
  params = layer.init(jax.random.key(0), x)
  assert str(jax.make_jaxpr(lambda p: layer.apply(p, x))(params)).count("custom_vjp_call") == 3


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_gelu_tanh_matches_jax(dtype, tol):
  x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float32).astype(dtype)
  _check(ops.gelu_tanh, lambda x: nn.gelu(x, approximate=True), (x,), tol)


@pytest.mark.parametrize("impl", ["xla", None])
def test_dit_attention_routes_to_ops(impl):
  """`attention_impl="xla"`, and None on a CPU (JAX would pick "xla" there), run
  `ops.attention` ("cudnn" stays `jax.nn.dot_product_attention`; it cannot run on a CPU)."""
  q = _normal(0, (1, 4, 2, 8), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda q: dit.dot_product_attention(q, q, q, impl))(q))
  assert "custom_vjp_call" in jaxpr
  assert "custom_vjp_call" not in str(jax.make_jaxpr(
      lambda q: jax.nn.dot_product_attention(q, q, q, implementation=impl))(q))
