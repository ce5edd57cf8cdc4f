"""Retrieval feeding the train step: questions in, the step's global batch out.

Two ways behind one interface (`Feeder`), chosen by `cfg.index.kind` ("auto" picks by size):

* `device` (`DeviceFeeder`): the passage embeddings `[N, D]` and the token tables live on the
  mesh, rows sharded over the `corpus` rule's axes (padded to a multiple of the shards) or
  replicated when it maps to none; one jitted `retrieve` encodes the queries with the live
  query encoder, takes the exact top-k (each shard's own top-k merged into the global one,
  `topk.sharded_top_k`, each row's tokens gathered on its shard; `device_top_k` unsharded) and
  assembles the generator inputs `[B, K, L]` without leaving the device.
* `scann` / `exact_host` (`HostFeeder`): the queries are encoded on the device (live query
  encoder), gathered to the host, searched with ScaNN (`ragjax.retrieval.scann_index`) or the
  exact index, and each process assembles its rows of the generator inputs with numpy before
  `jax.make_array_from_process_local_data`.

Either way the train step sees the same static-shape batch: `query_input_ids` /
`query_attention_mask` `[B, Lq]`, `passage_embeddings` `[B, K, D]`, `context_input_ids` /
`context_attention_mask` `[B, K, L]`, `labels` `[B, T]` (closed_book: `doc_scores` `[B, 1]` and
the question alone as the context). With `model.reencode_passages` (joint training, REALM
§3.4) the batch also carries the retrieved passages' retriever tokens `passage_input_ids` /
`passage_attention_mask` `[B, K, Lp]` (`Lp = retriever.passage_max_length`), which the step
re-encodes with the live passage encoder. Indexes can be swapped (`set_corpus`) without
recompiling. Questions with `exclude_passage_ids` (joint pretraining) never retrieve those
passages: the search runs E rows deeper and `topk.exclude_rows` drops them in the same jit.
"""
from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from ragjax import config as config_lib
from ragjax import sharding as sh
from ragjax.data import pipeline
from ragjax.models.rag import RagModel
from ragjax.retrieval.hybrid import reciprocal_rank_fusion
from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.scann_index import ScannIndex
from ragjax.retrieval.topk import (device_top_k, exclude_rows, rows_on_mesh, sharded_top_k,
                                   take_rows)
from ragjax.system.build import RagSystem
from ragjax.system.inputs import assemble_contexts, assemble_gathered

log = logging.getLogger("ragjax")
STEP_KEYS = ("query_input_ids", "query_attention_mask", "passage_embeddings",
             "context_input_ids", "context_attention_mask", "labels")


def choose_index_kind(kind: str, num_passages: int, dim: int, device_max_bytes: int) -> str:
  """`device` when the float32 embeddings `[N, D]` fit in `device_max_bytes`, else `scann`; a
  kind other than `auto` (checked by `ragjax.config.validate`) is returned as it is."""
  if kind != "auto":
    return kind
  return "device" if num_passages * dim * 4 <= device_max_bytes else "scann"


