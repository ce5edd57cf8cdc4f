"""BM25 lexical baseline through `bm25s` (Lù 2024), Robertson & Zaragoza 2009 BM25 scoring:

  score(q, d) = sum_{t in q} IDF(t) * tf(t, d) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))
  IDF(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

in Lucene's variant (no constant (k1 + 1) factor), k1 = 1.5, b = 0.75 (bm25s defaults,
overridable). Documents are
`title text`; lower-cased, English stop words removed, no stemming.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ragjax.errors import IndexFormatError
from ragjax.retrieval.index import Index


def _bm25s():
  """`import bm25s`, whose import sets its logger to DEBUG (every index build then prints debug
  lines); it is put back to WARNING unless RAGJAX_VERBOSE (`ragjax --verbose`) is set."""
  import bm25s
  if os.environ.get("RAGJAX_VERBOSE", "") in ("", "0"):
    logging.getLogger("bm25s").setLevel(logging.WARNING)
  return bm25s


def _tokenize(texts, return_ids: bool):
  bm25s = _bm25s()
  return bm25s.tokenize(list(texts), stopwords="en", return_ids=return_ids, show_progress=False)


class BM25Index(Index):
  """Sparse lexical top-k. `build(texts [N], passage_ids, k1=, b=, method=)`; `search(queries
  as B strings, k)`."""
  kind = "bm25"

  def __init__(self, passage_ids, manifest, model):
    super().__init__(passage_ids, manifest)
    self.model = model

  @classmethod
  def _build(cls, data, passage_ids, k1: float = 1.5, b: float = 0.75, method: str = "lucene"):
    bm25s = _bm25s()
    texts = [str(t) for t in data]
    model = bm25s.BM25(k1=k1, b=b, method=method)
    model.index(_tokenize(texts, return_ids=True), show_progress=False)
    return cls(passage_ids, {"dim": None, "params": {"k1": k1, "b": b, "method": method}}, model)

  def search_rows(self, queries, k):
    if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
      raise ValueError("BM25Index.search: queries must be a list of strings")
    k = self._check_k(k)
    tokens = _tokenize(queries, return_ids=False)
    # bm25s cannot score an empty query; give it a token that is in no document.
    tokens = [t if t else ["\x00"] for t in tokens]
    rows, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=1)
    return np.asarray(scores, np.float32), np.asarray(rows, np.int64)

  def _save_files(self, directory):
    self.model.save(str(directory / "bm25"), show_progress=False)

  @classmethod
  def _load_files(cls, directory, passage_ids, manifest):
    bm25s = _bm25s()
    try:
      model = bm25s.BM25.load(str(directory / "bm25"), show_progress=False)
    except Exception as e:  # bm25s raises FileNotFoundError/JSONDecodeError/ValueError
      raise IndexFormatError(f"{directory / 'bm25'}: cannot load BM25 index: {e}") from e
    return cls(passage_ids, manifest, model)
