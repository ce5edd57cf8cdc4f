"""The RAG trainer: `ragjax train --config FILE[:arg] --workdir DIR [--config.key=value ...]`.

One pure `train_step(state, batch, rng) -> (state, metrics)`, jitted once with explicit in/out
shardings and the state donated. Parameters are initialised abstractly (`jax.eval_shape`), given
NamedShardings from their logical axes (`cfg.mesh.axis_rules`), and materialised straight into
them (pretrained towers are `device_put` into the same shardings); the same abstract tree is the
orbax restore target. Training data is a function of (seed, step) (`ragjax.data.pipeline`), the
dropout key is `fold_in(key(seed), step)`, so a run resumed from step s computes exactly what an
uninterrupted run computes after step s.

Optimiser (Loshchilov & Hutter 2019, AdamW): global-norm clipping, then per tower (query encoder,
passage encoder, generator) Adam with decoupled weight decay on matrices (not on biases or norm
scales) and learning rate `schedule(step) * lr_multipliers[tower]`, zero before
`start_steps[tower]` (e.g. the query encoder waits until the generator reads its passages: while
it does not, the retrieval gradient p(z|x) - p(z|x,y) only rewards passages the generator
happens to prefer, and Adam turns that into full-size steps); a frozen tower gets zero
updates, no optimiser state, and no backward pass (`stop_gradient`). The schedule is linear
warm-up to `learning_rate`, then linear or cosine decay to `end_lr_fraction * learning_rate`.
Gradient accumulation scans `grad_accum_steps` micro-batches inside the step. A step whose loss
or gradient norm is not finite leaves the parameters unchanged and is recorded in
`state.nonfinite_step`; the loop then stops, naming the step and the last good checkpoint.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.linen import partitioning as nn_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from ragjax import sharding as sh
from ragjax.config import ConfigError
from ragjax.models.rag import RagModel, init_params, rag_loss
from ragjax.system import TOWERS

log = logging.getLogger("ragjax")


class TrainState(flax.struct.PyTreeNode):
  """`step` int32 scalar (updates applied), `params` (RAG params), `opt_state` (optax),
  `nonfinite_step` int32 scalar (first step whose loss or grad norm was not finite, -1 if none)."""
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_step: jax.Array


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient norm; the message names the step and the
  last good checkpoint."""


# ------------------------------------------------------------------------------ optimiser

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
    raise ConfigError(f"optim.schedule {o.schedule!r}: expected linear, cosine or constant")
  if warm <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def tower_of(path) -> str:
  """The tower ("query_encoder" | "passage_encoder" | "generator") of a RAG parameter path."""
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return "generator" if names[0] == "generator" else names[1]


def frozen_towers(o) -> frozenset:
  """`optim.freeze` as a set. Raises: ConfigError naming an unknown tower."""
  frozen = frozenset(o.freeze or ())
  unknown = sorted(frozen - set(TOWERS))
  if unknown:
    raise ConfigError(f"optim.freeze: unknown tower(s) {unknown}; expected some of {TOWERS}")
  return frozen


