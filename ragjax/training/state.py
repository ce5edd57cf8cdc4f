"""The train state and where it lives: the mesh, abstract initialisation, shardings from the
logical axes, and materialisation straight into them.

Parameters are initialised abstractly (`jax.eval_shape`), given NamedShardings from their logical
axes (`cfg.mesh.axis_rules`), and materialised into them (pretrained towers are `device_put` into
the same shardings); the same abstract tree is the orbax restore target.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

from ragjax import config as config_lib
from ragjax import sharding as sh
from ragjax.config import TOWERS
from ragjax.errors import ConfigError
from ragjax.models.rag import RagModel, init_params


class TrainState(flax.struct.PyTreeNode):
  """`step` int32 scalar (updates applied), `params` (RAG params), `opt_state` (optax),
  `nonfinite_step` int32 scalar (first step whose loss or grad norm was not finite, -1 if none)."""
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_step: jax.Array


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
    rules = sh.check_rules(config_lib.normalized_axis_rules(cfg), mesh)
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
