"""Passages: read corpora (JSONL, DPR TSV, SQuAD JSON; plain or gzip), split documents, write JSONL.

Every reader streams records with their 1-based line number; a bad record raises `DataError`
naming file, line and field, or, with `skip_invalid=True`, is skipped and counted into `stats`.
"""
from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import pathlib
import re
import tempfile
import zlib
from typing import Any, Iterable, Iterator

from ragjax.errors import DataError

PASSAGE_FORMATS = ("jsonl", "dpr_tsv", "squad")
DEFAULT_SQUAD_PREFIX = "squad1.1-dev"
MAX_STATS_ERRORS = 5          # messages kept in stats["errors"]
_SNIFF_BYTES = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = "\ufeff"
_FIRST_KEY_RE = re.compile(r'\A\s*\{\s*"((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass(frozen=True)
class Passage:
  """One retrievable unit of text. `id` is unique within a corpus; `title` may be ""."""
  id: str
  title: str
  text: str


# ----------------------------------------------------------------------------------------------
# Reading helpers shared with `ragjax.data.qa`.

class ErrorPolicy:
  """Raise on a bad record, or (skip_invalid) count it into `stats` and go on.

  `stats` (a caller's dict, filled in place) gets "records" (records yielded), "skipped"
  (records dropped as invalid) and "errors" (the first `MAX_STATS_ERRORS` messages).
  """

  def __init__(self, skip_invalid: bool = False, stats: dict | None = None):
    self.skip_invalid = skip_invalid
    self.stats = stats if stats is not None else {}
    self.stats.setdefault("records", 0)
    self.stats.setdefault("skipped", 0)
    self.stats.setdefault("errors", [])

  def bad(self, err: DataError) -> None:
    if not self.skip_invalid:
      raise err
    self.stats["skipped"] += 1
    if len(self.stats["errors"]) < MAX_STATS_ERRORS:
      self.stats["errors"].append(str(err))

  def ok(self) -> None:
    self.stats["records"] += 1


def open_bytes(path):
  """Binary file object for `path`, gunzipped when the file starts with the gzip magic bytes.

  Raises: DataError when the file cannot be opened.
  """
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      magic = f.read(2)
  except OSError as e:
    raise DataError(f"cannot open: {e.strerror or e}", path=path) from e
  return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def head_text(path, n: int = _SNIFF_BYTES) -> str:
  """The first `n` (decompressed) bytes of `path`, decoded leniently, BOM removed (for sniffing)."""
  try:
    with open_bytes(path) as f:
      data = f.read(n)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"corrupt gzip stream: {e}", path=path) from e
  return data.decode("utf-8", errors="replace").lstrip(_BOM)


def first_json_key(head: str) -> str | None:
  """The first key of a JSON object at the start of `head`, or None."""
  m = _FIRST_KEY_RE.match(head)
  return m.group(1) if m else None


def iter_lines(path) -> Iterator[tuple[int, str | None, DataError | None]]:
  """(1-based line, text, None) per line, or (line, None, DataError) for a line that is not UTF-8.

  Lines keep their terminator. A leading BOM is dropped. A corrupt gzip stream raises DataError.
  """
  lineno = 0
  try:
    with open_bytes(path) as f:
      for lineno, raw in enumerate(f, 1):
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          yield lineno, None, DataError(
              f"invalid UTF-8 at byte {e.start} of the line ({e.reason}); expected UTF-8 text",
              path=path, line=lineno)
          continue
        if lineno == 1:
          text = text.lstrip(_BOM)
        yield lineno, text, None
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"corrupt gzip stream after line {lineno}: {e}", path=path) from e


def read_document(path) -> str:
  """The whole file as text (for single-document JSON); DataError naming the line of bad UTF-8."""
  try:
    with open_bytes(path) as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"corrupt gzip stream: {e}", path=path) from e
  try:
    return data.decode("utf-8").lstrip(_BOM)
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"invalid UTF-8 ({e.reason}); expected UTF-8 text", path=path, line=line) from e


def load_json_document(path) -> Any:
  """json.loads of the whole file; DataError with the line of a syntax error."""
  text = read_document(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path, line=e.lineno) from e


