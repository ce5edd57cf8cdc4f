"""ScaNN MIPS index on the host (Guo et al. 2020, "Accelerating Large-Scale Inference with
Anisotropic Vector Quantization"): k-means tree partitioning, anisotropic asymmetric hashing
(AH) scoring, exact re-ordering of the best candidates.

Parameters are derived from the corpus size N (each overridable through `build(**params)`):
  num_leaves            ~ sqrt(N)  (ScaNN's README: "a good starting point is sqrt(N)")
  leaves_to_search      ~ 10% of the leaves, at least 8 (or all of them when there are fewer)
  reorder_k             250, the AH candidates re-scored exactly (at least 10 * k per search)
  dims_per_block 2, anisotropic threshold 0.2  (ScaNN README defaults for dot product)
With fewer than `min_tree_size` (20,000) passages the tree is skipped: AH over every passage,
then re-ordering (ScaNN's README advises brute force below ~20k points).
"""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np

from ragjax.errors import IndexFormatError
from ragjax.retrieval.index import Index


def default_params(n: int) -> dict:
  """ScaNN parameters for a corpus of `n` passages (see the module docstring)."""
  num_leaves = max(1, int(round(math.sqrt(n))))
  return {
      "num_leaves": num_leaves,
      "leaves_to_search": num_leaves if num_leaves <= 8 else max(8, num_leaves // 10),
      "training_sample_size": min(n, 250_000),
      "dims_per_block": 2,
      "anisotropic_threshold": 0.2,
      "reorder_k": 250,
      "min_tree_size": 20_000,
      "threads": os.cpu_count() or 1,
  }


class ScannIndex(Index):
  """Approximate MIPS with ScaNN (`scann` package, no TensorFlow).

  Search-time overrides: `leaves_to_search`, `reorder_k` (set on the instance or per call).
  """
  kind = "scann"

  def __init__(self, passage_ids, manifest, searcher):
    super().__init__(passage_ids, manifest)
    self.searcher = searcher

  @classmethod
  def _build(cls, data, passage_ids, **overrides):
    from scann.scann_ops.py import scann_ops_pybind
    emb = np.ascontiguousarray(np.asarray(data, np.float32))
    n, d = emb.shape
    params = default_params(n)
    unknown = set(overrides) - set(params)
    if unknown:
      raise ValueError(f"ScannIndex.build: unknown parameters {sorted(unknown)}; known: "
                       f"{sorted(params)}")
    params.update(overrides)
    params["leaves_to_search"] = min(params["leaves_to_search"], params["num_leaves"])
    builder = scann_ops_pybind.builder(emb, min(10, n), "dot_product")
    use_tree = n >= params["min_tree_size"] and params["num_leaves"] > 1
    if use_tree:
      builder = builder.tree(num_leaves=params["num_leaves"],
                             num_leaves_to_search=params["leaves_to_search"],
                             training_sample_size=params["training_sample_size"])
    builder = builder.score_ah(params["dims_per_block"],
                               anisotropic_quantization_threshold=params["anisotropic_threshold"],
                               training_sample_size=params["training_sample_size"])
    builder = builder.reorder(params["reorder_k"]).set_n_training_threads(params["threads"])
    searcher = builder.build()
    manifest = {"dim": int(d), "params": {**params, "tree": use_tree}}
    return cls(passage_ids, manifest, searcher)

  def search_rows(self, queries, k, leaves_to_search=None, reorder_k=None):
    q = self._check_queries(queries)
    k = self._check_k(k)
    p = self.manifest["params"]
    kw = {"final_num_neighbors": k,
          "pre_reorder_num_neighbors": max(k, reorder_k or max(p["reorder_k"], 10 * k))}
    if p["tree"]:
      kw["leaves_to_search"] = leaves_to_search or p["leaves_to_search"]
    # Large batches use every core (bench/RESULTS.md: 1.3x to 1.9x the single-threaded queries/s on
    # 2 cores, depending on the search settings).
    search = (self.searcher.search_batched_parallel if len(q) >= 256
              else self.searcher.search_batched)
    rows, scores = search(q, **kw)
    rows = np.asarray(rows, np.int64)
    scores = np.asarray(scores, np.float32)
    if rows.shape[1] < k:  # ScaNN returns fewer than k when a probe sees fewer candidates
      pad = k - rows.shape[1]
      rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=0)
      scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, rows

  def _save_files(self, directory):
    (directory / "scann").mkdir()
    self.searcher.serialize(str(directory / "scann"), relative_path=True)

  @classmethod
  def _load_files(cls, directory, passage_ids, manifest):
    from scann.scann_ops.py import scann_ops_pybind
    try:
      searcher = scann_ops_pybind.load_searcher(str(pathlib.Path(directory) / "scann"))
    except Exception as e:  # scann raises RuntimeError/ValueError from C++
      raise IndexFormatError(f"{directory / 'scann'}: cannot load ScaNN searcher: {e}") from e
    if searcher.size() != len(passage_ids):
      raise IndexFormatError(f"{directory / 'scann'}: searcher holds {searcher.size()} vectors, "
                             f"manifest count is {len(passage_ids)}")
    return cls(passage_ids, manifest, searcher)