class Feeder:
  """Builds global step batches from questions (see the module docstring).

  `Feeder(system, mesh, rules, kind)` returns a `DeviceFeeder` for `kind == "device"` and a
  `HostFeeder` otherwise; `kind` is the resolved index kind. The settings that shape a batch
  (K, candidates C, re-encoding, pad id, chunk) are resolved once here. `set_corpus(embeddings
  [N, D])` installs passage vectors (a new index version: no recompile while N and D stay).

  Raises: ValueError when `model.rerank_candidates` exceeds the corpus size.
  """

  def __new__(cls, system=None, mesh=None, rules=(), kind: str = "device"):
    if cls is Feeder:
      cls = DeviceFeeder if kind == "device" else HostFeeder
    return super().__new__(cls)

  def __init__(self, system: RagSystem, mesh, rules, kind: str):
    self.system, self.mesh, self.rules, self.kind = system, mesh, tuple(rules), kind
    self.model: RagModel = system.model
    m = system.cfg.model
    self.k = system.k
    self.pad_id = system.model.generator_cfg.pad_token_id
    self.chunk = int(system.cfg.index.chunk)
    self.reencode = bool(m.get("reencode_passages", False)) and not system.closed_book
    self.candidates = int(m.get("rerank_candidates", 0) or 0)
    if self.candidates and not self.k < self.candidates <= len(system.passages):
      raise ValueError(f"model.rerank_candidates={self.candidates}: expected K={self.k} < it <= "
                       f"{len(system.passages)} passages (0: no re-ranking)")
    # Joint pretraining: rows a query must never retrieve (its own passage or document),
    # dropped after over-retrieving E = the longest exclusion list (`topk.exclude_rows`).
    self.num_excluded = 0 if system.closed_book else max(
        (len(q.exclude_passage_ids) for q in (*system.train_questions, *system.eval_questions)),
        default=0)
    self.kept = self.candidates or self.k    # rows kept per query after the exclusion
    self.depth = self.kept + self.num_excluded  # rows searched per query
    self._row_of = None
    self.corpus = None
    self._ptables = None
    self._scores = self._encode = None
    self._gathers = {}
    self._questions = []

  # ------------------------------------------------------------------------------ shardings

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return sh.batch_sharding(self.mesh, self.rules, ndim)

  @contextlib.contextmanager
  def _mesh_context(self):
    """The mesh and logical axis rules that jitted calls (and the models' constraints) read."""
    with jax.set_mesh(self.mesh), nn_partitioning.axis_rules(self.rules):
      yield

  # ------------------------------------------------------------------------------- shared

  def passage_token_table(self) -> tuple[np.ndarray, np.ndarray]:
    """Retriever tokens of every passage, `[CLS] title [SEP] text [SEP]`: ids and mask
    `[N, Lp]` int32 (built once)."""
    if self._ptables is None:
      lp = int(self.system.cfg.retriever.passage_max_length)
      ps = self.system.passages
      tok = self.system.retriever.tokenizer.encode_passages([p.title for p in ps],
                                                            [p.text for p in ps],
                                                            max_length=lp, length=lp)
      self._ptables = (np.asarray(tok.input_ids, np.int32),
                       np.asarray(tok.attention_mask, np.int32))
    return self._ptables

  def _rerank_rows(self, params, q_bd, rows_bc, p_ids_bcl, p_mask_bcl):
    """Atlas's over-retrieve-then-rerank (Izacard et al. 2022, §2.4): C candidates from the
    (possibly stale) index are re-embedded with the live passage encoder and the top K by
    `q·d` kept: `(rows [B, K] int32, live embeddings [B, K, D] float32, positions [B, K] into
    the C candidates)`. No gradient."""
    live = jax.lax.stop_gradient(self.model.apply({"params": params}, p_ids_bcl, p_mask_bcl,
                                                  method=RagModel.encode_passages))
    scores = jnp.einsum("bd,bcd->bc", q_bd.astype(jnp.float32), live.astype(jnp.float32))
    _, j = jax.lax.top_k(scores, self.k)
    return (jnp.take_along_axis(rows_bc, j, axis=1),
            jnp.take_along_axis(live, j[..., None], axis=1).astype(jnp.float32), j)

  def _encode_fn(self):
    """Jitted live query encoder: `q_bd [B, D]`, replicated on every device."""
    if self._encode is None:
      model = self.model
      self._encode = jax.jit(
          lambda params, ids, mask: model.apply({"params": params}, ids, mask,
                                                method=RagModel.encode_query),
          out_shardings=NamedSharding(self.mesh, PartitionSpec()))
    return self._encode

  def doc_scores(self, params, batch) -> jax.Array:
    """Doc scores `[B, K]` float32 of a step batch from the live query encoder (DPR eq. 1)."""
    if self._scores is None:
      model = self.model
      self._scores = jax.jit(lambda p, q, m, e: model.apply(
          {"params": p}, q, m, e, method=RagModel.retrieve_scores))
    return self._scores(params, batch["query_input_ids"], batch["query_attention_mask"],
                        batch["passage_embeddings"])

  def local_rows(self, global_size: int) -> slice:
    """This process's rows of a global batch of `global_size`: where
    `make_array_from_process_local_data` puts its local data, i.e. the rows of the batch
    sharding's devices on this process (process order and device order may differ on real
    slices).

    Raises: ValueError when they are not one contiguous block of `global_size / processes`.
    """
    local = pipeline.local_batch_size(global_size)
    if jax.process_count() == 1:
      return slice(0, global_size)
    spans = {(i[0].start or 0, global_size if i[0].stop is None else i[0].stop)
             for i in self.batch_sharding(1).addressable_devices_indices_map(
                 (global_size,)).values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if hi - lo != local:
      raise ValueError(f"process {jax.process_index()} holds batch rows {sorted(spans)} of "
                       f"{global_size}: not one block of {local}; shard the batch over axes "
                       "that span the processes")
    return slice(lo, hi)

  def _put(self, x) -> jax.Array:
    """This process's rows `[B/P, ...]` -> the global batch-sharded array."""
    return pipeline.global_batch_arrays({"x": x}, self.batch_sharding(np.ndim(x)))["x"]

  def exclusion_rows(self, questions) -> np.ndarray:
    """`[B, E]` int32 corpus rows each question may not retrieve, -1 padded.

    Raises: KeyError naming a question whose exclusion id is not in the corpus."""
    self._rows()
    out = np.full((len(questions), self.num_excluded), -1, np.int32)
    for i, q in enumerate(questions):
      for j, pid in enumerate(q.exclude_passage_ids):
        if pid not in self._row_of:
          raise KeyError(f"question {q.id!r}: excluded passage id {pid!r} is not in the corpus")
        out[i, j] = self._row_of[pid]
    return out

  # -------------------------------------------------------------------------------- batches

  def batch(self, params, questions_local) -> dict:
    """The step batch (global `jax.Array`s, module docstring) for this process's questions
    (`global batch / process_count` of them), plus `doc_ids` `[B, K]` (corpus rows); a
    `dpr_batch` for `model.loss="dpr"`."""
    if self.system.cfg.model.loss == "dpr":
      return self.dpr_batch(params, questions_local)
    host = self.system.question_batch(questions_local)
    put = self._put
    out = dict(self._query_arrays(host, questions_local), labels=put(host["labels"]))
    if self.system.closed_book:
      ids, mask = self.system.closed_book_contexts(host)
      out.update(context_input_ids=put(ids), context_attention_mask=put(mask),
                 doc_scores=put(np.zeros((len(ids), 1), np.float32)),
                 doc_ids=put(np.full((len(ids), 1), -1, np.int32)))
      return out
    if self.corpus is None:
      raise RuntimeError("Feeder.batch: no corpus embeddings; call set_corpus first")
    if self.num_excluded:
      host["exclude_rows"] = self.exclusion_rows(questions_local)
    out.update(self._retrieve_batch(params, out, host))
    return out

  def _query_arrays(self, host: dict, questions_local) -> dict:
    self._questions = list(questions_local)  # the hybrid feeder's BM25 queries
    return {"query_input_ids": self._put(host["query_input_ids"]),
            "query_attention_mask": self._put(host["query_attention_mask"])}

  def query_batch(self, questions_local) -> dict:
    """Only the query tokens `[B, Lq]` int32 of `batch` (what `top_rows` reads)."""
    return self._query_arrays(self.system.question_batch(questions_local), questions_local)

  def dpr_batch(self, params, questions_local) -> dict:
    """A DPR step batch (`ragjax.models.rag.dpr_loss`): query tokens, each question's first
    gold passage as the positive and `model.dpr.hard_negatives` N hard negatives `[B, N]`: the
    top passages of the current index under the live query encoder (`negatives="index"`, as
    ANCE) or of BM25 (`"bm25"`, DPR §3.2), minus the question's gold passages. As tokens when
    the passage encoder trains, else the index's vectors; `doc_ids` `[B, N]` the negatives'
    rows."""
    d = self.system.cfg.model.dpr
    n = int(d.hard_negatives)
    host = self.system.question_batch(questions_local)
    put = self._put
    out = {"query_input_ids": put(host["query_input_ids"]),
           "query_attention_mask": put(host["query_attention_mask"])}
    row_of = self._rows()
    gold = [[row_of[g] for g in q.gold_passage_ids if g in row_of] for q in questions_local]
    pos = np.array([g[0] for g in gold], np.int64)
    out["positive_rows"] = put(pos.astype(np.int32))
    if n:
      depth = n + max(len(g) for g in gold)
      if d.negatives == "bm25":
        cand = self.system.bm25_top_rows(questions_local, depth)
      else:
        cand = self.top_rows(params, out, depth)[self.local_rows(len(pos) * jax.process_count())]
      neg = np.array([[r for r in c if r not in g][:n] for c, g in zip(cand, gold)], np.int64)
      out["doc_ids"] = put(neg.astype(np.int32))
    if config_lib.dpr_live_passages(self.system.cfg):
      p_ids, p_mask = self.passage_token_table()
      out.update(positive_input_ids=put(p_ids[pos]), positive_attention_mask=put(p_mask[pos]))
      if n:
        out.update(passage_input_ids=put(p_ids[neg]), passage_attention_mask=put(p_mask[neg]))
    else:
      out["positive_embeddings"] = self._corpus_rows(pos)
      if n:
        out["passage_embeddings"] = self._corpus_rows(neg)
    return out

  def _rows(self) -> dict:
    if self._row_of is None:
      self._row_of = {p.id: i for i, p in enumerate(self.system.passages)}
    return self._row_of

  def _corpus_rows(self, rows_local: np.ndarray) -> jax.Array:
    """The index's vectors of this process's rows `[B/P, ...]` -> a global batch-sharded
    `[B, ..., D]` float32 array."""
    if isinstance(self.corpus, np.ndarray):
      return self._put(self.corpus[rows_local])
    rows = self._put(rows_local.astype(np.int32))
    if rows.ndim not in self._gathers:
      self._gathers[rows.ndim] = jax.jit(lambda c, r: c[r],
                                         out_shardings=self.batch_sharding(rows.ndim + 1))
    with self._mesh_context():
      return self._gathers[rows.ndim](self.corpus, rows)

  # ------------------------------------------------------------------------- per back-end

  def set_corpus(self, embeddings_nd: np.ndarray, index=None) -> None:
    """Install the passage embeddings `[N, D]` float32 (a new index version of the same corpus:
    no recompile while N and D stay). On the host kinds `index` is a prebuilt index of them (a
    published version's ScaNN index); else one is built."""
    raise NotImplementedError

  def top_rows(self, params, batch, depth: int) -> np.ndarray:
    """Corpus rows `[B, depth]` int64 (best first, on every process) of a step batch's
    questions under the live query encoder: the same search as the batch, `depth` deep (answer
    recall@k for k beyond K)."""
    raise NotImplementedError

  def _retrieve_batch(self, params, out: dict, host: dict) -> dict:
    """The retrieval part of a batch: `passage_embeddings [B, K, D]`, `context_input_ids` /
    `context_attention_mask [B, K, L]`, `doc_ids [B, K]` (and the passages' retriever tokens
    `[B, K, Lp]` when re-encoding)."""
    raise NotImplementedError


class DeviceFeeder(Feeder):
  """Exact top-k on the mesh: embeddings, token tables, search and context assembly all stay on
  the devices (one jitted `retrieve`)."""

  def __init__(self, system: RagSystem, mesh, rules, kind: str = "device"):
    super().__init__(system, mesh, rules, kind)
    self._tables = None
    self._retrieve = None
    self._deep = {}

  @property
  def corpus_axes(self) -> tuple:
    """The mesh axes the corpus rows are sharded over (the `corpus` logical rule; () = none)."""
    names = sh.axis_names(dict(self.rules).get(sh.CORPUS))
    return names if sh.mesh_axes_size(self.mesh, names) > 1 else ()

  def _put_rows(self, x) -> jax.Array:
    """A per-passage array `[N, ...]` onto the mesh, rows sharded like the corpus (padded to a
    multiple of the shards: `topk.rows_on_mesh`) or replicated when the corpus rule is off."""
    return rows_on_mesh(x, self.mesh, self.corpus_axes)

  def set_corpus(self, embeddings_nd: np.ndarray, index=None) -> None:
    if self.system.closed_book:
      return
    # a float32 memmap stays lazy: each process pages in only its shards' rows
    emb = embeddings_nd if getattr(embeddings_nd, "dtype", None) == np.float32 else np.asarray(
        embeddings_nd, np.float32)
    self.num_rows = emb.shape[0]
    self.corpus = self._put_rows(emb)
    if self._tables is None:  # the token tables live with their rows' shard
      tables = (self.system.tables.ids, self.system.tables.lengths)
      if self.reencode or self.candidates:
        tables += self.passage_token_table()
      self._tables = tuple(self._put_rows(t) for t in tables)

  def _search(self, q_bd, corpus_nd, depth: int, tables=()):
    """`(TopK, rows of each table [B, depth, ...])`: exact top-`depth` MIPS over the corpus, per
    shard and merged when the corpus is sharded (`topk.sharded_top_k`), else `device_top_k`."""
    chunk = min(self.chunk, corpus_nd.shape[0])
    if self.corpus_axes:
      return sharded_top_k(q_bd, corpus_nd, depth, mesh=self.mesh, axes=self.corpus_axes,
                           num_rows=self.num_rows, payloads=tuple(tables), chunk=chunk)
    top = device_top_k(q_bd, corpus_nd, depth, chunk=chunk)
    return top, tuple(t[top.doc_ids] for t in tables)

  def _retrieve_fn(self):
    if self._retrieve is None:
      model, k, pad = self.model, self.k, self.pad_id
      depth, kept, reencode, rerank = self.depth, self.kept, self.reencode, self._rerank_rows

      def retrieve(params, q_ids, q_mask, question_ids, question_lengths, exclude_be, corpus_nd,
                   *tables):
        q_bd = model.apply({"params": params}, q_ids, q_mask, method=RagModel.encode_query)
        # each retrieved row's tokens come from the shard that holds the row
        top, got = self._search(q_bd, corpus_nd, depth, tables)
        rows, emb = top.doc_ids, top.embeddings
        along = take_rows
        if depth > kept:  # drop the excluded rows (none reach the batch: `exclude_rows`)
          pos = exclude_rows(rows, exclude_be, kept)
          rows, emb, got = along(rows, pos), along(emb, pos), tuple(along(t, pos) for t in got)
        t_ids, t_len, *p_rows = got
        if kept > k:
          rows, emb, pos = rerank(params, q_bd, rows, *p_rows)
          t_ids, t_len, p_rows = along(t_ids, pos), along(t_len, pos), [along(t, pos)
                                                                         for t in p_rows]
        ids, mask = assemble_gathered(t_ids, t_len, question_ids, question_lengths, pad)
        passages = tuple(p_rows) if reencode else ()  # [B, K, Lp] each
        return (emb, ids, mask, rows) + passages

      b2, b3 = self.batch_sharding(2), self.batch_sharding(3)
      extra = (b3, b3) if self.reencode else ()
      self._retrieve = jax.jit(retrieve, out_shardings=(b3, b3, b3, b2) + extra)
    return self._retrieve

  def _retrieve_batch(self, params, out, host):
    put = self._put
    with self._mesh_context():
      exclude = host.get("exclude_rows", np.full((len(host["question_ids"]), 1), -1, np.int32))
      emb, ids, mask, rows, *passages = self._retrieve_fn()(
          params, out["query_input_ids"], out["query_attention_mask"],
          put(host["question_ids"]), put(host["question_lengths"]), put(exclude), self.corpus,
          *self._tables)
    got = dict(passage_embeddings=emb, context_input_ids=ids, context_attention_mask=mask,
               doc_ids=rows)
    if passages:
      got.update(passage_input_ids=passages[0], passage_attention_mask=passages[1])
    return got

  def top_rows(self, params, batch, depth: int) -> np.ndarray:
    depth = min(int(depth), len(self.system.passages))
    with self._mesh_context():
      if depth not in self._deep:
        model = self.model
        self._deep[depth] = jax.jit(lambda p, q, m, c: self._search(
            model.apply({"params": p}, q, m, method=RagModel.encode_query), c, depth)[0].doc_ids,
            out_shardings=NamedSharding(self.mesh, PartitionSpec()))
      rows = self._deep[depth](params, batch["query_input_ids"],
                               batch["query_attention_mask"], self.corpus)
    return np.asarray(jax.device_get(rows)).astype(np.int64)


class HostFeeder(Feeder):
  """Search on the host (`scann`: ScaNN; `exact_host`: `ExactIndex`): queries are encoded on the
  mesh, gathered, searched, and each process assembles its rows with numpy. With
  `index.hybrid_bm25_candidates` C > 0 the dense top C and BM25's top C (the question text) are
  fused by reciprocal rank fusion (`ragjax.retrieval.hybrid`); the doc scores stay q·d."""

  def __init__(self, system: RagSystem, mesh, rules, kind: str = "scann"):
    super().__init__(system, mesh, rules, kind)
    self.index = None
    self._rerank = None
    self.hybrid = int(system.cfg.index.get("hybrid_bm25_candidates", 0) or 0)
    self.rrf_k = float(system.cfg.index.get("rrf_k", 60.0))
    if self.hybrid and self.num_excluded:
      raise ValueError("index.hybrid_bm25_candidates with excluded passages (pretraining) is "
                       "not supported")

  def _search(self, q_bd: np.ndarray, depth: int, questions) -> np.ndarray:
    """Rows `[B, depth]` of the dense index, or fused with BM25 when hybrid."""
    if not self.hybrid:
      return self.index.search_rows(q_bd, depth)[1]
    c = max(self.hybrid, depth)
    dense = self.index.search_rows(q_bd, c)[1]
    sparse = self.system.bm25_top_rows(questions, c)
    return reciprocal_rank_fusion([dense, sparse], depth, self.rrf_k)

  def set_corpus(self, embeddings_nd: np.ndarray, index=None) -> None:
    if self.system.closed_book:
      return
    emb = np.asarray(embeddings_nd, np.float32)
    if index is None:
      ids = [p.id for p in self.system.passages]
      cls = ScannIndex if self.kind == "scann" else ExactIndex
      params = dict(self.system.cfg.index.scann) if self.kind == "scann" else {}
      index = cls.build(emb, ids, **params)
    self.index, self.corpus = index, emb

  def _query_vectors(self, params, batch) -> np.ndarray:
    with self._mesh_context():
      q_bd = self._encode_fn()(params, batch["query_input_ids"], batch["query_attention_mask"])
    return np.asarray(jax.device_get(q_bd))  # replicated: every process has all rows

  def _retrieve_batch(self, params, out, host):
    q_bd = self._query_vectors(params, out)
    q_local = q_bd[self.local_rows(q_bd.shape[0])]
    rows = self._search(q_local, self.depth, self._questions)
    if self.depth > self.kept:  # drop the excluded rows (`exclude_rows`)
      rows = np.take_along_axis(rows, exclude_rows(rows, host["exclude_rows"], self.kept, xp=np),
                                axis=1)
    live = None
    if self.candidates:
      if self._rerank is None:
        self._rerank = jax.jit(self._rerank_rows)
      p_ids, p_mask = self.passage_token_table()
      with self._mesh_context():
        rows, live, _ = jax.device_get(self._rerank(params, q_local, rows, p_ids[rows],
                                                    p_mask[rows]))
      rows = np.asarray(rows)
    t = self.system.tables
    ids, mask = assemble_contexts(t.ids, t.lengths, host["question_ids"],
                                  host["question_lengths"], rows, self.pad_id, xp=np)
    put = self._put
    got = dict(passage_embeddings=put(self.corpus[rows] if live is None else np.asarray(live)),
               context_input_ids=put(ids), context_attention_mask=put(mask),
               doc_ids=put(rows.astype(np.int32)))
    if self.reencode:
      p_ids, p_mask = self.passage_token_table()
      got.update(passage_input_ids=put(p_ids[rows]), passage_attention_mask=put(p_mask[rows]))
    return got

  def top_rows(self, params, batch, depth: int) -> np.ndarray:
    depth = min(int(depth), len(self.system.passages))
    q_bd = self._query_vectors(params, batch)
    if self.hybrid:  # the batch's questions (this process's; one process with hybrid)
      if jax.process_count() > 1 or len(self._questions) != len(q_bd):
        raise ValueError("hybrid top_rows: call on the last `batch` of one process")
    return self._search(q_bd, depth, self._questions if self.hybrid else None)
