"""One index interface for maximum inner product search (MIPS), atomic publishing, exact search.

    index = ExactIndex.build(embeddings_nd, passage_ids, encoder=retriever.identity)
    scores_bk, ids_bk = index.search(queries_bd, k=20)
    index.save("runs/idx")            # written elsewhere, then renamed into place
    index = load_index("runs/idx", expect_dim=384, expect_count=len(passage_ids))

An index directory holds its files and a `manifest.json` (kind, encoder identity, count,
dimension, build parameters, build seconds) written last. The directory is assembled under a
temporary sibling name and renamed into place, so a killed build never leaves a directory that
loads: `load_index` refuses one without a manifest, and checks count and dimension.
"""
from __future__ import annotations

import abc
import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ragjax.errors import IndexFormatError

MANIFEST = "manifest.json"
FORMAT = "ragjax.index/1"
_REGISTRY: dict[str, type] = {}


@contextlib.contextmanager
def atomic_file(path):
  """Yield a temporary path beside `path` to write; on success fsync it and `os.replace` it onto
  `path` (readers see the old file or the whole new one, never half of it). If the body raises,
  the temporary file is removed and `path` is untouched."""
  path = pathlib.Path(path)
  fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  tmp = pathlib.Path(name)
  try:
    os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it 0600)
    yield tmp
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _fsync(path) -> None:
  """fsync a file, or a directory (its entries: a rename into it)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _umask() -> int:
  """The process umask, read without changing it (`os.umask` sets it; racy with threads)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def write_json_atomic(path, obj) -> None:
  """Write JSON to `path` through `atomic_file` (never half-written)."""
  with atomic_file(path) as tmp:
    tmp.write_text(json.dumps(obj, indent=1))


@contextlib.contextmanager
def atomic_directory(path):
  """Yield a fresh temporary directory beside `path`; on success fsync every file in it and
  rename it to `path` (the data is on disk before the directory appears under its name).

  An existing `path` is moved aside first and deleted after the rename. If the body raises (or
  the process dies), `path` is untouched and only a `.tmp-*` sibling is left behind.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
  try:
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir() would create it (mkdtemp makes it 0700)
    yield tmp
    for f in [*tmp.rglob("*"), tmp]:  # contents, then the entries, before the name appears
      _fsync(f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if path.exists():
    old = path.parent / f".{path.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    os.rename(path, old)
  os.rename(tmp, path)
  _fsync(path.parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


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


def load_index(path, *, expect_dim: int | None = None, expect_count: int | None = None,
               expect_encoder: dict | None = None) -> Index:
  """Load a published index of any kind, checking what the caller expects.

  Raises:
    IndexFormatError: missing/invalid manifest, unknown kind, or a count, dimension or encoder
      identity that disagrees with the files or with the caller (the message says which).
  """
  path = pathlib.Path(path)
  manifest = read_manifest(path)
  kind = manifest.get("kind")
  if kind not in _REGISTRY:
    _import_backends()
  if kind not in _REGISTRY:
    raise IndexFormatError(f"{path / MANIFEST}: unknown index kind {kind!r}; known: "
                           f"{sorted(_REGISTRY)}")
  try:
    passage_ids = json.loads((path / "passage_ids.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise IndexFormatError(f"{path / 'passage_ids.json'}: unreadable: {e}") from e
  problems = []
  if len(passage_ids) != manifest["count"]:
    problems.append(f"passage_ids.json has {len(passage_ids)} ids, manifest count is "
                    f"{manifest['count']}")
  if expect_count is not None and manifest["count"] != expect_count:
    problems.append(f"index holds {manifest['count']} passages, expected {expect_count}")
  if expect_dim is not None and manifest.get("dim") not in (None, expect_dim):
    problems.append(f"index dimension is {manifest.get('dim')}, expected {expect_dim}")
  if expect_encoder is not None and manifest.get("encoder") not in (None, expect_encoder):
    problems.append(f"index was built with encoder {manifest.get('encoder')}, expected "
                    f"{expect_encoder}")
  if problems:
    raise IndexFormatError(f"{path}: " + "; ".join(problems))
  index = _REGISTRY[kind]._load_files(path, passage_ids, manifest)
  if index.dim is not None and getattr(index, "_rows_dim", index.dim) != index.dim:
    raise IndexFormatError(f"{path}: stored vectors have dimension {index._rows_dim}, manifest "
                           f"says {index.dim}")
  return index


def _import_backends():
  # Register the optional back-ends on first use (ScaNN and bm25s are heavier imports).
  from ragjax.retrieval import bm25_index, scann_index  # noqa: F401


def block_corpus(corpus_nd: jax.Array, chunk: int) -> jax.Array:
  """`[N, D]` -> `[ceil(N / chunk), chunk, D]`, zero-padded: the layout `topk_blocks` scans.
  Do it once per corpus (it copies the corpus), not once per search."""
  n, d = corpus_nd.shape
  chunk = int(min(chunk, n))
  num_chunks = -(-n // chunk)
  return jnp.pad(corpus_nd, ((0, num_chunks * chunk - n), (0, 0))).reshape(num_chunks, chunk, d)


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


class ExactIndex(Index):
  """Brute-force MIPS on the JAX device: chunked matmul + top-k (memory bounded).

  Build params: `chunk` (corpus rows per matmul, default 65,536), `query_batch` (queries per
  call, default 256), `dtype` (`float32` or `bfloat16` storage).
  """
  kind = "exact"

  def __init__(self, passage_ids, manifest, embeddings_nd: np.ndarray):
    super().__init__(passage_ids, manifest)
    self.embeddings = embeddings_nd
    self._rows_dim = embeddings_nd.shape[1]
    self._device_corpus = None
    self._fns = {}

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
    if self._device_corpus is None:
      dtype = jnp.bfloat16 if self.manifest["params"]["dtype"] == "bfloat16" else jnp.float32
      # Blocked once here: padding inside the jitted search would copy the corpus every call.
      self._device_corpus = block_corpus(jnp.asarray(self.embeddings, dtype),
                                         self.manifest["params"]["chunk"])
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
