"""The Diffusion Transformer (Peebles & Xie 2023), exact to the official `models.py`.

Owns `DiT`, its blocks and final layers. NHWC in, NHWC out:

  x_tok = PatchEmbed(x) + pos_embed                      (N, T, D), pos_embed a fixed constant
  c     = TimestepEmbedder(t) + LabelEmbedder(y)         (N, D)
  x_tok = block_i(x_tok, c)                              i = 0..depth-1
  out   = unpatchify(final_layer(x_tok, c))              (N, H, W, oc), oc = 2C if learn_sigma

With `LN` a parameter-free LayerNorm (eps 1e-6) and `mod(u, shift, scale) = u (1 + scale) + shift`,
the official **adaLN-Zero** block is

  (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = adaLN_modulation_1(SiLU(c))
  x = x + gate_msa * Attn(mod(LN(x), shift_msa, scale_msa))
  x = x + gate_mlp * MLP(mod(LN(x), shift_mlp, scale_mlp))

with `adaLN_modulation_1` (6D outputs) zero-initialised, so every block is the identity at
init, and the final layer `linear(mod(LN(x), shift, scale))`, `(shift, scale)` from a
zero-initialised `adaLN_modulation_1` (2D), `linear` zero-initialised too (the model outputs
exactly 0 at init). Attn is multi-head `softmax(q k^T / sqrt(hd)) v` with a single `qkv` Dense
(output features `[q | k | v]`, head h = features `h*hd..(h+1)*hd-1` inside each) and `proj`;
MLP is `fc2(GELU_tanh(fc1(u)))`, hidden `int(D * mlp_ratio)`. All other Dense kernels are
xavier-uniform, all biases zero, as the official `initialize_weights`.

The paper's other conditioning designs (section 3.2), selected with `block_type`. The paper
does not fix every detail; the choices made here are:

* ``"adaLN"``: the adaLN-Zero block without gates: `x = x + Attn(mod(LN(x), ...))`,
  `x = x + MLP(mod(LN(x), ...))`; `adaLN_modulation_1` has 4D outputs
  (shift_msa, scale_msa, shift_mlp, scale_mlp) and a standard xavier-uniform kernel (zero
  bias), likewise the final layer's 2D modulation. The final `linear` stays zero-initialised
  in every design (the official "zero-out output layers"), so all designs output 0 at init.
* ``"in-context"``: standard pre-LN ViT blocks (`norm1`, `norm2`: LayerNorm with affine
  parameters, eps 1e-6): `x = x + Attn(norm1(x))`, `x = x + MLP(norm2(x))`. The embeddings of
  t and y are appended, in that order, as two extra tokens after the T image tokens (no
  position embedding is added to them; they are learned vectors already), so the blocks see
  T + 2 tokens; the two are dropped after the last block. Final layer: `norm_final`
  (affine LayerNorm) then `linear`.
* ``"cross-attention"``: the in-context block with a multi-head cross-attention layer after
  self-attention, over the length-two sequence `[t_emb, y_emb]` (not normalised):
  `x = x + Attn(norm1(x))`, `x = x + CrossAttn(norm2(x), [t_emb, y_emb])`,
  `x = x + MLP(norm3(x))`. CrossAttn has `q` (D), `kv` (2D, `[k | v]`) and `proj` Dense
  layers, xavier-uniform. Final layer as in-context.

Attention (`attention_impl="xla"`), the adaLN LayerNorm + modulation and the MLP's GELU run
through `ops`, whose backward passes are written out (same values and gradients); so do the
blocks' Dense products on a CPU backend (`dense_dot_general`).

Precision: parameters are stored in `param_dtype` and the computation runs in `dtype`
(e.g. bfloat16); LayerNorm statistics and the attention softmax are computed in float32, and
the timestep frequencies are always float32.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models import embeddings
from dit_jax.models import ops

Dtype = Any

BLOCK_TYPES = ("adaLN-Zero", "adaLN", "in-context", "cross-attention")
ATTENTION_IMPLS = ("xla", "cudnn", None)
LN_EPS = 1e-6

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def to_dtype(field: str, value: Union[str, Dtype]) -> jnp.dtype:
  """`"bfloat16"` / `jnp.bfloat16` -> a floating numpy dtype, or a ValueError naming `field`."""
  try:
    dt = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{field}={value!r} is not a dtype name (e.g. 'float32', 'bfloat16')") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{field}={value!r} must be a floating dtype (e.g. 'float32', 'bfloat16')")
  return dt


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


@jax.custom_vjp
def grad_barrier(x: jax.Array) -> jax.Array:
  """Identity whose backward passes the cotangent through `lax.optimization_barrier`.

  XLA:CPU fuses each LayerNorm backward with the residual-stream cotangent chain into large
  transposing fusions that recompute that chain per consumer; on the digits demo model this
  made the backward pass ~2.5x the forward. A barrier on the LayerNorm-input cotangent keeps
  it materialised once (measured: 54 -> 44 ms per fwd+bwd at batch 32 on 2 CPU cores). The
  value and the gradient are unchanged; it only constrains fusion.
  """
  return x


grad_barrier.defvjp(lambda x: (x, None), lambda _, g: (jax.lax.optimization_barrier(g),))


def use_ln_grad_barrier(setting: Optional[bool]) -> bool:
  """Whether the blocks use `grad_barrier`: `setting`, or for None, iff the default backend
  is a CPU.

  On XLA:CPU (jax 0.10) the backward pass of DiT's blocks is one chain of elementwise ops from
  block to block (the residual-stream cotangent through every LayerNorm backward; the
  reductions run as separate library fusions). XLA:CPU's fusion duplicates such cheap
  producers into every consumer, so each block's gradient fusion recomputes the chain from the
  top: on DiT-S/2 at 256 tokens ~50 fusions of up to ~900 ops, 20.6 GB of memory traffic per
  forward + backward instead of 13.1 GB with the barrier, and compiles 2-3x longer. (XLA drops
  optimisation barriers before fusion, in `cse_barrier_expander`; the barrier acts by keeping
  the algebraic simplifier from merging each LayerNorm backward into that chain.) XLA's GPU
  and TPU fusion passes weigh duplication with a cost model, and there the barrier would only
  keep a LayerNorm backward from fusing with its neighbours, so it stays off there. The adaLN
  blocks' LayerNorm now has a hand-written backward (`ops.modulated_layer_norm`), with which
  DiT-S/2's CPU step measured the same with and without the barrier (README); the affine
  LayerNorms of the in-context and cross-attention designs still rely on it.
  """
  if setting is None:
    return jax.default_backend() == "cpu"
  return bool(setting)


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def remat_policy(name: Optional[str]):
  """`jax.checkpoint_policies.<name>` (None: JAX's default, nothing saved but the inputs)."""
  if name is None:
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r} is not one of {REMAT_POLICIES} (or None)")
  return getattr(jax.checkpoint_policies, name)


