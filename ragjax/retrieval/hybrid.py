"""Hybrid sparse + dense retrieval by reciprocal rank fusion (Cormack, Clarke & Buettcher 2009,
"Reciprocal Rank Fusion outperforms Condorcet and individual Rank Learning Methods", SIGIR):

    RRF(d) = sum_r 1 / (k + rank_r(d)),   rank_r(d) = 1 for the best result of ranking r

over the rankings r (here BM25 and the dense retriever, each C deep; a passage missing from a
ranking adds nothing), with the paper's k = 60. The fused order is by RRF, ties by the first
ranking's order. Used by the host feeders when `index.hybrid_bm25_candidates` > 0.
"""
from __future__ import annotations

import numpy as np


def reciprocal_rank_fusion(rankings: list[np.ndarray], depth: int, k: float = 60.0
                           ) -> np.ndarray:
  """Fused rows `[B, depth]` int64 of `rankings`, each `[B, C_r]` int rows best first (-1 =
  no result).

  Raises: ValueError for no rankings, rankings of different B, or a depth above the number of
  distinct rows some query has.
  """
  if not rankings:
    raise ValueError("reciprocal_rank_fusion: no rankings")
  b = rankings[0].shape[0]
  if any(r.ndim != 2 or r.shape[0] != b for r in rankings):
    raise ValueError(f"rankings must all be [B={b}, C]; got {[r.shape for r in rankings]}")
  out = np.empty((b, depth), np.int64)
  for i in range(b):
    score: dict[int, float] = {}
    first: dict[int, int] = {}
    for ranking in rankings:
      for rank, row in enumerate(ranking[i]):
        row = int(row)
        if row < 0:
          continue
        score[row] = score.get(row, 0.0) + 1.0 / (k + rank + 1)
        first.setdefault(row, len(first))
    if len(score) < depth:
      raise ValueError(f"query {i}: {len(score)} distinct rows, fewer than depth={depth}")
    out[i] = sorted(score, key=lambda r: (-score[r], first[r]))[:depth]
  return out
