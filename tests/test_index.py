"""MIPS indexes: exact vs brute force, ScaNN recall, BM25 vs hand-computed scores, publishing."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragjax.errors import IndexFormatError
from ragjax.retrieval.bm25_index import BM25Index
from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.registry import load_index
from ragjax.retrieval.topk import topk_chunked
from ragjax.retrieval.scann_index import ScannIndex, default_params


def clustered(n, d, centres, seed):
  rng = np.random.default_rng(seed)
  c = rng.normal(size=(centres, d))
  x = c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(q, x, k):
  return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def test_topk_chunked_equals_brute_force_for_ragged_chunks():
  x, q = clustered(1003, 16, 20, 0), clustered(7, 16, 20, 1)
  for chunk in (1003, 100, 64, 1):
    s, r = topk_chunked(jnp.asarray(q), jnp.asarray(x), k=10, chunk=chunk)
    np.testing.assert_array_equal(np.asarray(r), brute_force(q, x, 10))
    np.testing.assert_allclose(np.asarray(s), np.sort(q @ x.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


def test_exact_index_search_returns_ids_and_batches_queries():
  x, q = clustered(500, 8, 10, 2), clustered(300, 8, 10, 3)
  ids = [f"p{i}" for i in range(500)]
  idx = ExactIndex.build(x, ids, chunk=128, query_batch=64)
  scores, got = idx.search(q, 5)
  assert scores.shape == got.shape == (300, 5)
  np.testing.assert_array_equal(got, np.asarray(ids, dtype=object)[brute_force(q, x, 5)])
  with pytest.raises(ValueError, match=r"k=501: must be in \[1, 500\]"):
    idx.search(q, 501)
  with pytest.raises(ValueError, match=r"expected \[B, 8\]"):
    idx.search(q[:, :4], 5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_index_holds_one_copy_and_a_loaded_index_searches_alike(tmp_path, dtype):
  """Brute-force top-5 with float32 or bfloat16 storage (rows stored in bfloat16 may swap near
  ties: >= 95% of the brute-force top-5 then); on the CPU a float32 index's device corpus is its
  host embeddings' buffer (one copy), which it exposes read-only; a saved and loaded index
  returns the built one's top-k and the float32 embeddings."""
  x, q = clustered(1000, 8, 10, 4), clustered(50, 8, 10, 5)
  ids = np.asarray([f"p{i}" for i in range(1000)], dtype=object)
  idx = ExactIndex.build(x, list(ids), chunk=300, dtype=dtype)
  _, got = idx.search(q, 5)
  want = ids[brute_force(q, x, 5)]
  if dtype == "float32":
    np.testing.assert_array_equal(got, want)
  else:
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, want)]) >= 0.95
  np.testing.assert_array_equal(idx.embeddings, x)
  assert idx.embeddings.dtype == np.float32
  if dtype == "float32" and jax.default_backend() == "cpu":
    assert idx._device_corpus.unsafe_buffer_pointer() == idx.embeddings.ctypes.data
    with pytest.raises(ValueError, match="read-only"):
      idx.embeddings[0, 0] = 1.0
  idx.save(tmp_path / "idx")
  loaded = load_index(tmp_path / "idx")
  np.testing.assert_array_equal(loaded.search(q, 5)[1], got)
  np.testing.assert_array_equal(loaded.embeddings, x)


def test_approximate_topk_on_device_has_high_recall():
  x, q = clustered(4000, 32, 40, 4), clustered(50, 32, 40, 5)
  _, r = topk_chunked(jnp.asarray(q), jnp.asarray(x), k=10, chunk=1024, approximate=True)
  ref = brute_force(q, x, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(np.asarray(r), ref)])
  assert recall >= 0.9


def test_scann_params_follow_corpus_size():
  p = default_params(1_000_000)
  assert p["num_leaves"] == 1000 and p["leaves_to_search"] == 100
  assert default_params(100)["num_leaves"] == 10


@pytest.mark.parametrize("n,overrides", [(3000, {}), (30000, {"num_leaves": 100,
                                                               "leaves_to_search": 20})])
def test_scann_recall_against_exact(tmp_path, n, overrides):
  x, q = clustered(n, 32, 50, 6), clustered(100, 32, 50, 7)
  idx = ScannIndex.build(x, [str(i) for i in range(n)], **overrides)
  assert idx.manifest["params"]["tree"] == (n >= 20000)
  _, rows = idx.search_rows(q, 10)
  ref = brute_force(q, x, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, ref)])
  assert recall >= 0.95
  # >= 256 queries go through ScaNN's multi-threaded path: same answers.
  np.testing.assert_array_equal(idx.search_rows(np.tile(q, (3, 1)), 10)[1], np.tile(rows, (3, 1)))
  idx.save(tmp_path / "scann")
  again = load_index(tmp_path / "scann", expect_dim=32, expect_count=n)
  np.testing.assert_array_equal(again.search_rows(q, 10)[1], rows)