def layer_norm(name: Optional[str] = None, affine: bool = False, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm with eps 1e-6 and exact (two-pass) float32 statistics, like torch."""
  return nn.LayerNorm(epsilon=LN_EPS, use_bias=affine, use_scale=affine,
                      use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def dense_dot_general(backend: Optional[str] = None):
  """The `dot_general` of the blocks' Dense layers: `ops.dense_dot_general` (the kernel
  gradient from 2-D views) on a CPU backend, None (flax's `lax.dot_general`) elsewhere, where
  it has not been measured. Same values and gradients either way."""
  return ops.dense_dot_general if (backend or jax.default_backend()) == "cpu" else None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: Optional[str]) -> jax.Array:
  """Multi-head attention of `(B, T, N, H)` queries over `(B, S, N, H)` keys and values.

  "xla", and None on a CPU backend (where JAX would pick "xla"): `ops.attention` (heads-first,
  hand-written backward; the same values as `jax.nn.dot_product_attention(implementation=
  "xla")`); "cudnn", or None elsewhere (JAX picks): `jax.nn.dot_product_attention`, whose cuDNN
  kernel takes exactly this `(B, T, N, H)` layout.
  """
  if implementation == "xla" or (implementation is None and jax.default_backend() == "cpu"):
    return ops.attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Attention(nn.Module):
  """Multi-head self-attention (timm `Attention`): single `qkv` Dense, then `proj`.

  Attributes:
    num_heads: number of heads; head dim = D / num_heads.
    attention_impl: `jax.nn.dot_product_attention` implementation ("xla", "cudnn", None).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  num_heads: int
  attention_impl: Optional[str] = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, d = x.shape
    hd = d // self.num_heads
    dense = lambda f, name: nn.Dense(f, kernel_init=xavier, bias_init=zeros, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype, name=name,
                                     dot_general=dense_dot_general())
    qkv = dense(3 * d, "qkv")(x).reshape(n, t, 3, self.num_heads, hd)
    o = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_impl)
    return dense(d, "proj")(o.reshape(n, t, d))


