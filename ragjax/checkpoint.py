"""Checkpoints that resume by themselves: an orbax `CheckpointManager` around the train state.

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, config=cfg.to_dict())
  state = ckpt.restore_or(init_fn, abstract_state)   # newest checkpoint, or a fresh init
  ckpt.save(step, state, meta={"index_version": 12})  # async; `wait()` before exiting

Each step directory holds the state (`StandardSave`, restored straight into the target
shardings of `abstract_state`, so a restore on another topology lands on the right layout) and a
JSON item `meta` (step, config fingerprint, anything the trainer adds such as the index version).
Orbax writes a step under a temporary name and renames it when complete, so a process killed
mid-save leaves no step that `latest_step` reports. A checkpoint written by an incompatible
config is refused with the keys that differ.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import orbax.checkpoint as ocp


def config_fingerprint(config: dict, keys=("model", "retriever", "generator")) -> dict:
  """The parts of a config that fix parameter shapes, with a sha256 over them."""
  part = {k: config.get(k) for k in keys if k in config}
  text = json.dumps(part, sort_keys=True, default=str)
  return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "config": part}


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into this run (incompatible config or shapes)."""


class Checkpointer:
  """Async, keep-N orbax checkpoints of one pytree `state` plus JSON metadata per step."""

  def __init__(self, directory, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               config: dict | None = None, async_save: bool = True):
    self.directory = pathlib.Path(directory).resolve()
    self.fingerprint = config_fingerprint(config or {})
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict | None = None, force: bool = False) -> bool:
    """Start saving `state` at `step` (returns at once when async). Returns whether it saved."""
    meta = {"step": int(step), "fingerprint": self.fingerprint["sha256"],
            "config": self.fingerprint["config"], **(meta or {})}
    return self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self):
    """Block until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def metadata(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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
