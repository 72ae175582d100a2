"""DiT model: parity with the official PyTorch forward, official init, block designs, dtypes.

The reference vectors (tests/data/README.md) come from the unmodified official `models.py` with
random, non-official parameters so that every activation is O(1).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import traverse_util

from dit_jax.convert import official
from dit_jax.models import BLOCK_TYPES, DiT, embeddings, variants
from dit_jax.models.dit import activations


def _setup(ref, **overrides):
  cfg = json.loads(str(ref["meta/config_json"]))
  model = DiT(**{**cfg, **overrides})
  sd = {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}
  x = ref["fwd/x"].transpose(0, 2, 3, 1)
  t, y = ref["fwd/t"], ref["fwd/y"]
  expected = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  params = official.state_dict_to_params(sd, expected=expected)
  return model, params, x, t, y


def _apply_fn(model):
  return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y,
                                                mutable=["intermediates"]))


@pytest.mark.parametrize("which, fast", [("ref_a", {}), ("ref_b", {}), ("ref_a", {"scan": True}),
                                         ("ref_b", {"scan": True, "remat": True})])
def test_forward_parity_with_official(which, fast, request):
  """Also with the blocks as one lax.scan (and rematerialised): same canonical parameters
  (the official import fills them), same activations, the sown `block{i}` included."""
  ref = request.getfixturevalue(which)
  model, params, x, t, y = _setup(ref, **fast)
  out, state = _apply_fn(model)(params, x, t, y)
  assert out.shape == x.shape[:3] + (model.out_channels,)
  assert rel_err(out.transpose(0, 3, 1, 2), ref["fwd/out"]) <= 1e-5
  acts = activations(state["intermediates"])
  ref_acts = {k[len("fwd/act/"):] for k in ref if k.startswith("fwd/act/")}
  assert set(acts) == ref_acts
  for name in ref_acts:
    tol = 1e-4 if name == "t_freq" else 1e-5
    assert rel_err(acts[name], ref[f"fwd/act/{name}"]) <= tol, name
  # The fixed position table: float64 to the last bit or two (numpy's sin/cos differ by an ulp
  # between CPUs: its AVX-512 paths are not glibc's), and the float32 cast equals the official.
  np.testing.assert_allclose(
      embeddings.get_2d_sincos_pos_embed(model.hidden_size, model.grid_size),
      ref["pos_embed_f64"], rtol=0, atol=4e-16)
  np.testing.assert_array_equal(model.pos_embed()[None], ref["param/pos_embed"])


def test_timestep_embedding_layout():
  emb = np.asarray(embeddings.timestep_embedding(jnp.array([0.0, 3.0]), dim=8))
  f = np.exp(-np.log(10000) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(3 * f), np.sin(3 * f)]), rtol=1e-6)
  np.testing.assert_array_equal(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])  # cos first
  assert embeddings.timestep_embedding(jnp.array([1]), dim=7).shape == (1, 7)
  assert embeddings.timestep_embedding(jnp.array([1])).shape == (1, 256)  # DiT's default


def test_timestep_embedder_call_matches_official(ref_a):
  """`TimestepEmbedder(t)` on its own (DiT calls `embed_frequencies` on shared features): the
  official `t_embedder(t)` activations."""
  model, params, _, t, _ = _setup(ref_a)
  emb = embeddings.TimestepEmbedder(model.hidden_size)
  out = emb.apply({"params": params["t_embedder"]}, jnp.asarray(t))
  assert rel_err(out, ref_a["fwd/act/t_embedder"]) <= 1e-5


def test_init_matches_official():
  model = variants.build("tiny-A")
  n = 3
  x = jax.random.normal(jax.random.key(1), (n, 8, 8, 4))
  t = jnp.array([0, 500, 999])
  y = jnp.array([1, 10, 3])
  variables = jax.jit(model.init)(jax.random.key(0), x, t, y)
  assert set(variables) == {"params"}  # pos_embed is a constant, not a param
  params = variables["params"]
  flat = traverse_util.flatten_dict(params, sep="/")
  assert not any("pos_embed" in k for k in flat)

  out, state = _apply_fn(model)(params, x, t, y)
  np.testing.assert_array_equal(out, 0.0)  # adaLN-Zero + zero final layer
  acts = activations(state["intermediates"])
  tokens = acts["x_embedder"] + model.pos_embed()[None]
  for i in range(model.depth):  # every block is the identity at init
    np.testing.assert_array_equal(acts[f"block{i}"], tokens)

  for k, v in flat.items():
    v = np.asarray(v)
    if k.endswith("bias"):
      np.testing.assert_array_equal(v, 0.0, err_msg=k)
    if "adaLN_modulation_1" in k or k.startswith("final_layer/linear"):
      np.testing.assert_array_equal(v, 0.0, err_msg=k)
  table = np.asarray(params["y_embedder"]["embedding_table"]["embedding"])
  assert table.shape == (11, 64)
  assert abs(table.std() - 0.02) < 0.003
  for name in ("mlp_0", "mlp_2"):
    assert abs(np.asarray(params["t_embedder"][name]["kernel"]).std() - 0.02) < 0.003
  # Xavier-uniform bounds: Dense over (fan_in, fan_out); the patch conv as a flat
  # (p*p*C) -> D linear map, like the official `xavier_uniform_(w.view(D, -1))`.
  for k, fan_in, fan_out in [("blocks_0/attn/qkv/kernel", 64, 192),
                             ("blocks_1/mlp/fc2/kernel", 256, 64),
                             ("x_embedder/proj/kernel", 16, 64)]:
    v = np.abs(np.asarray(flat[k]))
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    assert v.max() <= bound and v.max() > 0.9 * bound, k


def _random_params(shapes, seed=0):
  """Non-zero N(0, 1/fan_in) parameters for the given shape tree, so every path carries signal."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda l: jnp.asarray(rng.normal(size=l.shape) / np.sqrt(l.shape[0] if l.ndim == 2 else 8),
                            jnp.float32), shapes)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_block_designs(block_type):
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t = jnp.array([3, 700])
  y = jnp.array([1, 2])
  model = variants.build("tiny-A", block_type=block_type)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  assert set(shapes) == {"params"}
  params = _random_params(shapes["params"])
  apply = _apply_fn(model)
  out, state = apply(params, x, t, y)
  assert out.shape == (2, 8, 8, 8)
  assert np.all(np.isfinite(out))
  acts = activations(state["intermediates"])
  # in-context: exactly two extra tokens inside the blocks, dropped before the final layer.
  n_tokens = 16 + (2 if block_type == "in-context" else 0)
  for i in range(model.depth):
    assert acts[f"block{i}"].shape == (2, n_tokens, 64)
  assert acts["final_layer"].shape == (2, 16, 32)
  blk = shapes["params"]["blocks_0"]
  if block_type in ("adaLN-Zero", "adaLN"):
    width = 6 if block_type == "adaLN-Zero" else 4
    assert blk["adaLN_modulation_1"]["kernel"].shape == (64, width * 64)
    assert shapes["params"]["final_layer"]["adaLN_modulation_1"]["kernel"].shape == (64, 128)
  else:
    assert "adaLN_modulation_1" not in blk
    assert "adaLN_modulation_1" not in shapes["params"]["final_layer"]
    assert set(shapes["params"]["final_layer"]) == {"norm_final", "linear"}
    expected = {"norm1", "attn", "norm2", "mlp"}
    if block_type == "cross-attention":
      expected |= {"cross_attn", "norm3"}
      assert set(blk["cross_attn"]) == {"q", "kv", "proj"}
    assert set(blk) == expected
  # The label reaches the output in every design.
  out_y, _ = apply(params, x, t, jnp.array([5, 9]))
  assert rel_err(out_y, out) > 1e-3
  if block_type == "cross-attention":
    # ... and in cross-attention only through the cross-attention over the [t, y] tokens.
    no_cross = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "cross_attn" in jax.tree_util.keystr(p) else v,
        params)
    a, _ = apply(no_cross, x, t, y)
    b, _ = apply(no_cross, x, t, jnp.array([5, 9]))
    np.testing.assert_array_equal(a, b)
  if block_type == "adaLN":
    # Standard (non-zero) init of the 4D modulation: blocks are not the identity at init.
    init = jax.jit(model.init)(jax.random.key(0), x, t, y)["params"]
    assert np.abs(np.asarray(init["blocks_0"]["adaLN_modulation_1"]["kernel"])).max() > 0
    _, s0 = apply(init, x, t, y)
    a0 = activations(s0["intermediates"])
    assert rel_err(a0["block0"], a0["x_embedder"] + model.pos_embed()[None]) > 1e-3


