"""Checkpoints that resume by themselves: an orbax `CheckpointManager` around the train state.

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, config=cfg.to_dict())
  state = ckpt.restore_or(init_fn, abstract_state)   # newest checkpoint, or a fresh init
  ckpt.save(step, state, meta={"index_version": 12})  # async; `wait()` before exiting
  reader = Checkpointer.reader(workdir / "checkpoints")  # another process's checkpoints
  tower = reader.restore_subtree(step, ("params", "bi_encoder", "passage_encoder"))

Each step directory holds the state (`StandardSave`, restored straight into the target
shardings of `abstract_state`, so a restore on another topology lands on the right layout) and a
JSON item `meta` (step, config fingerprint, anything the trainer adds such as the index version).
Orbax writes a step under a temporary name and renames it when complete, so a process killed
mid-save leaves no step that `latest_step` reports. A checkpoint written by an incompatible
config is refused with the keys that differ. This class is the one owner of the format: the
trainer writes through it, and the asynchronous indexer (another process) reads the steps, their
metadata and one tower through a read-only instance.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from ragjax.errors import CheckpointError, NotFoundError


def config_fingerprint(config: dict, keys=("model", "retriever", "generator")) -> dict:
  """The parts of a config that fix parameter shapes, with a sha256 over them."""
  part = {k: config.get(k) for k in keys if k in config}
  text = json.dumps(part, sort_keys=True, default=str)
  return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "config": part}


class Checkpointer:
  """Async, keep-N orbax checkpoints of one pytree `state` plus JSON metadata per step."""

  def __init__(self, directory, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               config: dict | None = None, async_save: bool = True, read_only: bool = False):
    self.directory = pathlib.Path(directory).resolve()
    self.fingerprint = config_fingerprint(config or {})
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save,
                                           create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  @classmethod
  def reader(cls, directory) -> "Checkpointer":
    """A read-only view of checkpoints another process writes (the indexer's): it never saves
    or deletes, and `all_steps` / `latest_step` re-read the directory each call."""
    return cls(directory, read_only=True, async_save=False)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Finished checkpoint steps, ascending (a save in progress is not listed)."""
    if self.read_only:
      self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: dict | None = None, force: bool = False) -> bool:
    """Start saving `state` at `step` (returns at once when async). Returns whether it saved.

    Raises: CheckpointError on a read-only `reader()`.
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory}: opened read-only (Checkpointer.reader); not saving")
    meta = {"step": int(step), "fingerprint": self.fingerprint["sha256"],
            "config": self.fingerprint["config"], **(meta or {})}
    return self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self):
    """Block until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def metadata(self, step: int) -> dict:
    """The JSON meta saved with `step` (step, config fingerprint, index version, ...)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def saved_unix(self, step: int) -> float:
    """When `step` was finished (its directory's mtime, seconds since the epoch)."""
    return (self.directory / str(int(step))).stat().st_mtime

  def restore_subtree(self, step: int, path: tuple[str, ...]):
    """The sub-tree of the saved state at key `path` (e.g. `("params", "bi_encoder",
    "passage_encoder")`) as host numpy arrays, read alone (orbax `partial_restore`: no optimiser
    state, no other tower, no target shardings needed).

    Raises: NotFoundError when the step is gone (garbage-collected by the writer); KeyError when
    the state has no such path.
    """
    state_dir = self.directory / str(int(step)) / "state"
    if not state_dir.is_dir():
      raise NotFoundError(f"{state_dir}: no such checkpoint")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns: step metadata is one level up
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(state_dir)
    tree = getattr(tree, "item_metadata", tree)
    sub = getattr(tree, "tree", tree)
    for key in path:
      sub = sub[key]
    item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), sub)
    for key in reversed(path):
      item = {key: item}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                               partial_restore=True))
    for key in path:
      out = out[key]
    return out

  def restore(self, step: int, abstract_state):
    """`(state, meta)` of `step`, arrays placed by the shardings in `abstract_state` (a pytree of
    `jax.ShapeDtypeStruct` with `.sharding`).

    Raises:
      CheckpointError: the checkpoint's config differs in shape-defining keys.
    """
    meta = self.metadata(step)
    if meta.get("fingerprint") != self.fingerprint["sha256"]:
      ours, theirs = self.fingerprint["config"], meta.get("config", {})
      diff = _diff(theirs, ours)
      raise CheckpointError(f"{self.directory / str(step)}: written by an incompatible config; "
                            f"differs at {diff[:10]}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except ValueError as e:  # shapes or structure differ although the config matches
      raise CheckpointError(f"{self.directory / str(step)}: cannot be restored into this "
                            f"run's state: {e}") from e
    return restored["state"], meta

  def restore_or(self, init_fn, abstract_state):
    """Restore the newest checkpoint, or call `init_fn()` when there is none.

    Returns `(state, meta or None)`.
    """
    step = self.latest_step()
    if step is None:
      return init_fn(), None
    return self.restore(step, abstract_state)

  def close(self):
    if not self.read_only:
      self.manager.wait_until_finished()
    self.manager.close()


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def abstract_with_shardings(tree, shardings):
  """`jax.ShapeDtypeStruct` leaves carrying `shardings`, for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
