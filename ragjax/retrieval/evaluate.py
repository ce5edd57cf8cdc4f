"""Retrieval evaluation: recall@k by gold passage id and by answer string (DPR top-k accuracy).

Two measures per k (Karpukhin et al. 2020, sec. 5.1, "top-k retrieval accuracy"):
  gold:   a gold passage id of the question is among the top k (when questions carry gold ids)
  answer: a top-k passage's text contains an answer (`ragjax.data.answers.has_answer`:
          SQuAD-normalised
          token run; regex search for CuratedTREC)
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ragjax.data.answers import has_answer
from ragjax.retrieval.index import ExactIndex, Index


def recall_at_k(hits_nk: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
  """Fraction of rows (queries) with a hit among their first k columns (ranked results).

  hits_nk: bool [N, K]; hits_nk[i, j] = result j of query i contains an answer. Returns
  {str(k): mean_i any(hits_nk[i, :k])} (DPR "top-k retrieval accuracy", Karpukhin et al. 2020).
  Raises: TypeError (not a bool array); ValueError (not 2-D, N == 0, a k < 1 or k > K).
  """
  hits_nk = np.asarray(hits_nk)
  if hits_nk.dtype != np.bool_:
    raise TypeError(f"hits_nk must be a bool array, got dtype {hits_nk.dtype}")
  if hits_nk.ndim != 2:
    raise ValueError(f"hits_nk must be 2-D [N, K], got shape {hits_nk.shape}")
  n, k_max = hits_nk.shape
  if n == 0:
    raise ValueError("hits_nk has no rows; recall@k is undefined")
  first_hit_n = np.where(hits_nk.any(axis=1), hits_nk.argmax(axis=1), k_max)  # [N]
  out = {}
  for k in ks:
    k = int(k)
    if not 1 <= k <= k_max:
      raise ValueError(f"k={k} outside 1..K={k_max} (hits_nk has {k_max} columns)")
    out[str(k)] = float(np.mean(first_hit_n < k))
  return out


def build_index(kind: str, passages, retriever=None, embeddings=None, batch_size: int = 64,
                progress: bool = True, **params) -> tuple[Index, dict]:
  """Build an index of `kind` ('exact', 'scann', 'bm25') over `passages`.

  Dense kinds embed the passages with `retriever` unless `embeddings [N, D]` are given.
  Returns `(index, timings)` with `embed_seconds` and `build_seconds`.
  """
  from ragjax.retrieval.bm25_index import BM25Index  # optional back-ends: imported on use
  from ragjax.retrieval.scann_index import ScannIndex
  kinds = {"exact": ExactIndex, "scann": ScannIndex, "bm25": BM25Index}
  if kind not in kinds:
    raise ValueError(f"index kind {kind!r}: expected one of {sorted(kinds)}")
  ids = [p.id for p in passages]
  timings = {"embed_seconds": 0.0}
  if kind == "bm25":
    data, encoder = [f"{p.title} {p.text}" for p in passages], {"name": "bm25"}
  else:
    if embeddings is None:
      t0 = time.perf_counter()
      with tqdm(total=len(passages), desc="embed passages", unit="psg",
                disable=not progress) as bar:
        embeddings = retriever.encode_passages([p.title for p in passages],
                                               [p.text for p in passages],
                                               batch_size=batch_size, progress=bar)
      timings["embed_seconds"] = round(time.perf_counter() - t0, 3)
    data, encoder = embeddings, retriever.identity if retriever is not None else None
  index = kinds[kind].build(data, ids, encoder=encoder, **params)
  timings["build_seconds"] = index.manifest["build_seconds"]
  return index, timings


def search_questions(index: Index, questions, k: int, retriever=None, batch_size: int = 256,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
  """Top-k rows for every question: `(scores [N, k], rows [N, k] int64, timings)`."""
  texts = [q.question for q in questions]
  t0 = time.perf_counter()
  if index.kind == "bm25":
    queries = texts
  else:
    with tqdm(total=len(texts), desc="encode questions", unit="q", disable=not progress) as bar:
      queries = retriever.encode_queries(texts, batch_size=batch_size, progress=bar)
  t1 = time.perf_counter()
  scores, rows = index.search_rows(queries, k)
  t2 = time.perf_counter()
  return scores, rows, {"encode_queries_seconds": round(t1 - t0, 3),
                        "search_seconds": round(t2 - t1, 3),
                        "queries_per_second": round(len(texts) / max(t2 - t1, 1e-9), 1)}


def recall_report(passages, questions, rows_nk: np.ndarray, ks: Sequence[int]) -> dict:
  """`{"gold": {k: r}, "answer": {k: r}}`; `gold` only when every question has gold ids."""
  rows_nk = np.asarray(rows_nk)
  out = {}
  if all(q.gold_passage_ids for q in questions):
    ids = np.asarray([p.id for p in passages], dtype=object)
    hits = np.array([np.isin(ids[r], list(q.gold_passage_ids))
                     for q, r in zip(questions, rows_nk)], dtype=bool).reshape(rows_nk.shape)
    out["gold"] = recall_at_k(hits, ks)
  hits = np.zeros(rows_nk.shape, dtype=bool)
  for i, (q, r) in enumerate(zip(questions, rows_nk)):
    for j, row in enumerate(r):
      hits[i, j] = has_answer(passages[row].text, q.answers, regex=q.answers_are_regex)
  out["answer"] = recall_at_k(hits, ks)
  return out


def evaluate_retrieval(passages, questions, retriever, index_kind: str, ks: Sequence[int],
                       batch_size: int = 64, progress: bool = True, index: Index | None = None,
                       embeddings=None, **index_params) -> dict:
  """Build (or take) an index, retrieve for every question and report recall@k and timings.

  Returns a JSON-able dict: `num_questions`, `num_passages`, `index`, `retriever`,
  `recall` (see `recall_report`, fractions in [0, 1]) and `timings` (seconds).
  Raises:
    ValueError: a k larger than the corpus, or an unknown index kind.
  """
  ks = sorted(set(int(k) for k in ks))
  if ks[-1] > len(passages):
    raise ValueError(f"k={ks[-1]} exceeds the corpus size {len(passages)}")
  timings = {}
  if index is None:
    index, timings = build_index(index_kind, passages, retriever, embeddings=embeddings,
                                 batch_size=batch_size, progress=progress, **index_params)
  _, rows, search_timings = search_questions(index, questions, ks[-1], retriever,
                                             progress=progress)
  timings.update(search_timings)
  return {
      "num_questions": len(questions),
      "num_passages": len(passages),
      "index": index.kind,
      "index_params": index.manifest.get("params"),
      "retriever": (retriever.identity if retriever is not None and index.kind != "bm25"
                    else {"name": "bm25"}),
      "recall": recall_report(passages, questions, rows, ks),
      "timings": timings,
  }