def test_label_dropout():
  emb = embeddings.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=1.0)
  half = embeddings.LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
  labels = jnp.arange(64) % 10
  table = np.random.default_rng(0).normal(size=(11, 8)).astype(np.float32)
  v = {"params": {"embedding_table": {"embedding": jnp.asarray(table)}}}
  assert table.shape == (11, 8)

  @jax.jit
  def run(key, force):
    return (emb.apply(v, labels, True, rngs={"label_dropout": key}),  # train, prob 1
            emb.apply(v, labels, False),                              # eval: as given
            emb.apply(v, labels, False, force),                       # forced drops
            half.apply(v, labels, True, rngs={"label_dropout": key}))  # train, prob 0.5

  force = (np.arange(64) % 3 == 0).astype(np.int32)
  all_null, evals, forced, a = run(jax.random.key(3), force)
  np.testing.assert_array_equal(all_null, np.broadcast_to(table[10], (64, 8)))
  np.testing.assert_array_equal(evals, table[np.arange(64) % 10])
  np.testing.assert_array_equal(forced, table[np.where(force, 10, np.arange(64) % 10)])
  b = run(jax.random.key(3), force)[3]
  c = run(jax.random.key(4), force)[3]
  np.testing.assert_array_equal(a, b)  # deterministic for a given key
  assert not np.array_equal(a, c)
  n_null = int(np.sum(np.all(np.asarray(a) == table[10], axis=1)))
  assert 10 < n_null < 54
  with pytest.raises(ValueError, match="label_dropout"):
    jax.eval_shape(lambda: half.apply(v, labels, True))

  # Through the full model: prob 1.0 in train mode makes every label null.
  model = variants.build("tiny-A", class_dropout_prob=1.0)
  x, t, y = jnp.zeros((2, 8, 8, 4)), jnp.array([1, 2]), jnp.array([0, 1])
  params = _random_params(jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"])
  train_apply = jax.jit(lambda p, k: model.apply(
      {"params": p}, x, t, y, train=True, rngs={"label_dropout": k},
      mutable=["intermediates"]))
  _, state = train_apply(params, jax.random.key(0))
  null = params["y_embedder"]["embedding_table"]["embedding"][10]
  np.testing.assert_array_equal(activations(state["intermediates"])["y_embedder"],
                                np.broadcast_to(null, (2, 64)))


def test_label_dropout_at_the_training_rate():
  """p = 0.1 (the recipe) over n = 200,000 labels: the drop frequency has sd
  sqrt(0.1 * 0.9 / n) = 6.7e-4, so |f - 0.1| <= 0.005 is a 7.5-sd bound (p^2 = 0.01 or
  1 - p fail it by far). Dropped labels become exactly the null index num_classes; the others
  are kept. The same in train mode through the embedding table."""
  n, num_classes, p = 200_000, 1000, 0.1
  emb = embeddings.LabelEmbedder(num_classes=num_classes, hidden_size=2, dropout_prob=p)
  labels = jnp.arange(n, dtype=jnp.int32) % num_classes
  table = jnp.stack([jnp.arange(num_classes + 1), jnp.zeros(num_classes + 1)], -1)
  v = {"params": {"embedding_table": {"embedding": table.astype(jnp.float32)}}}

  @jax.jit
  def run(key):
    dropped = emb.apply(v, labels, method=emb.token_drop, rngs={"label_dropout": key})
    looked_up = emb.apply(v, labels, True, rngs={"label_dropout": key})[:, 0]
    return dropped, looked_up

  for seed in (0, 1):
    dropped, looked_up = (np.asarray(a) for a in run(jax.random.key(seed)))
    for got in (dropped, looked_up.astype(np.int64)):
      null = got == num_classes
      assert abs(null.mean() - p) <= 0.005, null.mean()
      np.testing.assert_array_equal(got[~null], np.asarray(labels)[~null])
  assert not np.array_equal(dropped, np.asarray(run(jax.random.key(0))[0]))


def test_bfloat16_compute_close_to_float32(ref_a):
  model, params, x, t, y = _setup(ref_a)
  out32, _ = _apply_fn(model)(params, x, t, y)
  bf = model.clone(dtype="bfloat16")
  out16, state16 = _apply_fn(bf)(params, x, t, y)
  assert out16.dtype == jnp.bfloat16
  for name in ("x_embedder", "t_embedder", "y_embedder"):  # Every embedder computes in bf16.
    assert state16["intermediates"][name]["out"][0].dtype == jnp.bfloat16, name
  assert rel_err(out16.astype(jnp.float32), out32) < 5e-2
  # bf16 parameters too.
  bfp = model.clone(dtype=jnp.bfloat16, param_dtype="bfloat16")
  shapes = jax.eval_shape(bfp.init, jax.random.key(0), x, t, y)["params"]
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(shapes))


