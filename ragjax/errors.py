"""The errors ragjax raises for what a user can fix; all derive from `RagjaxError`.

The CLI catches `RagjaxError` alone and prints `error: <message>` (exit status 2, no traceback;
`--debug` or `RAGJAX_DEBUG=1` shows it). Each message names the file, line, field or config key
at fault and what was expected. The classes also derive from the built-in type callers caught
before they existed (`ValueError`, `RuntimeError`, `FileNotFoundError`).
"""
from __future__ import annotations


class RagjaxError(Exception):
  """Base of every user-facing ragjax error."""


class ConfigError(RagjaxError, ValueError):
  """A config file, argument, override or value that cannot be used; the message names the key."""


class DataError(RagjaxError, ValueError):
  """Bad input data.

  The message always names where the problem is (`path`, 1-based `line` when the format has
  lines, `field` when a record is at fault) and what was expected, e.g.
  ``corpus.jsonl:17: field 'text': expected a string, got int``.
  """

  def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
    where = str(path) if path is not None else "<input>"
    if line is not None:
      where += f":{line}"
    if field is not None:
      message = f"field {field!r}: {message}"
    super().__init__(f"{where}: {message}")
    self.path, self.line, self.field = path, line, field


class IndexFormatError(RagjaxError, ValueError):
  """An index or embedding directory that is incomplete, corrupt, or disagrees with its caller."""


class WeightImportError(RagjaxError, ValueError):
  """A checkpoint that cannot be imported: missing, mis-shaped or unexpected tensors, bad hash."""


class CheckpointError(RagjaxError, ValueError):
  """A checkpoint that cannot be restored into this run (incompatible config or shapes)."""


class ExportError(RagjaxError, ValueError):
  """A model that cannot be exported (no HF class computes it, an unmapped parameter)."""


class BundleError(RagjaxError, ValueError):
  """A serving bundle that is incomplete, corrupt (a file's sha256 disagrees with the manifest)
  or of another format version."""


class NotFoundError(RagjaxError, FileNotFoundError):
  """A file or directory the command needs is absent (no checkpoint to evaluate, ...)."""


class NotWritableError(RagjaxError, PermissionError):
  """An output path (workdir, --out) that cannot be written: checked before any work starts."""


class UsageError(RagjaxError, ValueError):
  """Command-line arguments that do not fit together (e.g. neither or both of two options)."""


class NonFiniteLossError(RagjaxError, RuntimeError):
  """Training produced a non-finite loss or gradient norm; the message names the step and the
  last good checkpoint."""