class CrossAttention(nn.Module):
  """Multi-head cross-attention of `x` (queries) over `context` (keys and values).

  Attributes:
    num_heads: number of heads; head dim = D / num_heads.
    attention_impl: `jax.nn.dot_product_attention` implementation.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  num_heads: int
  attention_impl: Optional[str] = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    n, t, d = x.shape
    s = context.shape[1]
    hd = d // self.num_heads
    dense = lambda f, name: nn.Dense(f, kernel_init=xavier, bias_init=zeros, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype, name=name,
                                     dot_general=dense_dot_general())
    q = dense(d, "q")(x).reshape(n, t, self.num_heads, hd)
    kv = dense(2 * d, "kv")(context).reshape(n, s, 2, self.num_heads, hd)
    o = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], self.attention_impl)
    return dense(d, "proj")(o.reshape(n, t, d))


class Mlp(nn.Module):
  """`fc2(GELU_tanh(fc1(x)))` (timm `Mlp`).

  Attributes:
    hidden_features: width of fc1.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  hidden_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    dense = lambda f, name: nn.Dense(f, kernel_init=xavier, bias_init=zeros, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype, name=name,
                                     dot_general=dense_dot_general())
    x = ops.gelu_tanh(dense(self.hidden_features, "fc1")(x))
    return dense(d, "fc2")(x)


