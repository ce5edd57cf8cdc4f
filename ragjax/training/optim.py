"""The optimiser of a RAG run: AdamW per tower with warm-up, decay, multipliers, start steps.

Loshchilov & Hutter 2019 (AdamW): global-norm clipping, then per tower (query encoder, passage
encoder, generator) Adam with decoupled weight decay on matrices (not on biases or norm scales)
and learning rate `schedule(step) * lr_multipliers[tower]`, zero before `start_steps[tower]` (e.g.
the query encoder waits until the generator reads its passages: while it does not, the retrieval
gradient p(z|x) - p(z|x,y) only rewards passages the generator happens to prefer, and Adam turns
that into full-size steps); a frozen tower gets zero updates and no optimiser state. The
schedule is linear warm-up to `learning_rate`, then linear or cosine decay to
`end_lr_fraction * learning_rate`.
"""
from __future__ import annotations

import jax
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


def make_optimizer(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)` for `cfg.optim` (module docstring). Raises: ConfigError."""
  schedule = learning_rate_schedule(o, total_steps)
  frozen = config_lib.frozen_towers(o)
  mults = dict(o.lr_multipliers)
  config_lib.towers(mults, "optim.lr_multipliers")
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)

  starts = dict(o.start_steps)
  config_lib.towers(starts, "optim.start_steps")

  def adamw(mult: float, start: int):
    return optax.chain(
        optax.scale_by_adam(float(o.b1), float(o.b2), float(o.eps)),
        optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask),
        optax.scale_by_learning_rate(lambda s: schedule(s) * mult * (s >= start)))

  groups = {t: optax.set_to_zero() if t in frozen
            else adamw(float(mults.get(t, 1.0)), int(starts.get(t, 0))) for t in TOWERS}
  labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: tower_of(p), params)
  clip = float(o.clip_grad_norm)
  tx = optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
                   optax.multi_transform(groups, labels))
  return tx, schedule