def make_optimizer(o, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)` for `cfg.optim` (module docstring). Raises: ConfigError."""
  schedule = learning_rate_schedule(o, total_steps)
  frozen = frozen_towers(o)
  mults = dict(o.lr_multipliers)
  unknown = sorted(set(mults) - set(TOWERS))
  if unknown:
    raise ConfigError(f"optim.lr_multipliers: unknown tower(s) {unknown}; expected {TOWERS}")
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)

  starts = dict(o.start_steps)
  unknown = sorted(set(starts) - set(TOWERS))
  if unknown:
    raise ConfigError(f"optim.start_steps: unknown tower(s) {unknown}; expected {TOWERS}")

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


def opt_state_shardings(abstract_opt, param_shardings, mesh):
  """NamedShardings for an optax state: each leaf takes the sharding of the parameter whose
  path is the longest suffix of its own path (Adam's moments mirror the parameters); leaves
  with no such parameter (counts, empty states) replicate."""
  by_path = {}
  for path, s in jax.tree_util.tree_leaves_with_path(param_shardings):
    by_path[tuple(getattr(k, "key", None) for k in path)] = s
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    names = tuple(getattr(k, "key", None) for k in path)
    for start in range(len(names)):
      s = by_path.get(names[start:])
      if s is not None and len(s.spec) <= len(leaf.shape):
        return s
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


# ------------------------------------------------------------------------------ the step

def make_train_step(model: RagModel, cfg, tx, schedule):
  """`train_step(state, batch, rng) -> (state, metrics)` (pure; jit it with shardings).

  `batch`: the step batch of `ragjax.feed` (global batch G rows). With `grad_accum_steps` A > 1
  the batch is split into A micro-batches of G/A rows (row i goes to micro-batch i mod A) whose
  gradients are averaged. Metrics: `loss` (mean token-summed NLL per example), `grad_norm`
  (before clipping), `learning_rate` (base, before tower multipliers), `finite`, and the aux of
  `rag_loss` (`retrieval_entropy`, ...).
  """
  loss_name, smoothing = cfg.model.loss, float(cfg.model.label_smoothing)
  frozen = frozen_towers(cfg.optim)
  accum = int(cfg.train.grad_accum_steps)

  def loss_fn(params, batch, rng):
    bi = {t: jax.lax.stop_gradient(p) if t in frozen else p
          for t, p in params["bi_encoder"].items()}
    gen = params["generator"]
    p = {"bi_encoder": bi,
         "generator": jax.lax.stop_gradient(gen) if "generator" in frozen else gen}
    return rag_loss(model, p, batch, loss_name, smoothing, deterministic=False, rng=rng)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  starts = {t: int(v) for t, v in dict(cfg.optim.start_steps).items() if int(v) > 0}

  def train_step(state: TrainState, batch: dict, rng):
    rng = jax.random.fold_in(rng, state.step)
    if accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      def split(x):  # [G, ...] -> [A, G/A, ...], micro-batch i = rows i, i + A, ...
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        i, mb = xs
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (l, a, g)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)))
      (loss, aux, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]),
                                           (jnp.arange(accum), micro))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    if starts:  # a tower before its start step contributes no gradient (nor to clipping)
      grads = {"bi_encoder": {t: _gate(g, state.step, starts.get(t, 0))
                              for t, g in grads["bi_encoder"].items()},
               "generator": _gate(grads["generator"], state.step, starts.get("generator", 0))}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    nonfinite = jnp.where((state.nonfinite_step < 0) & ~finite, state.step,
                          state.nonfinite_step)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              nonfinite_step=nonfinite)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "finite": finite.astype(jnp.float32), **aux}
    return new_state, metrics

  return train_step


def _gate(tree, step, start: int):
  if start <= 0:
    return tree
  on = (step >= start).astype(jnp.float32)
  return jax.tree.map(lambda g: g * on.astype(g.dtype), tree)


# --------------------------------------------------------------------------- construction

def check_batch(cfg, mesh, rules) -> None:
  """Raises ConfigError when the global batch does not split over processes, micro-batches and
  the data-parallel (batch) shards."""
  g, accum = int(cfg.train.global_batch), int(cfg.train.grad_accum_steps)
  shards = sh.batch_shards(mesh, rules)
  names = dict(rules).get(sh.BATCH)
  if accum < 1 or g % accum:
    raise ConfigError(f"train.global_batch={g} is not divisible by train.grad_accum_steps="
                      f"{accum}")
  if (g // accum) % shards:
    raise ConfigError(f"train.global_batch={g} / grad_accum_steps={accum} = {g // accum} rows "
                      f"per micro-batch is not divisible by the data-parallel size {shards} "
                      f"(mesh axes {names} of {dict(mesh.shape)})")
  if g % jax.process_count():
    raise ConfigError(f"train.global_batch={g} is not divisible by the "
                      f"{jax.process_count()} processes")


def build_mesh(cfg):
  """`(mesh, rules)` from `cfg.mesh.axes` / `cfg.mesh.axis_rules` over all devices, or the first
  `cfg.mesh.num_devices` of them (one process; tests and debugging). Raises: ConfigError."""
  try:
    n = int(cfg.mesh.num_devices)
    devices = jax.devices()[:n] if n else None
    if n and (n > jax.device_count() or jax.process_count() > 1):
      raise ValueError(f"mesh.num_devices={n}: only on one process, at most "
                       f"{jax.device_count()} devices")
    mesh = sh.make_mesh([(str(n), int(s)) for n, s in cfg.mesh.axes], devices=devices)
    rules = normalized_rules(cfg, mesh)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  return mesh, rules


class Shapes(flax.struct.PyTreeNode):
  """Abstract state, its shardings and the step batch's abstract arrays (for AOT compiles)."""
  state: Any
  state_shardings: Any = flax.struct.field(pytree_node=False)


def abstract_state(model: RagModel, tx, mesh, rules, log_fn=None) -> Shapes:
  """The abstract `TrainState` (`jax.ShapeDtypeStruct` leaves with `.sharding`)."""
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0), boxed=True))
  with jax.set_mesh(mesh):
    p_sh = sh.logical_param_shardings(boxed, mesh, rules, log=log_fn)
  from flax.core import meta
  params = meta.unbox(boxed)
  opt = jax.eval_shape(tx.init, params)
  o_sh = opt_state_shardings(opt, p_sh, mesh)
  rep = NamedSharding(mesh, PartitionSpec())
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  state = TrainState(step=scalar, params=params, opt_state=opt, nonfinite_step=scalar)
  shardings = TrainState(step=rep, params=p_sh, opt_state=o_sh, nonfinite_step=rep)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  return Shapes(abstract, shardings)


def batch_shapes(cfg, model: RagModel, mesh, rules) -> dict:
  """Abstract step batch (global shapes, batch-sharded) for `cfg` (AOT compiles, tests)."""
  g, m = int(cfg.train.global_batch), cfg.model
  closed = m.loss == "closed_book"
  k = 1 if closed else int(m.k)
  length = int(m.context_max_length)
  spec = {"query_input_ids": ((g, int(m.query_max_length)), jnp.int32),
          "query_attention_mask": ((g, int(m.query_max_length)), jnp.int32),
          "context_input_ids": ((g, k, length), jnp.int32),
          "context_attention_mask": ((g, k, length), jnp.int32),
          "labels": ((g, int(m.answer_max_length)), jnp.int32)}
  if closed:
    spec["doc_scores"] = ((g, 1), jnp.float32)
  else:
    spec["passage_embeddings"] = ((g, k, model.query_cfg.output_dim), jnp.float32)
    if m.get("reencode_passages", False):  # REALM: the live passage encoder scores them
      lp = int(cfg.retriever.passage_max_length)
      spec["passage_input_ids"] = ((g, k, lp), jnp.int32)
      spec["passage_attention_mask"] = ((g, k, lp), jnp.int32)
  return {name: jax.ShapeDtypeStruct(shape, dtype,
                                     sharding=sh.batch_sharding(mesh, rules, len(shape)))
          for name, (shape, dtype) in spec.items()}


def jit_train_step(model: RagModel, cfg, tx, schedule, shapes: Shapes, mesh, rules):
  """The jitted step: explicit in/out shardings, state donated; called under the mesh and the
  logical axis rules (which the models' activation constraints read)."""
  step = make_train_step(model, cfg, tx, schedule)
  batch_sh = {k: v.sharding for k, v in batch_shapes(cfg, model, mesh, rules).items()}
  rep = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step, in_shardings=(shapes.state_shardings, batch_sh, rep),
                   out_shardings=(shapes.state_shardings, rep), donate_argnums=0)

  def run(state, batch, rng):
    with jax.set_mesh(mesh), nn_partitioning.axis_rules(rules):
      return jitted(state, {k: batch[k] for k in batch_sh}, rng)
  run.jitted, run.batch_keys = jitted, tuple(batch_sh)
  run.lower = lambda *a: _lower(jitted, mesh, rules, *a)
  return run


def normalized_rules(cfg, mesh):
  """`cfg.mesh.axis_rules` (lists from JSON or tuples) checked against `mesh`."""
  return sh.check_rules([(l, tuple(p) if isinstance(p, (list, tuple)) else p)
                         for l, p in cfg.mesh.axis_rules], mesh)


def _lower(jitted, mesh, rules, *args):
  with jax.set_mesh(mesh), nn_partitioning.axis_rules(rules):
    return jitted.lower(*args)


def init_state(model: RagModel, tx, shapes: Shapes, host_towers: dict, seed: int) -> TrainState:
  """Materialise the state into its shardings: random towers by a jitted init with
  `out_shardings` (never on one device first), pretrained towers (`host_towers`, numpy) by
  `device_put` into the same shardings, optimiser state by a jitted `tx.init`."""
  p_sh = shapes.state_shardings.params
  need_random = any(t not in host_towers for t in TOWERS)
  params = None
  if need_random:
    params = jax.jit(lambda: init_params(model, jax.random.key(seed)), out_shardings=p_sh)()
  else:
    params = jax.tree.map(lambda x: None, p_sh)
  params = {"bi_encoder": dict(params["bi_encoder"]), "generator": params["generator"]}
  for tower, tree in host_towers.items():
    target = p_sh["generator"] if tower == "generator" else p_sh["bi_encoder"][tower]
    placed = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, target)
    if tower == "generator":
      params["generator"] = placed
    else:
      params["bi_encoder"][tower] = placed
  opt = jax.jit(tx.init, out_shardings=shapes.state_shardings.opt_state)(params)
  rep = shapes.state_shardings.step
  return TrainState(step=jax.device_put(np.int32(0), rep), params=params, opt_state=opt,
                    nonfinite_step=jax.device_put(np.int32(-1), rep))


def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def compile_for_topology(cfg, topology: str, chip: str | None = None) -> dict:
  """Ahead-of-time compile the train step of `cfg` for a TPU slice this machine does not have
  (libtpu compile-only devices, `ragjax.aot`) and return `aot.compile_report` (bytes per
  device, HBM, `fits`, FLOPs, collectives). The model comes from `system.abstract_model` (all
  towers "random" with explicit sizes): nothing is loaded, nothing allocated.

  Raises: ConfigError (mesh / batch / model config), ImportError (libtpu missing).
  """
  from ragjax import aot
  from ragjax.system import abstract_model
  try:
    mesh = aot.tpu_mesh(topology, [(str(n), int(s)) for n, s in cfg.mesh.axes], chip=chip)
    rules = normalized_rules(cfg, mesh)
  except ValueError as e:
    raise ConfigError(f"mesh on {topology}: {e}") from None
  check_batch(cfg, mesh, rules)
  model = abstract_model(cfg)
  tx, schedule = make_optimizer(cfg.optim, int(cfg.train.total_steps))
  shapes = abstract_state(model, tx, mesh, rules, log_fn=lambda _: None)
  step = jit_train_step(model, cfg, tx, schedule, shapes, mesh, rules)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=NamedSharding(mesh, PartitionSpec()))
  lowered = step.lower(shapes.state, batch_shapes(cfg, model, mesh, rules), rng)
  report = aot.compile_report(lowered)
  report.update(topology=topology, mesh=dict(mesh.shape),
                num_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(
                    shapes.state.params))))
  return report
