"""One pure `train_step(state, batch, rng) -> (state, metrics)`, jitted once with explicit in/out
shardings and the state donated.

Training data is a function of (seed, step) (`ragjax.data.pipeline`), the dropout key is
`fold_in(key(seed), step)`, so a run resumed from step s computes exactly what an uninterrupted
run computes after step s. A frozen tower gets no backward pass (`stop_gradient`). Gradient
accumulation scans `grad_accum_steps` micro-batches inside the step. A step whose loss or
gradient norm is not finite leaves the parameters unchanged and is recorded in
`state.nonfinite_step`; the loop then stops, naming the step and the last good checkpoint.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax.linen import partitioning as nn_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from ragjax import config as config_lib
from ragjax import sharding as sh
from ragjax.models.fid import fid_loss
from ragjax.models.rag import RagModel, dpr_loss, rag_loss
from ragjax.training.state import Shapes, TrainState


def make_train_step(model: RagModel, cfg, tx, schedule):
  """`train_step(state, batch, rng) -> (state, metrics)` (pure; jit it with shardings).

  `batch`: the step batch of `ragjax.system.feed` (global batch G rows). With
  `grad_accum_steps` A > 1 the batch is split into A micro-batches of G/A rows (row i goes to
  micro-batch i mod A) whose gradients are averaged. Metrics: `loss` (mean token-summed NLL per
  example), `grad_norm` (before clipping), `grad_norm_<tower>` for each trained tower (before
  clipping, after its start-step gate), `update_norm_<tower>` (the optimiser's step),
  `learning_rate` (base, before tower multipliers), `finite`, and the aux of `rag_loss`
  (`retrieval_entropy`, ...), or of `fid_loss` for `model.reader="fid"`. The reader reads the
  first `model.k` of the batch's K_r passages (`config.retrieved_k`).
  """
  loss_name, smoothing = cfg.model.loss, float(cfg.model.label_smoothing)
  frozen = config_lib.frozen_towers(cfg.optim)
  accum = int(cfg.train.grad_accum_steps)
  m = cfg.model
  retriever_kw = dict(retriever_loss=str(m.get("retriever_loss", "none")),
                      retriever_temperature=float(m.get("retriever_temperature", 1.0)),
                      target_temperature=float(m.get("target_temperature", 1.0)),
                      retriever_weight=float(m.get("retriever_loss_weight", 1.0)),
                      null_baseline=bool(m.get("retriever_null_baseline", False)),
                      in_batch_negatives=bool(m.get("retriever_in_batch_negatives", False)))
  closed = m.loss == "closed_book"
  if not closed:
    retriever_kw["reader_k"] = int(m.k)
  fid = m.get("reader", "rag") == "fid"
  rag_kw = {} if fid else {"target_evidence": str(m.get("target_evidence", "likelihood"))}

  def loss_fn(params, batch, rng):
    bi = {t: jax.lax.stop_gradient(p) if t in frozen else p
          for t, p in params["bi_encoder"].items()}
    gen = params["generator"]
    p = {"bi_encoder": bi,
         "generator": jax.lax.stop_gradient(gen) if "generator" in frozen else gen}
    if loss_name == "dpr":  # a retriever-only job (DPR eq. 2): no reader
      return dpr_loss(model, p, batch, deterministic=False, rng=rng)
    if fid:  # Fusion-in-Decoder: its own NLL over the K passages (ragjax.models.fid)
      return fid_loss(model, p, batch, smoothing, deterministic=False, rng=rng, **retriever_kw)
    return rag_loss(model, p, batch, loss_name, smoothing, deterministic=False, rng=rng,
                    **retriever_kw, **rag_kw)

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
    tower_norms = {f"grad_norm_{t}": optax.tree.norm(grads["bi_encoder"][t])
                   for t in ("query_encoder", "passage_encoder") if t not in frozen}
    if "generator" not in frozen:
      tower_norms["grad_norm_generator"] = optax.tree.norm(grads["generator"])
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    for t in ("query_encoder", "passage_encoder"):  # the step each trained tower takes
      if t not in frozen:
        tower_norms[f"update_norm_{t}"] = optax.tree.norm(updates["bi_encoder"][t])
    if "generator" not in frozen:
      tower_norms["update_norm_generator"] = optax.tree.norm(updates["generator"])
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    nonfinite = jnp.where((state.nonfinite_step < 0) & ~finite, state.step,
                          state.nonfinite_step)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              nonfinite_step=nonfinite)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "finite": finite.astype(jnp.float32), **tower_norms, **aux}
    return new_state, metrics

  return train_step


def _gate(tree, step, start: int):
  if start <= 0:
    return tree
  on = (step >= start).astype(jnp.float32)
  return jax.tree.map(lambda g: g * on.astype(g.dtype), tree)


def batch_shapes(cfg, model: RagModel, mesh, rules) -> dict:
  """Abstract step batch (global shapes, batch-sharded) for `cfg` (AOT compiles, tests)."""
  g, m = int(cfg.train.global_batch), cfg.model
  if m.loss == "dpr":
    return _dpr_batch_shapes(cfg, model, mesh, rules)
  closed = m.loss == "closed_book"
  k = config_lib.retrieved_k(m)
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
    if m.get("retriever_in_batch_negatives", False):  # which passages are the same
      spec["doc_ids"] = ((g, k), jnp.int32)
    if m.get("reencode_passages", False):  # REALM: the live passage encoder scores them
      lp = int(cfg.retriever.passage_max_length)
      spec["passage_input_ids"] = ((g, k, lp), jnp.int32)
      spec["passage_attention_mask"] = ((g, k, lp), jnp.int32)
  return {name: jax.ShapeDtypeStruct(shape, dtype,
                                     sharding=sh.batch_sharding(mesh, rules, len(shape)))
          for name, (shape, dtype) in spec.items()}


def _dpr_batch_shapes(cfg, model, mesh, rules) -> dict:
  g, m = int(cfg.train.global_batch), cfg.model
  n = int(m.dpr.hard_negatives)
  lp, dim = int(cfg.retriever.passage_max_length), model.query_cfg.output_dim
  spec = {"query_input_ids": ((g, int(m.query_max_length)), jnp.int32),
          "query_attention_mask": ((g, int(m.query_max_length)), jnp.int32),
          "positive_rows": ((g,), jnp.int32)}
  if config_lib.dpr_live_passages(cfg):
    spec.update(positive_input_ids=((g, lp), jnp.int32),
                positive_attention_mask=((g, lp), jnp.int32))
    if n:
      spec.update(passage_input_ids=((g, n, lp), jnp.int32),
                  passage_attention_mask=((g, n, lp), jnp.int32))
  else:
    spec["positive_embeddings"] = ((g, dim), jnp.float32)
    if n:
      spec["passage_embeddings"] = ((g, n, dim), jnp.float32)
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


def _lower(jitted, mesh, rules, *args):
  with jax.set_mesh(mesh), nn_partitioning.axis_rules(rules):
    return jitted.lower(*args)
