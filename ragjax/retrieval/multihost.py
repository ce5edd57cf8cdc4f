"""Host-path MIPS over a corpus sharded across processes: one index per process, one global top-k.

    lo, hi = process_rows(len(passages))                  # this process's contiguous 1/P
    local = ScannIndex.build(embeddings_nd[lo:hi], ids[lo:hi])
    index = ProcessShardedIndex(local, lo, num_rows=len(passages))
    scores_bk, rows_bk = index.search_rows(queries_bd, k=20)      # global rows, best first
    tokens_bkl = index.fetch_rows(token_table_nl[lo:hi], rows_bk)  # from the rows' owners

Each of the P processes of a `jax.distributed` job searches its own shard with its own index
(ScaNN, exact, BM25: any `Index`), and the P candidate lists `[B, k]` are all-gathered and merged
into the global top-k (the distributed search of Atlas `src/index.py` and of TOME, on the host
instead of in-mesh; the device path is `topk.sharded_top_k`). The merge orders by score, then by
global row, so when every local search is exact the result equals the single-process top-k with
its ties broken by lower row first, as `jax.lax.top_k` does. With ScaNN each shard is as
approximate as ScaNN is over that shard; the merge adds no error.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from ragjax.retrieval.index import Index


def shard_range(count: int, shard: int, num_shards: int) -> tuple[int, int]:
  """Rows `[lo, hi)` of shard `shard` of `num_shards` (contiguous, sizes differ by <= 1): the
  split of the indexer's `--shard i --num-shards n` workers and of `process_rows`."""
  return count * shard // num_shards, count * (shard + 1) // num_shards


def process_rows(num_rows: int, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
  """Rows `[lo, hi)` of `num_rows` that process `process_index` of `process_count` holds
  (defaults: this process of the `jax.distributed` job): contiguous, sizes differ by <= 1, the
  split of the indexer's `--shard i --num-shards P` workers (`shard_range`)."""
  i = jax.process_index() if process_index is None else int(process_index)
  p = jax.process_count() if process_count is None else int(process_count)
  return shard_range(int(num_rows), i, p)


def merge_top_k(scores_pbk: np.ndarray, rows_pbk: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """The global top-k of P candidate lists.

  Args:
    scores_pbk: `[P, B, k']` float32, each shard's best scores (`-inf` for missing candidates).
    rows_pbk: `[P, B, k']` int64, their global rows.
    k: how many to keep, `k <= P * k'`.
  Returns:
    `(scores [B, k] float32, rows [B, k] int64)`, by descending score, ties by ascending row.
  """
  p, b, kk = scores_pbk.shape
  s_bc = np.moveaxis(np.asarray(scores_pbk, np.float32), 0, 1).reshape(b, p * kk)
  r_bc = np.moveaxis(np.asarray(rows_pbk, np.int64), 0, 1).reshape(b, p * kk)
  order = np.lexsort((r_bc, -s_bc), axis=-1)[:, :k]  # last key is primary
  return np.take_along_axis(s_bc, order, 1), np.take_along_axis(r_bc, order, 1)


class ProcessShardedIndex:
  """This process's index over global rows `[lo, lo + local.count)` of a `num_rows` corpus.

  Every process of the job must call `search_rows` and `fetch_rows` together (they are
  collectives), with the same `k` and the same number of queries.
  """

  def __init__(self, local: Index, lo: int, num_rows: int):
    lo, num_rows = int(lo), int(num_rows)
    if not 0 <= lo <= lo + local.count <= num_rows:
      raise ValueError(f"ProcessShardedIndex: rows [{lo}, {lo + local.count}) are not inside "
                       f"a corpus of {num_rows}")
    self.local, self.lo, self.num_rows = local, lo, num_rows
    self.hi = lo + local.count

  def search_rows(self, queries, k: int, *, gather_queries: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The global top-k: `(scores [B, k] float32, rows [B, k] int64 into the whole corpus)`.

    `queries`: `[B, D]` float32 (dense) or B strings (BM25). By default every process passes the
    same queries (a served request, an evaluation set). With `gather_queries=True` each passes
    its own B (its part of the global batch; B equal on every process): all `[P * B]` are
    searched in every shard and each process gets the results of its own B back.

    Raises:
      ValueError: `k` not in [1, num_rows].
    """
    if not 1 <= int(k) <= self.num_rows:
      raise ValueError(f"k={k}: must be in [1, {self.num_rows}] for this sharded index")
    k = int(k)
    if gather_queries:
      if not isinstance(queries, np.ndarray) and not hasattr(queries, "shape"):
        raise ValueError("gather_queries=True needs dense [B, D] queries")
      local_q = np.asarray(queries, np.float32)
      all_q = np.asarray(multihost_utils.process_allgather(local_q, tiled=True))
    else:
      all_q = queries
    num_q = len(all_q)
    kk = min(k, self.local.count)
    if kk:
      s, r = self.local.search_rows(all_q, kk)
      s, r = np.asarray(s, np.float32), np.asarray(r, np.int64) + self.lo
    else:
      s, r = np.zeros((num_q, 0), np.float32), np.zeros((num_q, 0), np.int64)
    pad = k - kk  # a shard with fewer than k rows: -inf candidates that never win
    s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
    r = np.pad(r, ((0, 0), (0, pad)), constant_values=self.num_rows)
    s_pbk = np.asarray(multihost_utils.process_allgather(s))
    r_pbk = np.asarray(multihost_utils.process_allgather(r))
    scores, rows = merge_top_k(s_pbk.reshape(-1, num_q, k), r_pbk.reshape(-1, num_q, k), k)
    if gather_queries:
      b = len(queries)
      mine = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
      scores, rows = scores[mine], rows[mine]
    return scores, rows

  def fetch_rows(self, local_table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows of a per-process table (token ids, masks, embeddings) from whichever process owns
    them: `local_table` `[hi - lo, ...]` is this process's part, `rows` `[...]` global rows
    (the same on every process, e.g. `search_rows`'s); returns `[*rows.shape, ...]`.

    Raises:
      ValueError: `local_table` does not have this process's `hi - lo` rows, or a row outside
        `[0, num_rows)`.
    """
    local_table = np.asarray(local_table)
    if len(local_table) != self.hi - self.lo:
      raise ValueError(f"fetch_rows: local table of {len(local_table)} rows, this process holds "
                       f"{self.hi - self.lo} ([{self.lo}, {self.hi}))")
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise ValueError(f"fetch_rows: rows outside [0, {self.num_rows})")
    mine = (rows >= self.lo) & (rows < self.hi)
    out = np.zeros(rows.shape + local_table.shape[1:], local_table.dtype)
    out[mine] = local_table[rows[mine] - self.lo]
    owned = np.asarray(multihost_utils.process_allgather(mine))        # [P, ...] bool
    parts = np.asarray(multihost_utils.process_allgather(out))         # [P, ..., ...]
    owner = np.argmax(owned, axis=0)                                   # exactly one owner
    owner = owner.reshape((1,) + owner.shape + (1,) * (local_table.ndim - 1))
    return np.take_along_axis(parts, owner, axis=0)[0]