def test_bfloat16_compute_gradients_close_to_float32(ref_a):
  """bf16 compute with float32 parameters (`dtype="bfloat16"`, the master weights and so the
  optimizer state stay float32): the gradients of a mean-square loss are float32 and within 5%
  (relative to each tensor's max) of the float32 model's, on the official reference model."""
  model, params, x, t, y = _setup(ref_a)
  bf = model.clone(dtype="bfloat16", scan=True)

  def grad(m):
    return jax.jit(jax.grad(lambda p: jnp.mean(
        m.apply({"params": p}, x, t, y).astype(jnp.float32) ** 2)))(params)
  g32, g16 = grad(model), grad(bf)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree.leaves(g32)):
    assert a.dtype == jnp.float32, jax.tree_util.keystr(path)
    assert rel_err(a, b) < 5e-2, jax.tree_util.keystr(path)


@pytest.mark.parametrize("fast", [dict(remat=True, remat_policy="dots_saveable"), dict(scan=True)])
def test_fast_paths_keep_names_values_and_gradients(ref_a, fast):
  """remat (each policy) and scan: `init` makes the canonical `blocks_i` parameters, and the
  forward pass and the gradients equal the plain model's to float32 rounding."""
  model, params, x, t, y = _setup(ref_a)
  rm = model.clone(**fast)
  shapes = jax.eval_shape(rm.init, jax.random.key(0), x, t, y)["params"]
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
  out, _ = _apply_fn(rm)(params, x, t, y)
  assert rel_err(out.transpose(0, 3, 1, 2), ref_a["fwd/out"]) <= 1e-5

  def loss(m):
    return jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, x, t, y) ** 2)))
  g_ref, g = loss(model)(params), loss(rm)(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref),
                          strict=True):
    assert rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_unknown_remat_policy_raises():
  with pytest.raises(ValueError, match="remat_policy='dots'"):
    variants.build("tiny-A", remat=True, remat_policy="dots")


