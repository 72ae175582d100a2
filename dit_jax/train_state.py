"""The training state pytree, the optimizer, and creating the state already sharded.

This module owns `TrainState` (step, params, EMA params, optimizer state; no functions, so it
is a plain pytree that Orbax saves and restores leaf by leaf), the optimizer built from
`config.optimizer`, and the initialisation path of big_vision: abstract shapes with
`jax.eval_shape`, then shardings from the mesh, then a jitted init whose `out_shardings` make
every array born in its final layout (never built on one device and moved).

Optimizer (the official DiT recipe is AdamW(lr=1e-4, weight_decay=0) with nothing else):

  lr(s) = learning_rate * min(1, (s + 1) / warmup_steps)     (constant when warmup_steps = 0)
  g <- g * min(1, grad_clip_norm / ||g||_2)                  (only when grad_clip_norm > 0)
  AdamW(lr(s), b1, b2, eps, weight_decay)

EMA (official `update_ema`, initialised to the parameters, updated after every step):

  ema <- decay * ema + (1 - decay) * params
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from dit_jax import errors
from dit_jax import sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: int32 scalar, the number of optimizer updates applied.
    params: the model parameters (the `"params"` collection).
    ema_params: exponential moving average of `params` (used for sampling).
    opt_state: the optax state of `create_optimizer`.
  """
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree


def learning_rate_schedule(config_optimizer) -> optax.Schedule:
  """Linear warmup from lr/warmup_steps to lr over `warmup_steps` steps, then constant, or,
  with `cosine_decay_steps` > 0, a cosine decay from lr to 0 reached at that step (held at 0
  after it). The paper's recipe is constant (no warmup, no decay)."""
  lr = float(config_optimizer.learning_rate)
  warmup = int(config_optimizer.warmup_steps)
  decay = int(config_optimizer.get("cosine_decay_steps", 0) or 0)
  if lr <= 0:
    raise errors.UserError(f"config.optimizer.learning_rate must be > 0, got {lr}.")
  if warmup < 0:
    raise errors.UserError(f"config.optimizer.warmup_steps must be >= 0, got {warmup}.")
  if decay < 0 or (decay and decay <= warmup):
    raise errors.UserError(f"config.optimizer.cosine_decay_steps must be 0 (off) or > warmup_steps="
                     f"{warmup}, got {decay}.")
  if warmup == 0 and decay == 0:
    return optax.constant_schedule(lr)

  def schedule(step):
    factor = jnp.minimum(1.0, (step + 1) / warmup) if warmup else jnp.ones(())
    if decay:
      progress = jnp.clip((step - warmup) / (decay - warmup), 0.0, 1.0)
      factor = factor * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return lr * factor

  return schedule


def create_optimizer(config_optimizer) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with optional global-norm clipping and warmup; returns (tx, lr schedule)."""
  schedule = learning_rate_schedule(config_optimizer)
  tx = optax.adamw(schedule, b1=float(config_optimizer.b1), b2=float(config_optimizer.b2),
                   eps=float(config_optimizer.eps),
                   weight_decay=float(config_optimizer.weight_decay))
  clip = float(config_optimizer.grad_clip_norm)
  if clip < 0:
    raise errors.UserError(f"config.optimizer.grad_clip_norm must be >= 0 (0 = off), got {clip}.")
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule


def make_init_fn(model, tx: optax.GradientTransformation, input_shape: tuple[int, ...]
                 ) -> Callable[[jax.Array], TrainState]:
  """init_fn(rng) -> TrainState for inputs of shape (N, H, W, C) (N is irrelevant)."""
  def init_fn(rng):
    x = jnp.zeros(input_shape, jnp.float32)
    t = jnp.zeros(input_shape[:1], jnp.int32)
    y = jnp.zeros(input_shape[:1], jnp.int32)
    params = model.init(rng, x, t, y)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        # A distinct buffer so that donating the state never donates one buffer twice.
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params))
  return init_fn


def abstract_state_and_shardings(init_fn, rng, mesh, strategy: str):
  """(abstract TrainState of ShapeDtypeStructs, matching NamedShardings)."""
  abstract = jax.eval_shape(init_fn, rng)
  return abstract, sharding.state_shardings(abstract, mesh, strategy)


def init_state(init_fn, rng: jax.Array, shardings: PyTree) -> TrainState:
  """Runs `init_fn(rng)` under jit so every leaf is created directly in `shardings`."""
  return jax.jit(init_fn, out_shardings=shardings)(rng)


def param_count(params: PyTree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