def lucene_bm25(query_terms, docs, k1=1.5, b=0.75):
  """Hand-written Lucene (>= 8) BM25: idf = ln(1 + (N - df + .5)/(df + .5)), and no (k1 + 1)
  factor in the numerator (Lucene dropped it: it scales every score alike)."""
  n, avgdl = len(docs), sum(len(d) for d in docs) / len(docs)
  out = []
  for d in docs:
    s = 0.0
    for t in set(query_terms):
      df = sum(t in doc for doc in docs)
      if df == 0:
        continue
      tf = d.count(t)
      idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
      s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    out.append(s)
  return np.array(out)


def test_bm25_scores_equal_hand_computed_lucene_bm25(tmp_path):
  docs = ["paris france capital city", "london england capital", "tokyo japan city city river",
          "river thames london", "mountain snow"]
  idx = BM25Index.build(docs, [f"d{i}" for i in range(5)])
  scores, ids = idx.search(["capital city river"], 5)
  ref = lucene_bm25(["capital", "city", "river"], [d.split() for d in docs])
  order = np.argsort(-ref, kind="stable")
  np.testing.assert_allclose(scores[0], ref[order], rtol=1e-5)
  assert list(ids[0][:2]) == [f"d{order[0]}", f"d{order[1]}"]
  idx.save(tmp_path / "bm25")
  np.testing.assert_allclose(load_index(tmp_path / "bm25").search(["capital city river"], 5)[0],
                             scores)
  with pytest.raises(ValueError, match="list of strings"):
    idx.search(np.zeros((1, 4)), 2)


def test_load_checks_manifest_count_dim_and_encoder(tmp_path):
  x = clustered(50, 8, 5, 8)
  ExactIndex.build(x, [str(i) for i in range(50)], encoder={"name": "a"}).save(tmp_path / "i")
  with pytest.raises(IndexFormatError, match="index dimension is 8, expected 16"):
    load_index(tmp_path / "i", expect_dim=16)
  with pytest.raises(IndexFormatError, match="index holds 50 passages, expected 49"):
    load_index(tmp_path / "i", expect_count=49)
  with pytest.raises(IndexFormatError, match="built with encoder"):
    load_index(tmp_path / "i", expect_encoder={"name": "b"})
  ids = json.loads((tmp_path / "i" / "passage_ids.json").read_text())
  (tmp_path / "i" / "passage_ids.json").write_text(json.dumps(ids[:-1]))
  with pytest.raises(IndexFormatError, match="passage_ids.json has 49 ids, manifest count is 50"):
    load_index(tmp_path / "i")
  with pytest.raises(IndexFormatError, match="no manifest.json"):
    load_index(tmp_path / "nothing-here")


def test_failed_save_leaves_previous_index_intact(tmp_path, monkeypatch):
  x = clustered(40, 8, 4, 9)
  ExactIndex.build(x, [str(i) for i in range(40)]).save(tmp_path / "i")
  bad = ExactIndex.build(x[:20], [str(i) for i in range(20)])
  monkeypatch.setattr(bad, "_save_files", lambda d: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    bad.save(tmp_path / "i")
  assert load_index(tmp_path / "i").count == 40
  assert [p.name for p in tmp_path.iterdir()] == ["i"], "temporary directory not cleaned up"


def test_sigkill_during_build_never_leaves_a_loadable_index(tmp_path):
  """A build killed while writing leaves no directory at the target path (only a .tmp sibling)."""
  script = textwrap.dedent(f"""
    import os, time, numpy as np
    from ragjax.retrieval.index import ExactIndex
    idx = ExactIndex.build(np.ones((10, 4), np.float32), [str(i) for i in range(10)])
    def slow(d):
      np.save(d / "embeddings.npy", idx.embeddings)
      open({str(tmp_path / 'ready')!r}, "w").close()
      time.sleep(60)
    idx._save_files = slow
    idx.save({str(tmp_path / 'idx')!r})
  """)
  proc = subprocess.Popen([sys.executable, "-c", script])
  for _ in range(600):
    if (tmp_path / "ready").exists():
      break
    proc.poll()
    assert proc.returncode is None, "child exited early"
    import time; time.sleep(0.1)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "idx").exists()
  with pytest.raises(IndexFormatError, match="no manifest.json"):
    load_index(tmp_path / "idx")
  leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.tmp-")]
  assert len(leftovers) == 1
  with pytest.raises(IndexFormatError, match="no manifest.json"):
    load_index(tmp_path / leftovers[0])