def iter_json_lines(path, policy: ErrorPolicy) -> Iterator[tuple[int, dict]]:
  """(line, object) for each non-blank line of a JSON Lines file.

  Malformed JSON, a non-object line and undecodable UTF-8 become DataErrors sent to `policy`.
  """
  for lineno, text, err in iter_lines(path):
    if err is not None:
      policy.bad(err)
      continue
    if not text.strip():
      continue
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      policy.bad(DataError(f"malformed JSON: {e.msg} (column {e.colno}); expected one JSON object "
                           "per line", path=path, line=lineno))
      continue
    if not isinstance(obj, dict):
      policy.bad(DataError(f"expected a JSON object, got {type_name(obj)}", path=path, line=lineno))
      continue
    yield lineno, obj


class _CsvLines:
  """Decoded lines for csv.reader; remembers lines that were not UTF-8 instead of stopping."""

  def __init__(self, path):
    self.bad: list[DataError] = []
    self._it = iter_lines(path)

  def __iter__(self):
    for _, text, err in self._it:
      if err is not None:
        self.bad.append(err)
        text = "\n"  # keeps csv's line count right; the row is reported through self.bad
      yield text


def iter_tsv_rows(path, policy: ErrorPolicy, *, quoting: int = csv.QUOTE_MINIMAL
                  ) -> Iterator[tuple[int, list[str]]]:
  """(first line, fields) per non-blank tab-separated row, CSV quoting as `quoting` says.

  csv's field size limit is raised to 1 GiB (long passages); csv errors go to `policy`.
  """
  csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
  lines = _CsvLines(path)
  reader = csv.reader(lines, delimiter="\t", quoting=quoting)
  while True:
    start = reader.line_num + 1
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      policy.bad(DataError(f"malformed TSV/CSV: {e}", path=path, line=start))
      continue
    if lines.bad:
      policy.bad(lines.bad[0])
      lines.bad.clear()
      continue
    if not row or row == [""]:
      continue
    yield start, row


def check_format(fmt: str | None, formats: tuple[str, ...], kind: str) -> None:
  """ValueError unless `fmt` is None or one of `formats`."""
  if fmt is not None and fmt not in formats:
    raise ValueError(f"unknown {kind} format {fmt!r}; expected one of {formats} or None")


def type_name(x) -> str:
  """JSON-ish name of a value's type, for error messages."""
  if x is None:
    return "null"
  return {bool: "bool", int: "int", float: "float", str: "string", list: "list",
          dict: "object"}.get(type(x), type(x).__name__)


def get_id(obj: dict, key: str, *, path, line, field: str | None = None) -> str:
  """obj[key] as a non-empty string id (int ids are converted); DataError otherwise."""
  field = field or key
  if key not in obj:
    raise DataError("missing; expected a string or int id", path=path, line=line, field=field)
  v = obj[key]
  if isinstance(v, int) and not isinstance(v, bool):
    return str(v)
  if not isinstance(v, str) or not v:
    raise DataError(f"expected a non-empty string or int id, got {type_name(v)} {v!r}",
                    path=path, line=line, field=field)
  return v


def get_str(obj: dict, key: str, *, path, line, default: str | None = None) -> str:
  """obj[key] as a string (`default` when missing and a default is given); DataError otherwise."""
  if key not in obj:
    if default is not None:
      return default
    raise DataError("missing; expected a string", path=path, line=line, field=key)
  v = obj[key]
  if not isinstance(v, str):
    raise DataError(f"expected a string, got {type_name(v)}", path=path, line=line, field=key)
  return v


def squad_paragraph_id(prefix: str, article: int, paragraph: int) -> str:
  """The passage id of SQuAD paragraph `paragraph` (0-based) of article `article` (0-based)."""
  return f"{prefix}-{article:03d}-{paragraph:03d}"


def squad_articles(path) -> list:
  """The `data` list of a SQuAD JSON file; DataError when the document is not SQuAD-shaped."""
  doc = load_json_document(path)
  if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
    raise DataError(f"expected a SQuAD object with a 'data' list, got {type_name(doc)}",
                    path=path, field="data")
  return doc["data"]


# ----------------------------------------------------------------------------------------------
# Corpus readers.

