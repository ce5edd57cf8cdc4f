"""Errors raised on bad input: each names the file, line and field at fault."""
from __future__ import annotations


class DataError(ValueError):
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


class IndexFormatError(ValueError):
  """An index or embedding directory that is incomplete, corrupt, or disagrees with its caller."""


class WeightImportError(ValueError):
  """A checkpoint that cannot be imported: missing, mis-shaped or unexpected tensors, bad hash."""