@pytest.mark.parametrize("block_type", ["adaLN-Zero", "cross-attention"])
def test_ln_grad_barrier_keeps_values_and_gradients(ref_a, block_type):
  model, params, x, t, y = _setup(ref_a)
  model = model.clone(block_type=block_type, ln_grad_barrier=False)
  params = model.init(jax.random.key(3), x, t, y)["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape),
                        params)  # leave the adaLN-Zero init: every path carries gradient
  barred = model.clone(ln_grad_barrier=True)

  def loss(m):
    return lambda p: jnp.mean(m.apply({"params": p}, x, t, y) ** 2)

  assert "optimization_barrier" in str(jax.make_jaxpr(jax.grad(loss(barred)))(params))
  assert "optimization_barrier" not in str(jax.make_jaxpr(jax.grad(loss(model)))(params))
  # The default (None) is on for a CPU backend, which the tests run on.
  assert "optimization_barrier" in str(
      jax.make_jaxpr(jax.grad(loss(model.clone(ln_grad_barrier=None))))(params))
  np.testing.assert_allclose(barred.apply({"params": params}, x, t, y),
                             model.apply({"params": params}, x, t, y), rtol=1e-6, atol=1e-6)
  g_ref, g = jax.grad(loss(model))(params), jax.grad(loss(barred))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref),
                          strict=True):
    assert rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_size=9), "input_size=9 is not divisible by patch_size=2"),
    (dict(num_heads=5), "hidden_size=64 is not divisible by num_heads=5"),
    (dict(hidden_size=66, num_heads=3), "hidden_size=66 must be divisible by 4"),
    (dict(dtype="float33"), "dtype='float33'"),
    (dict(param_dtype="int32"), "param_dtype='int32'"),
    (dict(block_type="adaLN-zero"), "block_type='adaLN-zero'"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(class_dropout_prob=1.5), "class_dropout_prob"),
])
def test_invalid_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    variants.build("tiny-A", **kwargs)


def test_wrong_input_shape_raises():
  model = variants.build("tiny-A")
  with pytest.raises(ValueError, match=r"x must be NHWC \(N, 8, 8, 4\)"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 4, 8, 8)), jnp.zeros((2,)),
                   jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("fast", [dict(fused_adaln=True), dict(fused_adaln=True, scan=True)])
def test_fused_adaln_is_one_matmul_with_the_same_values(ref_a, fast):
  """`fused_adaln`: canonical parameters from `init`, ONE (N, D) x (D, depth * 6D) product
  instead of `depth` (N, D) x (D, 6D) ones, and the per-block model's output (1e-6) and
  gradients (1e-5), at "highest" matmul precision, on parameters where every path matters."""
  model, params, x, t, y = _setup(ref_a)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape),
                        params)
  fused = model.clone(**fast)
  shapes = jax.eval_shape(fused.init, jax.random.key(0), x, t, y)["params"]
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)

  def loss(m):
    return lambda p: jnp.mean(m.apply({"params": p}, x, t, y) ** 2)
  d, depth = model.hidden_size, model.depth
  jaxpr = str(jax.make_jaxpr(loss(fused))(params))
  assert f"f32[{x.shape[0]},{depth * 6 * d}] = dot_general" in jaxpr
  assert f"f32[{x.shape[0]},{6 * d}] = dot_general" not in jaxpr
  with jax.default_matmul_precision("highest"):
    assert rel_err(fused.apply({"params": params}, x, t, y),
                   model.apply({"params": params}, x, t, y)) <= 1e-6
    g_ref, g = jax.grad(loss(model))(params), jax.grad(loss(fused))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref),
                          strict=True):
    assert rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)
