"""Crash-safe file writes: a reader sees the old file (or directory) or the whole new one.

  with atomic_file(path) as tmp: tmp.write_bytes(...)      # fsync, then os.replace onto path
  with atomic_directory(path) as tmp: (tmp / "a").write..  # every file fsync'd, then renamed
  write_json_atomic(path, obj)

Used by every writer of published state (checkpoint-side JSON, index versions, embeddings,
configs, evaluation reports), so a process killed mid-write never leaves a half-written file
under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import time

from ragjax.errors import NotWritableError


@contextlib.contextmanager
def atomic_file(path):
  """Yield a temporary path beside `path` to write; on success fsync it and `os.replace` it onto
  `path` (readers see the old file or the whole new one, never half of it). If the body raises,
  the temporary file is removed and `path` is untouched."""
  path = pathlib.Path(path)
  fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  tmp = pathlib.Path(name)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it 0600)
    yield tmp
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _fsync(path) -> None:
  """fsync a file, or a directory (its entries: a rename into it)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _umask() -> int:
  """The process umask, read without changing it (`os.umask` sets it; racy with threads)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def write_json_atomic(path, obj) -> None:
  """Write JSON to `path` through `atomic_file` (never half-written)."""
  with atomic_file(path) as tmp:
    tmp.write_text(json.dumps(obj, indent=1))


@contextlib.contextmanager
def atomic_directory(path):
  """Yield a fresh temporary directory beside `path`; on success fsync every file in it and
  rename it to `path` (the data is on disk before the directory appears under its name).

  An existing `path` is moved aside first and deleted after the rename. If the body raises (or
  the process dies), `path` is untouched and only a `.tmp-*` sibling is left behind.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
  try:
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir() would create it (mkdtemp makes it 0700)
    yield tmp
    for f in [*tmp.rglob("*"), tmp]:  # contents, then the entries, before the name appears
      _fsync(f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if path.exists():
    old = path.parent / f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(path, old)
  os.rename(tmp, path)
  _fsync(path.parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def chmod_default(path) -> None:
  """Give a file made by `tempfile.mkstemp` (0600) the mode `open()` would have (0666 & ~umask)."""
  os.chmod(path, 0o666 & ~_umask())


def check_writable(path, what: str, subdirs=()) -> None:
  """Check, before any work starts, that `path` (a directory, existing or to be made) can be
  written: a probe file is created and removed in `path`, or in its nearest existing ancestor,
  and in each existing `subdirs` of it (so a read-only mount or a root-owned directory is caught
  for root too). `what` names the option, e.g. "--workdir".

  Raises: NotWritableError naming `what`, the path and the directory that refused.
  """
  path = pathlib.Path(path)
  probe = path
  while not probe.exists() and probe != probe.parent:
    probe = probe.parent
  if not probe.is_dir():
    raise NotWritableError(f"{what} {path}: {probe} is a file, expected a directory")
  for d in [probe] + [path / s for s in subdirs if (path / s).is_dir()]:
    try:
      fd, name = tempfile.mkstemp(dir=d, prefix=".ragjax-write-probe.")
      os.close(fd)
      os.unlink(name)
    except OSError as e:
      raise NotWritableError(f"{what} {path}: cannot write in {d} ({e.strerror}); expected a "
                             "directory this user can write") from None