class DiTBlock(nn.Module):
  """One transformer block of the chosen conditioning design (see the module docstring).

  `__call__(x, cond, mod=None)`: `cond` is `c = t_emb + y_emb` `(N, D)` for the adaLN designs, the
  `(N, 2, D)` sequence `[t_emb, y_emb]` for cross-attention, and ignored for in-context
  (the conditioning tokens are already part of `x`).

  Attributes:
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    block_type: one of `BLOCK_TYPES`.
    attention_impl: `jax.nn.dot_product_attention` implementation.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    ln_grad_barrier: pass LayerNorm inputs through `grad_barrier` (a CPU speed option).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  block_type: str = "adaLN-Zero"
  attention_impl: Optional[str] = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  ln_grad_barrier: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array,
               mod: Optional[jax.Array] = None) -> jax.Array:
    d = x.shape[-1]
    if self.ln_grad_barrier:
      ln = lambda norm: (lambda v: norm(grad_barrier(v)))  # noqa: E731
    else:
      ln = lambda norm: norm  # noqa: E731
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = Attention(self.num_heads, self.attention_impl, name="attn", **kw)
    mlp = Mlp(int(d * self.mlp_ratio), name="mlp", **kw)
    if self.block_type in ("adaLN-Zero", "adaLN"):
      zero = self.block_type == "adaLN-Zero"
      if mod is None:  # Else `adaLN_modulation_1(SiLU(c))` computed by the caller (fused_adaln).
        mod = nn.Dense((6 if zero else 4) * d, kernel_init=zeros if zero else xavier,
                       bias_init=zeros, name="adaLN_modulation_1", **kw)(nn.silu(cond))
      bar = grad_barrier if self.ln_grad_barrier else (lambda v: v)  # noqa: E731
      norm_mod = lambda v, shift, scale: ops.modulated_layer_norm(  # noqa: E731
          bar(v), shift, scale, LN_EPS)
      if zero:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
        x = x + gate_msa[:, None] * attn(norm_mod(x, shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * mlp(norm_mod(x, shift_mlp, scale_mlp))
      else:
        shift_msa, scale_msa, shift_mlp, scale_mlp = jnp.split(mod, 4, -1)
        x = x + attn(norm_mod(x, shift_msa, scale_msa))
        x = x + mlp(norm_mod(x, shift_mlp, scale_mlp))
      return x
    x = x + attn(ln(layer_norm("norm1", True, **kw))(x))
    if self.block_type == "cross-attention":
      cross = CrossAttention(self.num_heads, self.attention_impl, name="cross_attn", **kw)
      x = x + cross(ln(layer_norm("norm2", True, **kw))(x), cond.astype(self.dtype))
      return x + mlp(ln(layer_norm("norm3", True, **kw))(x))
    return x + mlp(ln(layer_norm("norm2", True, **kw))(x))


class FinalLayer(nn.Module):
  """`linear(mod(LN(x), shift, scale))` (adaLN designs) or `linear(norm_final(x))`.

  Attributes:
    out_features: p * p * out_channels.
    adaptive: use the adaLN modulation (else an affine LayerNorm, no conditioning).
    zero_init_modulation: zero-initialise `adaLN_modulation_1` (adaLN-Zero) or xavier.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  out_features: int
  adaptive: bool = True
  zero_init_modulation: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: Optional[jax.Array]) -> jax.Array:
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.adaptive:
      mod = nn.Dense(2 * d, kernel_init=zeros if self.zero_init_modulation else xavier,
                     bias_init=zeros, name="adaLN_modulation_1", **kw)(nn.silu(c))
      shift, scale = jnp.split(mod, 2, -1)
      x = modulate(layer_norm(dtype=self.dtype)(x), shift, scale)
    else:
      x = layer_norm("norm_final", True, **kw)(x)
    x = nn.Dense(self.out_features, kernel_init=zeros, bias_init=zeros, name="linear", **kw)(x)
    self.sow("intermediates", "out", x)
    return x


