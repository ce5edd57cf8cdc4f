"""The optimiser of a RAG run: AdamW per tower with warm-up, decay, multipliers, start steps.

Loshchilov & Hutter 2019 (AdamW): global-norm clipping, then per tower (query encoder, passage
encoder, generator) Adam with decoupled weight decay on matrices (not on biases or norm scales)
and learning rate `schedule(step) * lr_multipliers[tower]`, zero before `start_steps[tower]`, from
which the tower's Adam starts fresh and warms up over `warmup_steps` again (`delayed_start`; e.g.
the query encoder waits until the generator reads its passages: while it does not, the retrieval
gradient p(z|x) - p(z|x,y) only rewards passages the generator happens to prefer, and Adam turns
that into full-size steps); a frozen tower gets zero updates and no optimiser state. The
schedule is linear warm-up to `learning_rate`, then linear or cosine decay to
`end_lr_fraction * learning_rate`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ragjax import config as config_lib
from ragjax.config import TOWERS
from ragjax.errors import ConfigError


def learning_rate_schedule(o, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `o.warmup_steps` to `o.learning_rate`, then `o.schedule` decay
  ("linear" | "cosine" | "constant") to `o.end_lr_fraction * o.learning_rate` at `total_steps`.

  Raises: ConfigError for an unknown schedule.
  """
  lr, warm = float(o.learning_rate), int(o.warmup_steps)
  rest = max(int(total_steps) - warm, 1)
  end = lr * float(o.end_lr_fraction)
  if o.schedule == "linear":
    decay = optax.linear_schedule(lr, end, rest)
  elif o.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, rest, alpha=float(o.end_lr_fraction))
  elif o.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ConfigError(f"optim.schedule {o.schedule!r}: expected one of {config_lib.LR_SCHEDULES}")
  if warm <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def tower_of(path) -> str:
  """The tower ("query_encoder" | "passage_encoder" | "generator") of a RAG parameter path."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return "generator" if names[0] == "generator" else names[1]


class DelayedStartState(NamedTuple):
  count: jax.Array   # int32 scalar: updates seen, including those before the start
  inner: Any         # the wrapped transformation's state, untouched before the start


def delayed_start(inner: optax.GradientTransformation, start: int
                  ) -> optax.GradientTransformation:
  """`inner` switched on at update `start`: zero updates before it, and `inner`'s state (Adam's
  moments and its step count) neither updated nor counted before it, so at `start` it begins as
  if freshly initialised.

  Why: a tower whose Adam runs from step 0 on zeroed gradients reaches its start step with
  count = start but moments that hold only the gradients seen since. Adam's bias correction
  (Kingma & Ba 2015, alg. 1: m / (1 - b1^t), v / (1 - b2^t)) then divides v by 1 - b2^start
  instead of 1 - b2^n (n = updates since the start): with b2 = 0.999 and start = 1000 the first
  updates are 2.5-5x the learning rate (n = 1: 2.5x, n = 10: 5.2x, n = 200: 1.9x; the ratio
  m / sqrt(v) for a constant gradient). `inner` must be a pure function of its state (no
  randomness).
  """
  start = int(start)

  def init(params):
    return DelayedStartState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    on = state.count >= start
    updates = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(lambda n, o: jnp.where(on, n, o), new_inner, state.inner)
    return updates, DelayedStartState(state.count + 1, inner_state)

  return optax.GradientTransformation(init, update)


def make_optimizer(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)` for `cfg.optim` (module docstring). Raises: ConfigError."""
  schedule = learning_rate_schedule(o, total_steps)
  frozen = config_lib.frozen_towers(o)
  mults = dict(o.lr_multipliers)
  config_lib.towers(mults, "optim.lr_multipliers")
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)

  starts = dict(o.start_steps)
  config_lib.towers(starts, "optim.start_steps")

  warm = int(o.warmup_steps)

  def adamw(mult: float, start: int):
    if start <= 0:
      return optax.chain(
          optax.scale_by_adam(float(o.b1), float(o.b2), float(o.eps)),
          optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask),
          optax.scale_by_learning_rate(lambda s: schedule(s) * mult))
    # A tower that starts late gets a fresh Adam at its start step (moments and bias correction
    # count from there) and its own warm-up to the global schedule's value (`s` counts the
    # tower's own updates; the global step is `start + s`).
    ramp = (lambda s: jnp.minimum(1.0, (s + 1) / warm)) if warm > 0 else (lambda s: 1.0)
    return delayed_start(optax.chain(
        optax.scale_by_adam(float(o.b1), float(o.b2), float(o.eps)),
        optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask),
        optax.scale_by_learning_rate(lambda s: schedule(s + start) * mult * ramp(s))), start)

  groups = {t: optax.set_to_zero() if t in frozen
            else adamw(float(mults.get(t, 1.0)), int(starts.get(t, 0))) for t in TOWERS}
  labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: tower_of(p), params)
  clip = float(o.clip_grad_norm)
  tx = optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
                   optax.multi_transform(groups, labels))
  return tx, schedule
