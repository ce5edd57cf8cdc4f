"""Exact (or approximate) top-k MIPS on the device: chunked inner products and a running top-k.

  scores_bk, rows_bk = topk_chunked(queries_bd, corpus_nd, k=20)      # memory O(B * chunk)
  top = device_top_k(q_bd, corpus_nd, k)                              # rows, scores, vectors

Scores are inner products `q . d` (DPR eq. 1, Karpukhin et al. 2020). `device_top_k` is what the
train step's device-side retrieval and `ExactIndex` use; no gradient flows through the selection.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ragjax import sharding as sh

Array = jax.Array


def take_rows(x: jax.Array, pos_bk: jax.Array) -> jax.Array:
  """`x[b, pos[b, j], ...]`: `x` `[B, C, ...]` at positions `pos_bk` `[B, K]` along axis 1 ->
  `[B, K, ...]` (candidate rows, scores, vectors or token rows, picked alike)."""
  return jnp.take_along_axis(x, pos_bk.reshape(pos_bk.shape + (1,) * (x.ndim - 2)), 1)


def block_corpus(corpus_nd: jax.Array, chunk: int) -> jax.Array:
  """`[N, D]` -> `[ceil(N / chunk), chunk, D]`, zero-padded: the layout `topk_blocks` scans.
  Do it once per corpus (it copies the corpus), not once per search."""
  n, d = corpus_nd.shape
  chunk = int(min(chunk, n))
  num_chunks = -(-n // chunk)
  return jnp.pad(corpus_nd, ((0, num_chunks * chunk - n), (0, 0))).reshape(num_chunks, chunk, d)


def block_corpus_host(corpus_nd, chunk: int, dtype=np.float32, align: int = 64) -> np.ndarray:
  """`block_corpus`'s layout `[ceil(N / chunk), chunk, D]` built on the host, zero-padded, from
  any `[N, D]` array or memmap (read one chunk at a time), in a buffer that starts on an
  `align`-byte boundary so that `jax.device_put(..., may_alias=True)` on the CPU can use it
  without a copy. `dtype`: float32 or `jnp.bfloat16`."""
  n, d = corpus_nd.shape
  chunk = int(min(chunk, max(n, 1)))
  shape = (-(-n // chunk), chunk, d)
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.zeros(nbytes + align, np.uint8)
  start = (-raw.ctypes.data) % align
  out = raw[start:start + nbytes].view(dtype).reshape(shape)
  flat = out.reshape(-1, d)
  for s in range(0, n, chunk):
    flat[s:min(s + chunk, n)] = corpus_nd[s:s + chunk]
  return out


def topk_blocks(queries_bd: jax.Array, corpus_cnd: jax.Array, n: int, k: int,
                approximate: bool = False, recall_target: float = 0.95):
  """Top-k over a blocked corpus `[C, chunk, D]` holding `n` real rows (see `topk_chunked`)."""
  chunk = corpus_cnd.shape[1]
  kc = min(k, chunk)

  def body(carry, xs):
    best_s, best_i = carry
    block_cd, c = xs
    s_bc = jnp.einsum("bd,cd->bc", queries_bd, block_cd,
                      preferred_element_type=jnp.float32)
    rows_c = c * chunk + jnp.arange(chunk)
    s_bc = jnp.where(rows_c[None, :] < n, s_bc, -jnp.inf)
    if approximate:
      s_bk, i_bk = jax.lax.approx_max_k(s_bc, kc, recall_target=recall_target)
    else:
      s_bk, i_bk = jax.lax.top_k(s_bc, kc)
    merged_s = jnp.concatenate([best_s, s_bk], axis=1)
    merged_i = jnp.concatenate([best_i, rows_c[i_bk]], axis=1)
    top_s, pos = jax.lax.top_k(merged_s, k)
    return (top_s, jnp.take_along_axis(merged_i, pos, axis=1)), None

  b = queries_bd.shape[0]
  init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.zeros((b, k), jnp.int32))
  (scores, rows), _ = jax.lax.scan(body, init, (corpus_cnd, jnp.arange(corpus_cnd.shape[0])))
  return scores, rows


def topk_chunked(queries_bd: jax.Array, corpus_nd: jax.Array, k: int, chunk: int = 65536,
                 approximate: bool = False, recall_target: float = 0.95):
  """Exact (or approximate) MIPS top-k scanning the corpus in chunks: memory O(B * chunk).

  Scores are inner products `q . d` (DPR eq. 1). `approximate=True` uses `jax.lax.approx_max_k`
  (Chern et al. 2022, TPU-KNN) per chunk.

  Args:
    queries_bd: `[B, D]` float.
    corpus_nd: `[N, D]` float (N is padded internally to a multiple of the chunk size).
    k: neighbours per query, `k <= N`.
  Returns:
    `(scores [B, k] float32, rows [B, k] int32)`, best first.
  """
  return topk_blocks(queries_bd, block_corpus(corpus_nd, chunk), corpus_nd.shape[0], k,
                     approximate, recall_target)


class TopK(NamedTuple):
  """`doc_ids` `[B, K]` int32 (corpus rows, best first), `scores` `[B, K]` float32 (q·d),
  `embeddings` `[B, K, D]` (the corpus rows, for `RagModel.retrieve_scores`)."""
  doc_ids: Array
  scores: Array
  embeddings: Array


def device_top_k(query_bd: Array, corpus_nd: Array, k: int, *, chunk: int = 65536) -> TopK:
  """Exact MIPS top-k (DPR eq. 1) on the device holding `corpus_nd` `[N, D]` (it must fit in its
  memory; the score matrix is built `chunk` rows at a time, `topk_chunked`). Jittable with `k`
  and `chunk` static; `query_bd` `[B, D]`. No gradient flows through the selection: recompute
  scores from the live query encoder with `RagModel.retrieve_scores(.., TopK.embeddings)`.

  Raises: ValueError when k < 1, k > N or the dimensions differ.
  """
  n, d = corpus_nd.shape
  if not 1 <= k <= n:
    raise ValueError(f"device_top_k: k={k} must be in [1, N={n}]")
  if query_bd.shape[-1] != d:
    raise ValueError(f"device_top_k: queries {query_bd.shape} and corpus {corpus_nd.shape} "
                     "differ in dimension")
  scores_bk, rows_bk = topk_chunked(jax.lax.stop_gradient(query_bd), corpus_nd, k, chunk=chunk)
  return TopK(rows_bk.astype(jnp.int32), scores_bk, jnp.take(corpus_nd, rows_bk, axis=0))


def exclude_rows(rows_bm, exclude_be, k: int, *, xp=jnp):
  """Positions of the first `k` retrieved rows not in the query's exclusion list: the own-passage
  filter of joint pretraining (REALM `postprocess_candidates`, Guu et al. 2020 §3.4: a masked
  passage must not retrieve itself; Atlas `filter_results_by_id`).

  Retrieve `M = k + E` rows best first, where `E` >= the longest exclusion list: since the rows
  of one query are distinct, at least `k` survive, so an excluded row never reaches the batch.

  Args:
    rows_bm: `[B, M]` int corpus rows, best first.
    exclude_be: `[B, E]` int corpus rows to drop (-1 pads).
    k: rows to keep (static), `k <= M - E`.
    xp: `jax.numpy` (jittable) or `numpy` (host path).
  Returns:
    `[B, k]` int32 positions into `rows_bm` (order preserved): gather rows, scores, vectors.
  Raises:
    ValueError when `k > M - E` (the guarantee above would not hold).
  """
  m, e = rows_bm.shape[1], exclude_be.shape[1]
  if k > m - e:
    raise ValueError(f"exclude_rows: keeping k={k} of M={m} rows with E={e} exclusions needs "
                     f"M >= k + E")
  hit_bm = xp.any((rows_bm[:, :, None] == exclude_be[:, None, :]) & (exclude_be[:, None, :] >= 0),
                  axis=-1)
  key_bm = xp.where(hit_bm, m, 0) + xp.arange(m)[None, :]   # kept rows first, in their order
  return xp.argsort(key_bm, axis=1)[:, :k].astype(xp.int32)


def sharded_top_k(query_bd: Array, corpus_nd: Array, k: int, *, mesh, axes, num_rows: int,
                  payloads: tuple = (), chunk: int = 65536) -> tuple[TopK, tuple]:
  """Exact MIPS top-k over a corpus whose rows are sharded across devices (and hosts): each shard
  takes its local top-k, the candidates (scores, global rows, vectors, payload rows) are
  all-gathered, and a final top-k merges them (Atlas `src/index.py`'s sharded search; TOME and
  REVEAL's in-graph top-k). Equal to `device_top_k` on the whole corpus: the global top k of a
  union of shards is within the union of each shard's top k (ties broken by lower row).

  Jittable, written with `jax.shard_map`; `k`, `num_rows`, `chunk` static.

  Args:
    query_bd: `[B, D]` float queries (replicated into every shard: the all-gather of the queries).
    corpus_nd: `[S * n_local, D]` float, rows sharded over mesh `axes` (`PartitionSpec(axes,
      None)`); rows at or past `num_rows` are padding and never returned.
    k: neighbours per query, `1 <= k <= num_rows`.
    mesh: the `jax.sharding.Mesh`; `axes`: a mesh axis name or tuple (the `corpus` rule).
    num_rows: the real corpus size N.
    payloads: arrays `[S * n_local, ...]` sharded like the corpus (e.g. the passages' token
      table): each candidate's row of each is gathered on the shard that holds it, so no
      process needs the whole table.
  Returns:
    `(TopK(doc_ids [B, k] int32 global rows, scores [B, k] float32, embeddings [B, k, D]),
    tuple of payload rows [B, k, ...])`, best first, replicated.
  Raises:
    ValueError when k is outside [1, num_rows], the rows do not split evenly over the shards,
    a payload has other rows than the corpus, or the dimensions differ.
  """
  names = sh.axis_names(axes)
  shards = sh.mesh_axes_size(mesh, names)
  n_pad, d = corpus_nd.shape
  if not 1 <= k <= num_rows <= n_pad:
    raise ValueError(f"sharded_top_k: k={k} must be in [1, N={num_rows}] and N <= the corpus "
                     f"rows {n_pad}")
  if n_pad % shards:
    raise ValueError(f"sharded_top_k: {n_pad} corpus rows do not split over {shards} shards "
                     f"(mesh axes {names}); place them with `rows_on_mesh`")
  if query_bd.shape[-1] != d:
    raise ValueError(f"sharded_top_k: queries {query_bd.shape} and corpus {corpus_nd.shape} "
                     "differ in dimension")
  for p in payloads:
    if p.shape[0] != n_pad:
      raise ValueError(f"sharded_top_k: payload of {p.shape[0]} rows for {n_pad} corpus rows")
  n_local = n_pad // shards
  k_local = min(k, n_local)
  spec = P(names)

  def local(q_bd, c_nd, *p_local):
    shard = jax.lax.axis_index(names)
    first = shard * n_local
    real = jnp.clip(num_rows - first, 0, n_local)       # this shard's real rows
    blocks = block_corpus(c_nd, min(chunk, n_local))
    s_bk, r_bk = topk_blocks(q_bd, blocks, n_local, k_local)
    s_bk = jnp.where(r_bk < real, s_bk, -jnp.inf)         # padding rows never win
    emb_bkd = jnp.take(c_nd, r_bk, axis=0)
    rows_p = tuple(jnp.take(p, r_bk, axis=0) for p in p_local)
    gather = lambda x: jax.lax.all_gather(x, names, axis=1, tiled=True)   # [B, S * k_local]
    return (gather(s_bk), gather(r_bk + first), gather(emb_bkd)) + tuple(map(gather, rows_p))

  out = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec) + (spec,) * len(payloads),
                      out_specs=P(), check_vma=False)(
                          jax.lax.stop_gradient(query_bd), corpus_nd, *payloads)
  cand_s, cand_r, cand_emb, *cand_p = out
  # lower row first among equal scores, as one top_k over the whole corpus
  order = jnp.lexsort((cand_r, -cand_s), axis=-1)[:, :k]
  pick = lambda x: take_rows(x, order)
  top = TopK(pick(cand_r).astype(jnp.int32), pick(cand_s), pick(cand_emb))
  return top, tuple(map(pick, cand_p))


def rows_on_mesh(x, mesh, axes=()) -> jax.Array:
  """A per-passage array `[N, ...]` (numpy, or anything sliceable by rows such as a
  `np.load(..., mmap_mode="r")` memmap) as a global `jax.Array` with rows sharded over mesh
  `axes` (padded with zero rows to a multiple of the shards; () = replicated). Each process
  reads only the row ranges of its own devices' shards (`jax.make_array_from_callback`), so a
  memmapped corpus is paged in 1/P per process."""
  names = sh.axis_names(axes)
  shards = sh.mesh_axes_size(mesh, names)
  n = x.shape[0]
  n_pad = n + (-n % shards)
  shape = (n_pad,) + tuple(x.shape[1:])
  sharding = NamedSharding(mesh, P(names or None, *(None,) * (len(shape) - 1)))

  def rows(index):
    r = index[0]
    lo, hi = r.start or 0, n_pad if r.stop is None else r.stop
    real = np.asarray(x[min(lo, n):min(hi, n)])
    if hi - lo > real.shape[0]:
      real = np.concatenate([real, np.zeros((hi - lo - real.shape[0],) + real.shape[1:],
                                            real.dtype)])
    return real[(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback(shape, sharding, rows)