def detect_passage_format(path) -> str:
  """'squad' | 'jsonl' | 'dpr_tsv', from the first bytes, else the file name.

  Rules: first non-blank char `{` -> 'squad' when the first key is "data" or "version", else
  'jsonl'; any other content -> 'dpr_tsv'. An empty file goes by name (.tsv -> 'dpr_tsv',
  .json -> 'squad', else 'jsonl').
  """
  head = head_text(path).lstrip()
  if head.startswith("{"):
    return "squad" if first_json_key(head) in ("data", "version") else "jsonl"
  if head:
    return "dpr_tsv"
  name = pathlib.Path(path).name.lower().removesuffix(".gz")
  return "dpr_tsv" if name.endswith(".tsv") else "squad" if name.endswith(".json") else "jsonl"


def _jsonl_passages(path, policy) -> Iterator[tuple[int | None, Passage]]:
  for line, obj in iter_json_lines(path, policy):
    try:
      p = Passage(id=get_id(obj, "id", path=path, line=line),
                  title=get_str(obj, "title", path=path, line=line, default=""),
                  text=get_str(obj, "text", path=path, line=line))
    except DataError as e:
      policy.bad(e)
      continue
    yield line, p


def _dpr_tsv_passages(path, policy) -> Iterator[tuple[int | None, Passage]]:
  rows = iter_tsv_rows(path, policy)
  header_line, header = next(rows, (1, None))
  if header is None:
    return
  if "id" not in header or "text" not in header:
    raise DataError("expected a header row naming the columns id<TAB>text<TAB>title, got "
                    f"{header!r}", path=path, line=header_line)
  col = {name: i for i, name in enumerate(header)}
  for line, row in rows:
    if len(row) != len(header):
      policy.bad(DataError(f"expected {len(header)} tab-separated columns "
                           f"({', '.join(header)}), got {len(row)}", path=path, line=line))
      continue
    pid = row[col["id"]]
    if not pid:
      policy.bad(DataError("expected a non-empty id", path=path, line=line, field="id"))
      continue
    title = row[col["title"]] if "title" in col else ""
    yield line, Passage(id=pid, title=title, text=row[col["text"]])


def _squad_passages(path, policy, prefix: str) -> Iterator[tuple[int | None, Passage]]:
  for a, article in enumerate(squad_articles(path)):
    where = f"data[{a}]"
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
      policy.bad(DataError("expected an object with a 'paragraphs' list", path=path,
                           field=f"{where}.paragraphs"))
      continue
    title = article.get("title", "")
    if not isinstance(title, str):
      policy.bad(DataError(f"expected a string, got {type_name(title)}", path=path,
                           field=f"{where}.title"))
      continue
    for p, para in enumerate(article["paragraphs"]):
      context = para.get("context") if isinstance(para, dict) else None
      if not isinstance(context, str):
        policy.bad(DataError(f"expected a string, got {type_name(context)}", path=path,
                             field=f"{where}.paragraphs[{p}].context"))
        continue
      yield None, Passage(id=squad_paragraph_id(prefix, a, p), title=title, text=context)


def _iter_passages(path, fmt, policy: ErrorPolicy, *, squad_prefix: str, unique: bool
                   ) -> Iterator[Passage]:
  fmt = fmt or detect_passage_format(path)
  if fmt == "squad":
    records = _squad_passages(path, policy, squad_prefix)
  else:
    records = (_jsonl_passages if fmt == "jsonl" else _dpr_tsv_passages)(path, policy)
  yield from checked_records(records, path, policy, kind="passage", unique=unique)


def checked_records(records, path, policy: ErrorPolicy, *, kind: str, unique: bool):
  """Yield the records of `(line, record)` pairs, counting them into `policy`; with `unique`, a
  repeated `record.id` is a `DataError` naming both lines (or skipped and counted)."""
  first_line: dict[str, int | None] = {}
  for line, rec in records:
    if unique:
      if rec.id in first_line:
        seen = first_line[rec.id]
        first = f" (first at line {seen})" if seen is not None else ""
        policy.bad(DataError(f"duplicate {kind} id {rec.id!r}{first}; expected unique ids",
                             path=path, line=line, field="id"))
        continue
      first_line[rec.id] = line
    policy.ok()
    yield rec