def activations(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Sown intermediates -> `{"x_embedder", "t_freq", "t_embedder", "y_embedder", "block{i}",
  "final_layer"}` arrays (the names of the reference vectors `fwd/act/*`)."""
  out = {}
  for name, value in intermediates.items():
    if isinstance(value, Mapping):
      if "out" in value:
        out[name] = value["out"][0]
    else:
      out[name] = value[0]
  return out


class DiT(nn.Module):
  """Diffusion model with a Transformer backbone; attributes are the official kwargs.

  `__call__(x, t, y, *, train=False, force_drop_ids=None)`: x `(N, H, W, C)` NHWC, t `(N,)`
  timesteps (int or float, 0..999), y `(N,)` int labels (`num_classes` = null label).
  Returns `(N, H, W, out_channels)`. In train mode labels are dropped to the null label with
  probability `class_dropout_prob`, which needs `rngs={"label_dropout": key}`.
  Activations are sown into the "intermediates" collection (apply with
  `mutable=["intermediates"]`): `t_freq` and `block{i}` by DiT itself, and the outputs of the
  submodules `x_embedder` (before `+ pos_embed`), `t_embedder`, `y_embedder` and
  `final_layer` (before unpatchify) as `<submodule>/out` (a variable cannot share its
  submodule's name). `activations(state["intermediates"])` flattens them to those names.

  Attributes:
    input_size: H = W of the (latent) input.
    patch_size: p.
    in_channels: C.
    hidden_size: D.
    depth: number of blocks.
    num_heads: attention heads (D must be divisible by it).
    mlp_ratio: MLP hidden width / D.
    class_dropout_prob: label dropout probability (> 0 adds the null-class row).
    num_classes: number of classes.
    learn_sigma: output 2C channels (eps, v) instead of C.
    block_type: "adaLN-Zero" (official), "adaLN", "in-context" or "cross-attention".
    dtype: computation dtype (str or jnp dtype).
    param_dtype: parameter dtype (str or jnp dtype).
    attention_impl: `jax.nn.dot_product_attention` implementation: "xla", "cudnn" or None.
    remat: rematerialise each block (`nn.remat`) in the backward pass; names unchanged.
    remat_policy: what a rematerialised block keeps from its forward pass, one of
      `REMAT_POLICIES` (`jax.checkpoint_policies`), e.g. "dots_saveable" keeps the matmul
      outputs (recomputes only the cheap elementwise work); None: nothing but the block input.
    scan: run the blocks as one `lax.scan` (`_scan_blocks`): XLA compiles one block instead
      of `depth` (shorter lowering; on XLA:CPU not a shorter compile, README); same values,
      same canonical parameters.
    fused_adaln: compute every block's adaLN modulation in one matmul (`_fused_modulation`;
      adaLN designs only): same values, same canonical per-block parameters.
    ln_grad_barrier: a fusion barrier on the blocks' LayerNorm-input gradients (`grad_barrier`):
      same values. None (default): on when JAX's default backend is a CPU, off elsewhere
      (`use_ln_grad_barrier`).
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  block_type: str = "adaLN-Zero"
  dtype: Union[str, Dtype] = "float32"
  param_dtype: Union[str, Dtype] = "float32"
  attention_impl: Optional[str] = "xla"
  remat: bool = False
  ln_grad_barrier: Optional[bool] = None
  scan: bool = False
  remat_policy: Optional[str] = None
  fused_adaln: bool = False

  def __post_init__(self):
    self._validate()
    super().__post_init__()

  def _validate(self):
    for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                  "num_heads", "num_classes"):
      v = getattr(self, field)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{field} must be a positive integer, got {v!r}")
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size={self.input_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")
    if self.hidden_size % 4:
      raise ValueError(f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos "
                       "position embedding)")
    if not self.mlp_ratio > 0:
      raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
    if not 0.0 <= self.class_dropout_prob <= 1.0:
      raise ValueError(f"class_dropout_prob must be in [0, 1], got {self.class_dropout_prob!r}")
    if self.block_type not in BLOCK_TYPES:
      raise ValueError(f"block_type={self.block_type!r} is not one of {BLOCK_TYPES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is not one of "
                       f"{ATTENTION_IMPLS}")
    to_dtype("dtype", self.dtype)
    to_dtype("param_dtype", self.param_dtype)
    remat_policy(self.remat_policy)

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def grid_size(self) -> int:
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  def _fused_modulation(self, cond: jax.Array, dtype) -> list[jax.Array]:
    """Every block's `adaLN_modulation_1(SiLU(c))` as ONE matmul (`fused_adaln=True`, apply
    only): the canonical kernels `(D, kD)` of `blocks_0` ... `blocks_{depth-1}` are
    concatenated along the outputs, `SiLU(c) @ [W_0 | ... | W_{L-1}] + [b_0 | ... | b_{L-1}]`,
    and the product split back per block: the same sums as `depth` separate Dense layers."""
    params = self.variables["params"]
    dense = [params[f"blocks_{i}"]["adaLN_modulation_1"] for i in range(self.depth)]
    kernel = jnp.concatenate([p["kernel"] for p in dense], axis=1).astype(dtype)
    bias = jnp.concatenate([p["bias"] for p in dense]).astype(dtype)
    mod = jnp.dot(nn.silu(cond).astype(dtype), kernel) + bias
    return jnp.split(mod, self.depth, axis=-1)

  def _scan_blocks(self, tokens: jax.Array, cond: Optional[jax.Array], block_kw,
                   mods: Optional[list[jax.Array]] = None) -> jax.Array:
    """The blocks as one `lax.scan` over their stacked parameters (`scan=True`, apply only).

    The parameters stay canonical (`blocks_0` ... `blocks_{depth-1}`, as `init` makes them and
    checkpoints and the official import keep them); they are stacked here, inside the jitted
    computation, and the scan's body is one block applied functionally, so XLA compiles one
    block instead of `depth`. The values equal the unrolled loop's; the cost is one copy of the
    blocks' parameters (and of their gradients) per step.
    """
    params = self.variables["params"]
    per_block = [params[f"blocks_{i}"] for i in range(self.depth)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)
    block = DiTBlock(parent=None, **block_kw)
    collect = self.is_mutable_collection("intermediates")

    def body(x, p_mod):
      p, mod = p_mod
      x = block.apply({"params": p}, x, cond, mod)
      return x, (x if collect else None)

    if self.remat:
      body = jax.checkpoint(body, policy=remat_policy(self.remat_policy))
    tokens, outs = jax.lax.scan(body, tokens, (stacked, None if mods is None else jnp.stack(mods)))
    if collect:
      for i in range(self.depth):
        self.sow("intermediates", f"block{i}", outs[i])
    return tokens

  def pos_embed(self) -> np.ndarray:
    """The fixed sin-cos table, float32 `(T, D)` (official `pos_embed[0]`)."""
    return embeddings.get_2d_sincos_pos_embed(self.hidden_size,
                                              self.grid_size).astype(np.float32)

  def unpatchify(self, x: jax.Array) -> jax.Array:
    """`(N, T, p*p*oc)` -> `(N, H, W, oc)`: feature `(a*p + b)*oc + ch` = pixel (a, b)."""
    n = x.shape[0]
    p, g, oc = self.patch_size, self.grid_size, self.out_channels
    x = x.reshape(n, g, g, p, p, oc).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * p, g * p, oc)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False,
               force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
    dtype = to_dtype("dtype", self.dtype)
    param_dtype = to_dtype("param_dtype", self.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    expected = (self.input_size, self.input_size, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"x must be NHWC (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                       f"got shape {tuple(x.shape)}")
    n = x.shape[0]
    if jnp.shape(t) != (n,) or jnp.shape(y) != (n,):
      raise ValueError(f"t and y must have shape ({n},), got {jnp.shape(t)} and {jnp.shape(y)}")

    tokens = embeddings.PatchEmbed(self.patch_size, self.hidden_size, name="x_embedder",
                                   **kw)(x.astype(dtype))
    tokens = tokens + jnp.asarray(self.pos_embed(), dtype)[None]

    t_embedder = embeddings.TimestepEmbedder(self.hidden_size, name="t_embedder", **kw)
    t_freq = embeddings.timestep_embedding(t, t_embedder.frequency_embedding_size)
    self.sow("intermediates", "t_freq", t_freq)
    t_emb = t_embedder.embed_frequencies(t_freq)
    y_emb = embeddings.LabelEmbedder(self.num_classes, self.hidden_size,
                                     self.class_dropout_prob, name="y_embedder",
                                     **kw)(y, train, force_drop_ids)

    adaptive = self.block_type in ("adaLN-Zero", "adaLN")
    if adaptive:
      cond = t_emb + y_emb
    elif self.block_type == "in-context":
      cond = None
      tokens = jnp.concatenate([tokens, t_emb[:, None], y_emb[:, None]], axis=1)
    else:  # cross-attention
      cond = jnp.stack([t_emb, y_emb], axis=1)

    block_kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    block_type=self.block_type, attention_impl=self.attention_impl,
                    ln_grad_barrier=use_ln_grad_barrier(self.ln_grad_barrier), **kw)
    mods = [None] * self.depth
    if self.fused_adaln and adaptive and not self.is_initializing():
      mods = self._fused_modulation(cond, dtype)
    if self.scan and not self.is_initializing():
      tokens = self._scan_blocks(tokens, cond, block_kw, None if mods[0] is None else mods)
    else:
      policy = remat_policy(self.remat_policy)
      block_cls = nn.remat(DiTBlock, policy=policy) if self.remat else DiTBlock
      for i in range(self.depth):
        tokens = block_cls(name=f"blocks_{i}", **block_kw)(tokens, cond, mods[i])
        self.sow("intermediates", f"block{i}", tokens)
    if self.block_type == "in-context":
      tokens = tokens[:, :self.num_tokens]

    out = FinalLayer(self.patch_size ** 2 * self.out_channels, adaptive=adaptive,
                     zero_init_modulation=self.block_type == "adaLN-Zero",
                     name="final_layer", **kw)(tokens, cond if adaptive else None)
    return self.unpatchify(out)
