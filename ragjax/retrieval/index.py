"""One index interface for maximum inner product search (MIPS), atomic publishing, exact search.

    index = ExactIndex.build(embeddings_nd, passage_ids, encoder=retriever.identity)
    scores_bk, ids_bk = index.search(queries_bd, k=20)
    index.save("runs/idx")            # written elsewhere, then renamed into place
    index = load_index("runs/idx", expect_dim=384, expect_count=len(passage_ids))  # registry

An index directory holds its files and a `manifest.json` (kind, encoder identity, count,
dimension, build parameters, build seconds) written last. The directory is assembled under a
temporary sibling name and renamed into place, so a killed build never leaves a directory that
loads: `ragjax.retrieval.registry.load_index` refuses one without a manifest, and checks count
and dimension.
"""
from __future__ import annotations

import abc
import json
import pathlib
import time
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ragjax.errors import IndexFormatError
from ragjax.fsutil import atomic_directory, write_json_atomic
from ragjax.retrieval.topk import block_corpus_host, topk_blocks

MANIFEST = "manifest.json"
FORMAT = "ragjax.index/1"
_REGISTRY: dict[str, type] = {}


def read_manifest(path, fmt: str = FORMAT) -> dict:
  """The manifest of a published directory.

  Raises:
    IndexFormatError: no manifest (an unfinished or killed build), bad JSON, or another format.
  """
  f = pathlib.Path(path) / MANIFEST
  if not f.is_file():
    raise IndexFormatError(f"{path}: no {MANIFEST}; not a complete {fmt} directory (a build that "
                           "was killed, or the wrong path)")
  try:
    manifest = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise IndexFormatError(f"{f}:{e.lineno}: invalid JSON: {e.msg}") from e
  if manifest.get("format") != fmt:
    raise IndexFormatError(f"{f}: format {manifest.get('format')!r}, expected {fmt!r}")
  return manifest


class Index(abc.ABC):
  """Top-k search over a fixed set of passages.

  Subclasses implement `_build`, `search_rows`, `_save_files` and `_load_files`.
  `passage_ids` `[N]` holds the passage id of each row.
  """
  kind: ClassVar[str]

  def __init__(self, passage_ids: Sequence[str], manifest: dict):
    self.passage_ids = np.asarray(list(passage_ids), dtype=object)
    self.manifest = manifest

  def __init_subclass__(cls, **kw):
    super().__init_subclass__(**kw)
    if "kind" in cls.__dict__:
      _REGISTRY[cls.kind] = cls

  @property
  def count(self) -> int:
    return len(self.passage_ids)

  @property
  def dim(self) -> int | None:
    return self.manifest.get("dim")

  @classmethod
  def build(cls, data, passage_ids: Sequence[str], *, encoder: dict | None = None, **params):
    """Build from `data` (`[N, D]` float embeddings; BM25 takes `N` passage strings)."""
    passage_ids = list(passage_ids)
    if len(passage_ids) == 0:
      raise ValueError(f"{cls.__name__}.build: empty corpus")
    if len(data) != len(passage_ids):
      raise ValueError(f"{cls.__name__}.build: {len(data)} rows but {len(passage_ids)} ids")
    t0 = time.perf_counter()
    index = cls._build(data, passage_ids, **params)
    index.manifest.update(format=FORMAT, kind=cls.kind, count=len(passage_ids),
                          encoder=encoder, build_seconds=round(time.perf_counter() - t0, 3))
    return index

  @classmethod
  @abc.abstractmethod
  def _build(cls, data, passage_ids, **params) -> "Index":
    ...

  @abc.abstractmethod
  def search_rows(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows: `(scores [B, k] float32, rows [B, k] int64)`, best first."""

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k passages: `(scores [B, k] float32, ids [B, k] object)`, best first.

    `queries` is `[B, D]` float (dense indexes) or a list of B strings (BM25).

    Raises:
      ValueError: `k` not in [1, count], or a query dimension that differs from the index's.
    """
    scores, rows = self.search_rows(queries, self._check_k(k))
    return scores, self.passage_ids[rows]

  def _check_k(self, k: int) -> int:
    if not 1 <= k <= self.count:
      raise ValueError(f"k={k}: must be in [1, {self.count}] for this index")
    return int(k)

  def _check_queries(self, queries) -> np.ndarray:
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] != self.dim:
      raise ValueError(f"queries of shape {q.shape}: expected [B, {self.dim}]")
    return q

  def save(self, path) -> pathlib.Path:
    """Publish the index at `path` atomically (see `atomic_directory`)."""
    with atomic_directory(path) as tmp:
      self._save_files(tmp)
      (tmp / "passage_ids.json").write_text(json.dumps(list(self.passage_ids)))
      write_json_atomic(tmp / MANIFEST, self.manifest)
    return pathlib.Path(path)

  @abc.abstractmethod
  def _save_files(self, directory: pathlib.Path) -> None:
    ...

  @classmethod
  @abc.abstractmethod
  def _load_files(cls, directory: pathlib.Path, passage_ids, manifest) -> "Index":
    ...


