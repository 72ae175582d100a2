"""Two training steps of the ImageNet recipe against the official DiT training computation.

The step is the one a user runs: `configs/imagenet256.py` (with the architecture of the
reference vectors, `tiny-A`, and 10 classes), `train_state.create_optimizer`,
`train.bind_train_step` (the partial `jit_train_step` jits: EMA decay, loss options and
optimizer all read from the config) and `train_step`'s own state handling. Its random draws
(timesteps, noise, label-drop mask) are fed in with `draws=` so both sides see the same ones;
the drop mask drops labels 1 and 5, which is what the official vectors' `train/y` (null label at
1 and 5) computes in train mode.

References, written out here independently of dit_jax's optimizer and EMA code:
* step 1: the official vectors (tests/data/README.md, model_tiny.npz): `train/loss_mean`, and
  `adamw1/*` = torch.optim.AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0) from
  `param/*`;
* steps 1 and 2: PyTorch's AdamW update in float64 numpy (bias-corrected moments,
  `p -= lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)`), on gradients of the loss
  computed outside the train step (the model's loss and gradients at the official parameters
  are proven against `train/*` and `grad/*` in test_parity.py);
* the EMA of the official train.py, `ema = 0.9999 ema + (1 - 0.9999) params` after every
  update, starting at the parameters, in float64 numpy: checked per element to float32
  rounding (at this decay and lr one step moves the EMA by ~1e-8, below float32's resolution of
  O(1) parameters, so the check has teeth on the small parameters and on the two-step sum).

`train_step`'s own label dropout (no `draws`) is checked with class_dropout_prob = 1: only the
null row of the label table may receive a gradient.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, official_tree
from dit_jax import diffusion as dd
from dit_jax import train
from dit_jax import train_state as ts

# The official recipe (DiT train.py): AdamW(lr=1e-4, weight_decay=0), torch's default betas and
# eps; update_ema(decay=0.9999) after every step.
LR, B1, B2, EPS, WD = 1e-4, 0.9, 0.999, 1e-8, 0.0
# optax computes the bias corrections 1 - b^k in float32, where 1 - float32(0.999) is 1.3e-5 off
# 1e-3 (torch computes them in float64): the update differs from torch's by up to ~6.4e-6 of lr.
UPDATE_RTOL = 2e-5
EMA_DECAY = 0.9999
NULL = 10


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def recipe_config(**model_overrides):
  config = load_config("imagenet256")
  config.model.variant = "tiny-A"
  config.data.image_size = 8 * config.latent.downsample  # 8x8x4 latents, as tiny-A
  config.data.num_classes = NULL
  for k, v in model_overrides.items():
    config.model[k] = v
  return config


def fresh_parts(config):
  """(model, diffusion, tx, lr schedule, a freshly initialised state) of `config`."""
  model = train.build_model(config.model)
  tx, schedule = ts.create_optimizer(config.optimizer)
  state = jax.jit(ts.make_init_fn(model, tx, (1, 8, 8, 4)))(jax.random.key(1))
  return model, train.create_diffusion(config.diffusion), tx, schedule, state


def leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def adamw_torch(p, g, m, v, k, lr=LR, b1=B1, b2=B2, eps=EPS, wd=WD):
  """torch.optim.AdamW (single-tensor, amsgrad=False, maximize=False), step k >= 1, float64."""
  p = p * (1.0 - lr * wd)
  m = b1 * m + (1.0 - b1) * g
  v = b2 * v + (1.0 - b2) * g * g
  denom = np.sqrt(v) / np.sqrt(1.0 - b2 ** k) + eps
  return p - (lr / (1.0 - b1 ** k)) * m / denom, m, v


def ulp_bound(ref, n=2):
  return n * np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)


def assert_within(actual, want, atol, what):
  """|actual - want| <= atol elementwise (atol an array); reports the worst element."""
  excess = np.abs(actual - want) - atol
  i = np.unravel_index(np.argmax(excess), excess.shape)
  assert excess[i] <= 0, (what, i, actual[i], want[i], atol[i])


def batch_and_draws(ref, x_key, t, noise, y_key):
  """The batch (labels with the nulls replaced by real ones) and draws dropping the nulls."""
  y_ref = np.asarray(ref[y_key])
  drop = (y_ref == NULL).astype(np.int32)
  assert 0 < drop.sum() < len(drop)
  labels = np.where(drop == 1, (np.arange(len(y_ref)) * 3) % NULL, y_ref)
  batch = {"image": nhwc(ref[x_key]), "label": jnp.asarray(labels, jnp.int32)}
  draws = {"t": jnp.asarray(t, jnp.int32), "noise": noise, "drop": jnp.asarray(drop)}
  return batch, draws, jnp.asarray(y_ref, jnp.int32)


@pytest.fixture(scope="module")
def run(ref_a):
  config = recipe_config()
  model = train.build_model(config.model)
  cfg = json.loads(str(ref_a["meta/config_json"]))
  for k, v in cfg.items():
    assert getattr(model, k) == v, k
  diffusion = train.create_diffusion(config.diffusion)
  tx, schedule = ts.create_optimizer(config.optimizer)
  init_fn = ts.make_init_fn(model, tx, (1, 8, 8, 4))
  fresh = jax.jit(init_fn)(jax.random.key(0))
  assert fresh.step.dtype == jnp.int32 and int(fresh.step) == 0  # An exact step counter.
  for e, p in zip(leaves(fresh.ema_params), leaves(fresh.params), strict=True):
    np.testing.assert_array_equal(e, p)  # The EMA starts at the parameters.
  p0 = official_tree(ref_a)
  state0 = fresh.replace(params=p0, ema_params=p0)  # Adam moments and count from init: zero.

  b1, d1, y1 = batch_and_draws(ref_a, "train/x_start", ref_a["train/t"],
                               nhwc(ref_a["train/noise"]), "train/y")
  b2, d2, y2 = batch_and_draws(ref_a, "fwd/x", np.asarray(ref_a["train/t"])[::-1],
                               nhwc(ref_a["cfg/x"]), "fwd/y")
  step = jax.jit(train.bind_train_step(config, model, diffusion, tx, schedule))
  rng = jax.random.key(0)
  state1, m1 = step(state0, b1, rng, draws=d1)
  state2, m2 = step(state1, b2, rng, draws=d2)

  # Loss and gradients outside the step: eval-mode model on the labels the official code sees.
  @jax.jit
  def loss_and_grad(params, batch, draws, y):
    def loss(params):
      fn = lambda x, mt: model.apply({"params": params}, x, mt, y)  # noqa: E731
      terms = dd.training_losses(diffusion, fn, batch["image"], draws["t"], draws["noise"])
      return jnp.mean(terms["loss"])
    return jax.value_and_grad(loss)(params)

  ref_loss1, g1 = loss_and_grad(p0, b1, d1, y1)
  ref_loss2, g2 = loss_and_grad(state1.params, b2, d2, y2)
  return dict(config=config, ref=ref_a, p0=p0, state0=state0, batch1=b1, state1=state1, state2=state2, m1=m1, m2=m2,
              ref_loss1=ref_loss1, ref_loss2=ref_loss2, g1=g1, g2=g2)


def _official(ref, prefix):
  """The official arrays under `prefix` as a list like `leaves(params)`."""
  return leaves(official_tree(ref, prefix))


def test_recipe_values_are_the_official_ones(run):
  config = run["config"]
  opt = config.optimizer
  assert (opt.learning_rate, opt.b1, opt.b2, opt.eps, opt.weight_decay) == (LR, B1, B2, EPS, WD)
  assert opt.grad_clip_norm == 0 and opt.warmup_steps == 0 and opt.cosine_decay_steps == 0
  assert config.ema.decay == EMA_DECAY and config.model.class_dropout_prob == 0.1
  assert int(run["state1"].step) == 1 and int(run["state2"].step) == 2
  assert float(run["m1"]["train/lr"]) == pytest.approx(LR, rel=1e-7)
  # The count train.py logs: every trainable official tensor (pos_embed is fixed, not a param).
  ref = run["ref"]
  want = sum(np.asarray(ref[k]).size for k in ref
             if k.startswith("param/") and k != "param/pos_embed")
  assert ts.param_count(run["p0"]) == ts.param_count(run["state2"].ema_params) == want


def test_step_one_matches_the_official_vectors(run):
  ref = run["ref"]
  # The loss: the official train/loss_mean (test_parity.py's tolerance), and our own loss
  # computed outside the step.
  np.testing.assert_allclose(float(run["m1"]["train/loss"]), float(ref["train/loss_mean"]),
                             rtol=3e-6)
  np.testing.assert_allclose(float(run["m1"]["train/loss"]), float(run["ref_loss1"]), rtol=1e-6)
  # The step's other metrics: the official terms' means and the norm of the official gradient
  # (observed: 1.5e-7 relative).
  for name in ("mse", "vb"):
    np.testing.assert_allclose(float(run["m1"][f"train/{name}"]),
                               np.mean(np.asarray(ref[f"train/{name}"], np.float64)), rtol=1e-6)
  g_norm = np.sqrt(sum((g ** 2).sum() for g in _official(ref, "grad/")))
  np.testing.assert_allclose(float(run["m1"]["train/grad_norm"]), g_norm, rtol=1e-6)
  p0 = leaves(run["p0"])
  p1 = leaves(run["state1"].params)
  adamw1 = _official(ref, "adamw1/")
  g_ref = _official(ref, "grad/")
  g1 = leaves(run["g1"])
  moved = loose = 0
  for a, b, want, g, gr in zip(p0, p1, adamw1, g1, g_ref, strict=True):
    # AdamW's first step is -lr g / (|g| + eps): a gradient error dg moves it by
    # lr eps |dg| / (|g| + eps)^2, and our gradients agree with grad/* to 5e-5 of each tensor's
    # max |g| (test_parity.py). Where |g| is float noise (the qkv key rows) that bound exceeds
    # lr: the direction is arbitrary and only |p1 - p0| <= lr holds.
    dg = 5e-5 * np.abs(gr).max()
    atol = np.minimum(2 * LR, LR * EPS * dg / (np.abs(gr) + EPS) ** 2)
    assert_within(b, want, atol + ulp_bound(want) + UPDATE_RTOL * LR, "p1 vs adamw1")
    assert_within(b, a, LR * (1 + UPDATE_RTOL) + ulp_bound(a), "|p1 - p0| <= lr")
    loose += int((atol > 1e-3 * LR).sum())
    moved += int((b != a).sum())
    # And PyTorch's AdamW formula on our gradient, everywhere (same gradient, same rounding).
    want_np, _, _ = adamw_torch(a, g, 0.0, 0.0, 1)
    assert_within(b, want_np, ulp_bound(want_np) + UPDATE_RTOL * np.abs(want_np - a),
                  "p1 vs numpy AdamW")
  assert moved > 0.9 * sum(a.size for a in p0)
  assert loose < 0.01 * sum(a.size for a in p0), loose


def test_step_two_is_pytorch_adamw_and_the_ema(run):
  np.testing.assert_allclose(float(run["m2"]["train/loss"]), float(run["ref_loss2"]), rtol=1e-6)
  p0, p1, p2 = leaves(run["p0"]), leaves(run["state1"].params), leaves(run["state2"].params)
  e1, e2 = leaves(run["state1"].ema_params), leaves(run["state2"].ema_params)
  g1, g2 = leaves(run["g1"]), leaves(run["g2"])
  worst = 0.0
  for a, b, c, ema1, ema2, ga, gb in zip(p0, p1, p2, e1, e2, g1, g2, strict=True):
    _, m, v = adamw_torch(a, ga, 0.0, 0.0, 1)
    want, _, _ = adamw_torch(b, gb, m, v, 2)
    # Float32 rounding of p and optax's float32 bias corrections (UPDATE_RTOL).
    worst = max(worst, float((np.abs(c - want) / np.maximum(np.abs(want - b), LR / 100)).max()))
    assert_within(c, want, ulp_bound(want) + UPDATE_RTOL * np.abs(want - b), "p2 vs numpy AdamW")
    # EMA after each step, from the parameters the step produced.
    want_e1 = EMA_DECAY * a + (1.0 - EMA_DECAY) * b
    assert_within(ema1, want_e1, ulp_bound(want_e1), "EMA after step 1")
    want_e2 = EMA_DECAY * want_e1 + (1.0 - EMA_DECAY) * c
    assert_within(ema2, want_e2, ulp_bound(want_e2, 3), "EMA after step 2")
  print(f"\nstep 2 params: worst |p2 - torch formula| / max(|update|, lr / 100) = {worst:.2e}")


def test_own_label_dropout_reaches_the_model(run):
  """Without `draws`, the step drops labels itself (train mode): at class_dropout_prob = 1 only
  the null row of the label table gets a gradient, so AdamW moves it and no other row."""
  config = recipe_config(class_dropout_prob=1.0)
  model = train.build_model(config.model)
  diffusion = train.create_diffusion(config.diffusion)
  tx, schedule = ts.create_optimizer(config.optimizer)
  step = jax.jit(train.bind_train_step(config, model, diffusion, tx, schedule))
  state0, batch = run["state0"], run["batch1"]
  assert (np.asarray(batch["label"]) != NULL).all()
  new, _ = step(state0, batch, jax.random.key(3))
  table = lambda s: np.asarray(s.params["y_embedder"]["embedding_table"]["embedding"])  # noqa
  changed = np.any(table(new) != table(state0), axis=1)
  np.testing.assert_array_equal(changed, np.arange(NULL + 1) == NULL)


def test_own_draws_are_the_documented_ones():
  """Without `draws`, step k draws from fold_in(rng, k) split in four: the timesteps
  (`diffusion.sample_timesteps`, uniform: `train_step`'s own defaults), the float32 standard
  normal noise, the label-drop key and the encoder's key. At class_dropout_prob = 0 (nothing
  dropped) two steps on their own draws equal two steps fed those draws."""
  model, diffusion, tx, _, state = fresh_parts(recipe_config(class_dropout_prob=0.0))
  # `train_step` itself with its defaults, as a caller that does not bind the config gets it.
  step = jax.jit(functools.partial(train.train_step, model=model, diffusion=diffusion, tx=tx,
                                   ema_decay=EMA_DECAY))
  x = jax.random.normal(jax.random.key(2), (6, 8, 8, 4))
  batch = {"image": x, "label": jnp.arange(6, dtype=jnp.int32)}
  rng = jax.random.key(7)
  own = fed = state
  seen = []
  for k in range(2):
    k_t, k_noise, _, _ = jax.random.split(jax.random.fold_in(rng, k), 4)
    draws = {"t": dd.sample_timesteps(k_t, 6, diffusion.num_timesteps, "uniform", 0.0),
             "noise": jax.random.normal(k_noise, x.shape, jnp.float32),
             "drop": jnp.zeros(6, jnp.int32)}
    seen.append(np.asarray(draws["t"]))
    own, m_own = step(own, batch, rng)
    fed, m_fed = step(fed, batch, rng, draws=draws)
    assert int(own.step) == int(fed.step) == k + 1
    np.testing.assert_allclose(float(m_own["train/loss"]), float(m_fed["train/loss"]), rtol=1e-6)
    # Two compiled programs: their gradients differ by float rounding, which AdamW's
    # normalised update amplifies where |g| is tiny (seen: 2.6e-9); other draws move by ~lr.
    for a, b in zip(leaves(own.params) + leaves(own.ema_params),
                    leaves(fed.params) + leaves(fed.ema_params), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-2 * LR)
  assert (seen[0] != seen[1]).any()  # Each step its own timesteps.


def test_bound_step_honours_the_configs_loss_options():
  """`bind_train_step` passes the config's Min-SNR-gamma, stratified power-law timesteps and
  learning-rate schedule to the step: its loss is `training_losses` with min_snr_gamma on the
  documented own draws (computed outside the step), and its lr the schedule at the state's
  step. A config whose timestep fields are None (older config files) gets the official
  uniform timesteps."""
  config = recipe_config(class_dropout_prob=0.0)
  # gamma = 0.1 weights every t with SNR > 0.1 (t below ~480 of 1000), so the stratified
  # draws' lowest bin (t < 330 at power 0.5) is always weighted.
  config.diffusion.min_snr_gamma = 0.1
  config.diffusion.timestep_sampling, config.diffusion.timestep_power = "stratified", 0.5
  config.optimizer.warmup_steps = 4
  model, diffusion, tx, schedule, state = fresh_parts(config)
  x = jax.random.normal(jax.random.key(2), (6, 8, 8, 4))
  y = jnp.arange(6, dtype=jnp.int32)
  rng = jax.random.key(7)

  @functools.partial(jax.jit, static_argnums=2)
  def want_loss(params, k, gamma):
    k_t, k_noise, _, _ = jax.random.split(jax.random.fold_in(rng, k), 4)
    t = dd.sample_timesteps(k_t, 6, diffusion.num_timesteps, "stratified", 0.5)
    noise = jax.random.normal(k_noise, x.shape, jnp.float32)
    fn = lambda x_t, mt: model.apply({"params": params}, x_t, mt, y)  # noqa: E731
    return jnp.mean(dd.training_losses(diffusion, fn, x, t, noise, min_snr_gamma=gamma)["loss"])

  step = jax.jit(train.bind_train_step(config, model, diffusion, tx, schedule))
  for k in range(2):
    want = float(want_loss(state.params, k, 0.1))
    assert abs(want - float(want_loss(state.params, k, None))) > 1e-3 * want  # Teeth.
    state, metrics = step(state, {"image": x, "label": y}, rng)
    np.testing.assert_allclose(float(metrics["train/loss"]), want, rtol=1e-6)
    assert float(metrics["train/lr"]) == pytest.approx(LR * (k + 1) / 4, rel=1e-6)

  config.diffusion.timestep_sampling = config.diffusion.timestep_power = None
  config.diffusion.min_snr_gamma = None
  bound = train.bind_train_step(config, model, diffusion, tx, schedule)
  assert (bound.keywords["timestep_sampling"], bound.keywords["timestep_power"],
          bound.keywords["min_snr_gamma"]) == ("uniform", 0.0, None)


def test_create_optimizer_honours_every_field():
  """Away from optax's defaults (which equal the recipe's betas and eps): two steps of
  `create_optimizer` with lr 0.1, betas (0.5, 0.6), eps 1e-3, weight decay 0.1 are PyTorch's
  AdamW with those values."""
  opt = recipe_config().optimizer
  hp = dict(lr=0.1, b1=0.5, b2=0.6, eps=1e-3, wd=0.1)
  opt.learning_rate, opt.b1, opt.b2, opt.eps, opt.weight_decay = hp.values()
  tx, _ = ts.create_optimizer(opt)
  p = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
  grads = [np.array([0.3, -1.0, 2e-3, 0.5, -4.0]), np.array([-0.2, 0.7, 1e-3, 0.0, 1.0])]
  params, state = {"w": jnp.asarray(p, jnp.float32)}, tx.init({"w": jnp.zeros(5)})
  m = v = 0.0
  for k, g in enumerate(grads, 1):
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    p, m, v = adamw_torch(p, g, m, v, k, **hp)
    np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=2e-6, atol=1e-7)
