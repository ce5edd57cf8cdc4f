"""The optimiser's delayed tower start against a hand-written Adam (Kingma & Ba 2015, alg. 1)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ragjax.training import optim


def _optim_cfg(**kw):
  o = dict(learning_rate=1e-2, warmup_steps=4, schedule="linear", end_lr_fraction=0.0,
           weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_grad_norm=0.0,
           lr_multipliers=dict(query_encoder=0.5, passage_encoder=1.0, generator=1.0),
           start_steps=dict(query_encoder=6, passage_encoder=0, generator=0),
           freeze=("passage_encoder",))
  o.update(kw)
  return ml_collections.ConfigDict(o)


def _numpy_adam(grads, lrs, b1=0.9, b2=0.999, eps=1e-8):
  """Updates of Adam with bias correction on a gradient sequence, float64."""
  m = v = np.zeros_like(grads[0])
  out = []
  for n, (g, lr) in enumerate(zip(grads, lrs), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append(-lr * (m / (1 - b1 ** n)) / (np.sqrt(v / (1 - b2 ** n)) + eps))
  return out


def test_a_late_tower_starts_a_fresh_adam_with_its_own_warmup():
  """Before its start step the query tower gets zero updates; from it on, the updates are those
  of a fresh Adam whose step count starts at the start step, at the global schedule's learning
  rate times the tower's multiplier, ramped over `warmup_steps` from the start."""
  o = _optim_cfg()
  total, start, warm = 20, 6, 4
  tx, schedule = optim.make_optimizer(o, total)
  rng = np.random.default_rng(0)
  grads_t = [rng.normal(size=(3, 2)) * (1 + t) for t in range(total)]
  params = {"bi_encoder": {"query_encoder": {"w": jnp.zeros((3, 2))},
                           "passage_encoder": {"w": jnp.zeros((3, 2))}},
            "generator": {"w": jnp.zeros((3, 2))}}
  state = tx.init(params)
  got = []
  for t in range(total):
    g = {"bi_encoder": {"query_encoder": {"w": jnp.asarray(grads_t[t], jnp.float32)},
                        "passage_encoder": {"w": jnp.ones((3, 2))}},
         "generator": {"w": jnp.asarray(grads_t[t], jnp.float32)}}
    upd, state = jax.jit(tx.update)(g, state, params)
    got.append(jax.tree.map(np.asarray, upd))
  for t in range(start):
    np.testing.assert_array_equal(got[t]["bi_encoder"]["query_encoder"]["w"], 0.0)
  lrs = [float(schedule(start + n)) * 0.5 * min(1.0, (n + 1) / warm)
         for n in range(total - start)]
  want = _numpy_adam([g.astype(np.float64) for g in grads_t[start:]], lrs)
  for n, w in enumerate(want):
    np.testing.assert_allclose(got[start + n]["bi_encoder"]["query_encoder"]["w"], w,
                               rtol=2e-5, atol=1e-9)
  # A tower started at step 0 is the plain schedule's Adam from the first step.
  want_gen = _numpy_adam([g.astype(np.float64) for g in grads_t],
                         [float(schedule(t)) for t in range(total)])
  for t, w in enumerate(want_gen):
    np.testing.assert_allclose(got[t]["generator"]["w"], w, rtol=2e-5, atol=1e-9)
  for t in range(total):
    np.testing.assert_array_equal(got[t]["bi_encoder"]["passage_encoder"]["w"], 0.0)  # frozen


def test_the_late_start_without_the_fix_overshoots():
  """Why `delayed_start` exists: Adam counting from step 0 on zeroed gradients takes steps of
  2.5-5x the learning rate after a late start (the measured ratio of |update| / lr for a
  constant gradient; hand-computed from alg. 1: n = 1 after 1000 zero steps gives
  0.1 / sqrt(0.001 / (1 - 0.999**1001)) = 2.51)."""
  adam = optax.scale_by_adam()
  state = adam.init(jnp.zeros(()))
  for _ in range(1000):
    _, state = adam.update(jnp.zeros(()), state)
  u, _ = adam.update(jnp.ones(()), state)
  np.testing.assert_allclose(float(u), 0.1 / np.sqrt(0.001 / (1 - 0.999 ** 1001)), rtol=1e-4)
  fresh = optim.delayed_start(optax.scale_by_adam(), 1000)
  state = fresh.init(jnp.zeros(()))
  for _ in range(1000):
    _, state = fresh.update(jnp.zeros(()), state)
  u, _ = fresh.update(jnp.ones(()), state)
  np.testing.assert_allclose(float(u), 1.0, rtol=1e-4)  # a fresh Adam's first step: sign(g)