def iter_passages(path, fmt: str | None = None, *, skip_invalid: bool = False,
                  stats: dict | None = None,
                  squad_prefix: str = DEFAULT_SQUAD_PREFIX) -> Iterator[Passage]:
  """Stream the passages of a corpus file (plain or gzip, detected by its magic bytes).

  Args:
    path: the corpus file.
    fmt: 'jsonl' (lines `{"id": str|int, "title"?: str, "text": str}`), 'dpr_tsv' (DPR
      psgs_w100.tsv: header `id<TAB>text<TAB>title`, CSV-quoted), or 'squad' (SQuAD v1.1 JSON,
      one passage per paragraph, id `f"{squad_prefix}-{article:03d}-{paragraph:03d}"`, title =
      article title). None: `detect_passage_format`.
    skip_invalid: skip bad records (counted into `stats`) instead of raising.
    stats: optional dict filled in place with "records", "skipped", "errors".
    squad_prefix: id prefix for 'squad'.
  Returns:
    A lazy iterator over Passage, in file order (file errors surface while iterating). Duplicate
    ids are not checked here (see `read_passages`).
  Raises:
    DataError naming file, line and field: malformed JSON, a missing or wrongly-typed field,
      undecodable UTF-8, a wrong TSV column count, a corrupt gzip stream, a missing TSV header.
    ValueError: unknown `fmt`.
  """
  check_format(fmt, PASSAGE_FORMATS, "passage")
  return _iter_passages(path, fmt, ErrorPolicy(skip_invalid, stats), squad_prefix=squad_prefix,
                        unique=False)


def read_passages(path, fmt: str | None = None, *, skip_invalid: bool = False,
                  stats: dict | None = None,
                  squad_prefix: str = DEFAULT_SQUAD_PREFIX) -> list[Passage]:
  """All passages of a corpus file, as `iter_passages`, and also rejecting duplicate ids.

  Returns:
    list[Passage], in file order.
  Raises:
    DataError: everything `iter_passages` raises; a duplicate id (naming both lines; skipped and
      counted with `skip_invalid`); an empty corpus (always, even with `skip_invalid`).
  """
  check_format(fmt, PASSAGE_FORMATS, "passage")
  policy = ErrorPolicy(skip_invalid, stats)
  out = list(_iter_passages(path, fmt, policy, squad_prefix=squad_prefix, unique=True))
  if not out:
    raise DataError(f"empty corpus: no passages ({policy.stats['skipped']} invalid records "
                    "skipped); expected at least one", path=path)
  return out


# ----------------------------------------------------------------------------------------------
# Building and writing corpora.

def split_document(doc_id: str, title: str, text: str, words_per_passage: int = 100
                   ) -> list[Passage]:
  """Split a document into DPR-style passages of `words_per_passage` whitespace-separated words.

  Source: DPR (Karpukhin et al., 2020, sec. 4.1) splits Wikipedia articles into disjoint
  100-word blocks and prepends the title to each. Here the title is kept on every passage, ids
  are `f"{doc_id}-{i}"` (i = 0, 1, ...), words are joined with single spaces, and the last
  passage may be shorter. No word is lost: the passages' words, concatenated, are `text.split()`.

  Returns:
    list[Passage]; empty when `text` has no words.
  Raises:
    ValueError: `words_per_passage < 1`.
  """
  if words_per_passage < 1:
    raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")
  words = text.split()
  return [Passage(id=f"{doc_id}-{i}", title=title,
                  text=" ".join(words[start:start + words_per_passage]))
          for i, start in enumerate(range(0, len(words), words_per_passage))]


def write_passages_jsonl(passages: Iterable[Passage], path) -> int:
  """Write passages as JSON Lines `{"id", "title", "text"}`, gzip when `path` ends in .gz.

  Atomic: writes a temporary file in the same folder, then `os.replace`s it onto `path`, so a
  reader never sees a partial file. Returns the number of passages written.

  Raises:
    TypeError: an item that is not a Passage (nothing is written).
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  n = 0
  try:
    with os.fdopen(fd, "wb") as raw:
      out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.name.endswith(".gz") else raw
      for p in passages:
        if not isinstance(p, Passage):
          raise TypeError(f"expected Passage, got {type(p).__name__}")
        rec = {"id": p.id, "title": p.title, "text": p.text}
        out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        n += 1
      if out is not raw:
        out.close()
      raw.flush()
      os.fsync(raw.fileno())
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return n
