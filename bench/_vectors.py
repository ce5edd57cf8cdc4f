"""Synthetic embedding corpora for the MIPS benchmarks, and their exact top-k and recall@k.

Vectors are `--clusters` Gaussian centres on the unit sphere plus N(0, noise^2) per dimension,
L2-normalised (seeded): clustered like real passage embeddings, so partitioning indexes (ScaNN's
tree, HNSW) face a realistic case. `args` of `make_data` needs `seed, clusters, dim,
num_vectors, num_queries, noise`.
"""
from __future__ import annotations

import numpy as np


def clustered(rng, centres_cd: np.ndarray, n: int, noise: float, chunk: int = 65536
              ) -> np.ndarray:
  """`[n, D]` float32: a random centre + N(0, noise^2) per dimension, L2-normalised."""
  out_nd = np.empty((n, centres_cd.shape[1]), np.float32)
  for s in range(0, n, chunk):
    m = min(chunk, n - s)
    x_md = centres_cd[rng.integers(len(centres_cd), size=m)]
    x_md += noise * rng.standard_normal(x_md.shape, dtype=np.float32)
    x_md /= np.linalg.norm(x_md, axis=1, keepdims=True)
    out_nd[s:s + m] = x_md
  return out_nd


def make_data(args) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(args.seed)
  centres_cd = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
  centres_cd /= np.linalg.norm(centres_cd, axis=1, keepdims=True)
  data_nd = clustered(rng, centres_cd, args.num_vectors, args.noise)
  queries_qd = clustered(rng, centres_cd, args.num_queries, args.noise)
  return data_nd, queries_qd


def numpy_topk(data_nd, queries_qd, k: int, chunk: int = 131072) -> np.ndarray:
  """Exact top-k rows `[Q, k]` (best first) by chunked matmul + argpartition."""
  q = len(queries_qd)
  best_s = np.full((q, k), -np.inf, np.float32)
  best_i = np.zeros((q, k), np.int64)
  for s in range(0, len(data_nd), chunk):
    sc_qc = queries_qd @ data_nd[s:s + chunk].T
    kk = min(k, sc_qc.shape[1])
    idx_qk = np.argpartition(-sc_qc, kk - 1, axis=1)[:, :kk]
    cand_s = np.concatenate([best_s, np.take_along_axis(sc_qc, idx_qk, 1)], axis=1)
    cand_i = np.concatenate([best_i, idx_qk + s], axis=1)
    top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
    best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
  return best_i


def recall(rows_qk: np.ndarray, truth_qk: np.ndarray) -> float:
  """recall@k: the fraction of the true top-k found in the returned k."""
  hits = (rows_qk[:, :, None] == truth_qk[:, None, :]).any(axis=2)
  return float(hits.mean())
