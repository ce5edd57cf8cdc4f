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
mid-save leaves no step that `latest_step` reports. Once orbax has finalised a step, a checksum
manifest (`<step>/ragjax.sha256.json`: size and sha256 of every file) is written beside it, so a
later truncation or a same-size bit flip is caught: `restore_or` (the trainer's resume) moves a
step that fails it, or that orbax cannot read, to `<step>.corrupt`, logs the file at fault and
resumes from the newest intact step; `verify` (eval, export) refuses such a step in one line. A
checkpoint written by an incompatible config is refused with the keys that differ. This class is the one owner of the format: the
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
from ragjax.fsutil import write_json_atomic

CHECKSUMS = "ragjax.sha256.json"  # in each step directory, written after orbax finalises it
log = logging.getLogger(__name__)


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
    self.async_save = async_save
    self._unsealed: list[int] = []  # saved steps still without a checksum manifest
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        async_options=(ocp.AsyncOptions(post_finalization_callback=self._seal_pending)
                       if async_save and not read_only else None))
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
    saved = self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if saved:  # orbax has waited for the previous save to finish: seal it (and, sync, this)
      self._unsealed.append(int(step))
      self._seal_pending()
    return saved

  def wait(self):
    """Block until pending async saves are on disk (and their checksum manifests written)."""
    self.manager.wait_until_finished()
    self._seal_pending(final=True)

  def _seal_pending(self, final: bool = False) -> None:
    """Write the checksum manifest of every step this process saved that orbax has finalised
    (process 0; orbax's post-finalisation callback, which can run before the step's directory
    has its final name, and `wait`, after which a step still absent was garbage-collected)."""
    if jax.process_index() != 0:
      self._unsealed = []
      return
    for step in list(self._unsealed):
      d = self.directory / str(step)
      if d.is_dir():
        if not (d / CHECKSUMS).is_file():
          write_json_atomic(d / CHECKSUMS, {"files": _file_digests(d)})
        self._unsealed.remove(step)
      elif final:
        self._unsealed.remove(step)

  def verify(self, step: int) -> None:
    """Check step `step` against its checksum manifest (every file present, same size and
    sha256). A step without one (written before it existed, or killed between orbax's
    finalisation and the manifest) passes here; `restore_or` then relies on orbax's own read.

    Raises: CheckpointError naming the file that is missing, of another size or content.
    """
    d = self.directory / str(int(step))
    manifest = d / CHECKSUMS
    if not manifest.is_file():
      return
    try:
      want = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"{manifest}: unreadable checksum manifest ({e})") from None
    for rel, (size, digest) in sorted(want.items()):
      f = d / rel
      if not f.is_file():
        raise CheckpointError(f"checkpoint {d}: {rel} is missing")
      if f.stat().st_size != size:
        raise CheckpointError(f"checkpoint {d}: {rel} has {f.stat().st_size} bytes, expected "
                              f"{size} (truncated?)")
      if _sha256(f) != digest:
        raise CheckpointError(f"checkpoint {d}: {rel}: sha256 differs from its checksum "
                              "manifest (corrupt)")

  def _set_aside(self, step: int, why: str) -> None:
    d = self.directory / str(int(step))
    dest = d.with_name(f"{step}.corrupt")
    n = 1
    while dest.exists():
      dest, n = d.with_name(f"{step}.corrupt.{n}"), n + 1
    log.error("checkpoint step %d is corrupt (%s): moved to %s; resuming from the newest "
              "intact step", step, why, dest)
    if jax.process_index() == 0:
      d.rename(dest)
    self.manager.reload()

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
    self._check_fingerprint(step, meta)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except ValueError as e:  # shapes or structure differ although the config matches
      raise CheckpointError(f"{self.directory / str(step)}: cannot be restored into this "
                            f"run's state: {e}") from e
    return restored["state"], meta

  def _check_fingerprint(self, step: int, meta: dict) -> None:
    if meta.get("fingerprint") != self.fingerprint["sha256"]:
      ours, theirs = self.fingerprint["config"], meta.get("config", {})
      diff = _diff(theirs, ours)
      raise CheckpointError(f"{self.directory / str(step)}: written by an incompatible config; "
                            f"differs at {diff[:10]}")

  def restore_or(self, init_fn, abstract_state):
    """Restore the newest intact checkpoint, or call `init_fn()` when there is none. A step that
    fails `verify`, or that orbax cannot read, is moved to `<step>.corrupt` (logged, naming the
    file or orbax's error) and the next newest is tried.

    Returns `(state, meta or None)`.
    Raises: CheckpointError when a checkpoint was written by an incompatible config.
    """
    while (step := self.latest_step()) is not None:
      try:
        self.verify(step)
      except CheckpointError as e:
        self._set_aside(step, str(e))
        continue
      # A step that passed its checksums is intact: an error reading it is not corruption and
      # is raised. One without checksums (killed before they were written) that orbax cannot
      # read is set aside.
      sealed = (self.directory / str(step) / CHECKSUMS).is_file()
      try:
        meta = self.metadata(step)
      except Exception as e:  # noqa: BLE001 (orbax: a truncated or garbled meta item)
        if sealed:
          raise
        self._set_aside(step, f"orbax could not read its meta: {_first_line(e)}")
        continue
      self._check_fingerprint(step, meta)
      try:
        return self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 (orbax/tensorstore: a truncated or garbled file)
        if sealed:
          raise
        self._set_aside(step, f"orbax could not read it: {_first_line(e)}")
    return init_fn(), None

  def close(self):
    if not self.read_only:
      self.wait()
    self.manager.close()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def _file_digests(d: pathlib.Path) -> dict:
  """`{relative path: [size, sha256]}` of every file under step directory `d`."""
  return {str(f.relative_to(d)): [f.stat().st_size, _sha256(f)]
          for f in sorted(d.rglob("*")) if f.is_file() and f.name != CHECKSUMS}


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