class ExactIndex(Index):
  """Brute-force MIPS on the JAX device: chunked matmul + top-k (memory bounded).

  Build params: `chunk` (corpus rows per matmul, default 65,536), `query_batch` (queries per
  call, default 256), `dtype` (`float32` or `bfloat16` storage).
  """
  kind = "exact"

  def __init__(self, passage_ids, manifest, embeddings_nd: np.ndarray):
    super().__init__(passage_ids, manifest)
    self._embeddings = embeddings_nd
    self._rows_dim = embeddings_nd.shape[1]
    self._device_corpus = None
    self._fns = {}

  @property
  def embeddings(self) -> np.ndarray:
    """The passage embeddings `[N, D]` float32 (as built or loaded; after the first search on
    the CPU with float32 storage, a read-only view of the one blocked copy the device searches)."""
    return self._embeddings

  def _block(self):
    """The corpus on the device in `topk.block_corpus`'s layout, blocked on the host
    (`topk.block_corpus_host`) and put once. On the CPU the device array shares that buffer,
    which then also serves `embeddings` (read-only), so a float32 index holds one copy of its
    rows instead of a host copy beside a padded device copy (`bench/exact_index_memory.py`);
    elsewhere `embeddings` stays as it was (a memmap stays a memmap)."""
    bf16 = self.manifest["params"]["dtype"] == "bfloat16"
    host = block_corpus_host(self._embeddings, self.manifest["params"]["chunk"],
                             jnp.bfloat16 if bf16 else np.float32)
    device = jax.device_put(host, may_alias=True).block_until_ready()
    if not bf16 and device.unsafe_buffer_pointer() == host.ctypes.data:
      view = host.reshape(-1, host.shape[-1])[:self.count]
      view.flags.writeable = False  # the device reads this buffer
      self._embeddings = view
    return device

  @classmethod
  def _build(cls, data, passage_ids, chunk: int = 65536, query_batch: int = 256,
             dtype: str = "float32"):
    emb = np.asarray(data, np.float32)
    if emb.ndim != 2:
      raise ValueError(f"embeddings of shape {emb.shape}: expected [N, D]")
    manifest = {"dim": int(emb.shape[1]),
                "params": {"chunk": chunk, "query_batch": query_batch, "dtype": dtype}}
    return cls(passage_ids, manifest, emb)

  def _fn(self, k):
    if k not in self._fns:
      self._fns[k] = jax.jit(lambda q, c: topk_blocks(q, c, self.count, k))
    return self._fns[k]

  def search_rows(self, queries, k):
    q = self._check_queries(queries)
    k = self._check_k(k)
    if self._device_corpus is None:  # blocked once: padding in the search would copy per call
      self._device_corpus = self._block()
    qb = self.manifest["params"]["query_batch"]
    scores = np.zeros((len(q), k), np.float32)
    rows = np.zeros((len(q), k), np.int64)
    for s in range(0, len(q), qb):
      block = q[s:s + qb]
      padded = np.zeros((qb, q.shape[1]), np.float32)  # one compile per k
      padded[:len(block)] = block
      sc, ro = self._fn(k)(jnp.asarray(padded, self._device_corpus.dtype), self._device_corpus)
      scores[s:s + len(block)] = np.asarray(sc)[:len(block)]
      rows[s:s + len(block)] = np.asarray(ro)[:len(block)]
    return scores, rows

  def _save_files(self, directory):
    np.save(directory / "embeddings.npy", self.embeddings)

  @classmethod
  def _load_files(cls, directory, passage_ids, manifest):
    try:
      emb = np.load(directory / "embeddings.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
      raise IndexFormatError(f"{directory / 'embeddings.npy'}: unreadable: {e}") from e
    if emb.shape[0] != len(passage_ids):
      raise IndexFormatError(f"{directory / 'embeddings.npy'}: {emb.shape[0]} rows, manifest "
                             f"count is {len(passage_ids)}")
    return cls(passage_ids, manifest, np.asarray(emb, np.float32))
