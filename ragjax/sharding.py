"""Logical axis names, logical-to-mesh rules and mesh construction.

Models annotate parameters and activations with the logical names below; a config maps them to
mesh axes (`axis_rules`). One table, one place: a renamed axis that no rule mentions is an error
in `check_rules`, never a silent replication.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Logical axis names used by every model in ragjax.
BATCH = "batch"          # examples in the global batch
PASSAGES = "passages"    # the K retrieved passages of one example
LENGTH = "length"        # token positions
EMBED = "embed"          # model width (d_model / hidden_size)
MLP = "mlp"              # feed-forward inner width
HEADS = "heads"          # attention heads
HEAD_DIM = "head_dim"    # width of one head
VOCAB = "vocab"          # vocabulary rows
CORPUS = "corpus"        # passages of the corpus (on-device MIPS)

LOGICAL_AXES = (BATCH, PASSAGES, LENGTH, EMBED, MLP, HEADS, HEAD_DIM, VOCAB, CORPUS)

# Default rules: data + fully-sharded data parallel + tensor parallel.
DEFAULT_MESH = (("data", -1), ("fsdp", 1), ("tensor", 1))
DEFAULT_AXIS_RULES = (
    (BATCH, ("data", "fsdp")),
    (PASSAGES, None),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (HEAD_DIM, None),
    (VOCAB, "tensor"),
    (CORPUS, ("data", "fsdp")),
)


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """A GSPMD (Auto axis type) mesh from `[(name, size), ...]`; one size may be -1 (the rest).

  Raises:
    ValueError: sizes that do not multiply to the device count, or more than one -1.
  """
  devices = jax.devices() if devices is None else devices
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {list(axes)}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {list(axes)}: fixed axes ({known}) do not divide the "
                       f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(sizes),
                       devices=devices)


def check_rules(rules, mesh: Mesh | None = None):
  """Validate an `axis_rules` table: known logical names, known mesh axes, no duplicates.

  Raises:
    ValueError: naming the offending rule.
  """
  seen = set()
  for logical, physical in rules:
    if logical not in LOGICAL_AXES:
      raise ValueError(f"axis_rules: unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
    if logical in seen:
      raise ValueError(f"axis_rules: logical axis {logical!r} appears twice")
    seen.add(logical)
    if mesh is not None and physical is not None:
      for axis in (physical,) if isinstance(physical, str) else physical:
        if axis not in mesh.axis_names:
          raise ValueError(f"axis_rules: {logical!r} -> {axis!r}, but the mesh axes are "
                           f"{mesh.axis_names}")
  return tuple((l, p if p is None or isinstance(p, str) else tuple(p)) for l, p in rules)


def logical_param_shardings(abstract_boxed, mesh: Mesh, rules, log=None):
  """NamedShardings for a pytree of `nn.Partitioned` (logically annotated) abstract params.

  `abstract_boxed` is what `jax.eval_shape(model.init, ...)` returns; the result has the same
  structure as the unboxed params. A dimension that the mesh axes do not divide evenly (e.g. a
  vocabulary of 30,522 rows over 4 shards) is replicated instead, and reported through `log`
  (default: `logging.warning`) so it is never silent.
  """
  import logging

  import flax.linen as nn
  from flax.core import meta
  from jax.sharding import NamedSharding, PartitionSpec
  log = log or logging.warning
  mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), check_rules(rules, mesh))
  shapes = meta.unbox(abstract_boxed)

  def fit(path, spec, leaf):
    parts = []
    for dim, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      size = mesh_axes_size(mesh, axes)
      if size > 1 and dim % size:
        log(f"sharding: {jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dimension {dim} is not "
            f"divisible by mesh axes {axes} ({size}); replicated on that dimension")
        axes = None
      parts.append(axes)
    return NamedSharding(mesh, PartitionSpec(*parts))

  return jax.tree_util.tree_map_with_path(
      fit, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharding_summary(params, top: int = 10) -> str:
  """One screen: the largest parameters with their shapes and shardings."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  leaves.sort(key=lambda kv: -int(np.prod(kv[1].shape)))
  return "\n".join(f"{jax.tree_util.keystr(k):70s} {str(tuple(v.shape)):18s} "
                   f"{getattr(v, 'sharding', None)}" for k, v in leaves[:top])


def batch_sharding(mesh: Mesh, rules, ndim: int = 2):
  """NamedSharding of a `[batch, ...]` input: the batch axis by the rule for `batch`."""
  from jax.sharding import NamedSharding, PartitionSpec
  physical = dict(check_rules(rules, mesh)).get(BATCH)
  return NamedSharding(mesh, PartitionSpec(physical, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the `batch` rule splits a global batch on `mesh` (the data-parallel size)."""
  return mesh_axes_size(mesh, dict(check_rules(rules, mesh)).get(BATCH))


def axis_names(axes) -> tuple:
  """A mesh axis name, a tuple of them, or None -> a tuple of names (() for None)."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def mesh_axes_size(mesh: Mesh, axes) -> int:
  """Devices along `axes` (a mesh axis name, a tuple of them, or None = 1) of `mesh`."""
  return int(np.prod([mesh.shape[a] for a in axis_names(axes)]))
