"""The host path over a corpus sharded across processes (`retrieval.multihost`): per-shard
indexes merged into the global top-k, checked against numpy brute force over the whole corpus."""

import numpy as np
import pytest

from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.multihost import ProcessShardedIndex, merge_top_k, process_rows, shard_range


def _brute(q, corpus, k):
  """numpy's top-k rows by descending score, ties by ascending row (a stable sort)."""
  return np.argsort(-(q @ corpus.T), axis=1, kind="stable")[:, :k]


def test_shard_range_covers_the_rows_once_with_sizes_within_one():
  for n, p in ((10, 3), (7, 7), (3, 5), (1003, 2)):
    spans = [shard_range(n, i, p) for i in range(p)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [hi - lo for lo, hi in spans]
    assert max(sizes) - min(sizes) <= 1
  assert process_rows(10) == (0, 10)  # one process holds everything


def test_merge_of_exact_shards_equals_the_whole_corpus_top_k_with_ties():
  """Three shards of unequal size, scores quantised so that ties occur: the merged top-k equals
  the stable brute force over the unsplit corpus (ties by lower row)."""
  rng = np.random.default_rng(0)
  corpus = np.round(rng.standard_normal((101, 8)), 0).astype(np.float32)
  q = np.round(rng.standard_normal((5, 8)), 0).astype(np.float32)
  k = 12
  s_parts, r_parts = [], []
  for i in range(3):
    lo, hi = shard_range(101, i, 3)
    s = q @ corpus[lo:hi].T
    r = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s_parts.append(np.take_along_axis(s, r, 1))
    r_parts.append(r + lo)
  scores, rows = merge_top_k(np.stack(s_parts), np.stack(r_parts), k)
  want = _brute(q, corpus, k)
  assert len(np.unique(q @ corpus.T)) < 101 * 5 / 4  # the case has many ties
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_allclose(scores, np.take_along_axis(q @ corpus.T, want, 1))


def test_one_process_sharded_index_is_its_local_index():
  rng = np.random.default_rng(1)
  corpus = rng.standard_normal((40, 8)).astype(np.float32)
  q = rng.standard_normal((3, 8)).astype(np.float32)
  index = ProcessShardedIndex(ExactIndex.build(corpus, [str(i) for i in range(40)]), 0, 40)
  scores, rows = index.search_rows(q, 5)
  np.testing.assert_array_equal(rows, _brute(q, corpus, 5))
  table = np.arange(40 * 3).reshape(40, 3)
  np.testing.assert_array_equal(index.fetch_rows(table, rows), table[rows])
  with pytest.raises(ValueError, match=r"k=41: must be in \[1, 40\]"):
    index.search_rows(q, 41)
  with pytest.raises(ValueError, match="local table of 39 rows, this process holds 40"):
    index.fetch_rows(table[:39], rows)
  with pytest.raises(ValueError, match=r"not inside a corpus of 30"):
    ProcessShardedIndex(index.local, 0, 30)


_WORKER = r'''
import json, sys
import jax, numpy as np
from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.multihost import ProcessShardedIndex, process_rows
from ragjax.retrieval.scann_index import ScannIndex
pid, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
corpus = np.load(path, mmap_mode="r")
n = corpus.shape[0]
lo, hi = process_rows(n)
mine = np.asarray(corpus[lo:hi])                  # the only rows this process reads
ids = [str(i) for i in range(lo, hi)]
q = np.random.default_rng(1).standard_normal((6, corpus.shape[1])).astype(np.float32)
res = {"lo": lo, "hi": hi}
for kind, local in (("exact", ExactIndex.build(mine, ids)),
                    # ScaNN over a shard this small is AH over every row then exact
                    # re-scoring of the best reorder_k: exact once reorder_k covers the shard
                    ("scann", ScannIndex.build(mine, ids, reorder_k=hi - lo, threads=1))):
  index = ProcessShardedIndex(local, lo, n)
  _, rows = index.search_rows(q, 10)
  _, own = index.search_rows(q[3 * pid:3 * pid + 3], 10, gather_queries=True)
  res[kind] = rows.tolist()
  res[kind + "_own"] = own.tolist()
tokens = np.arange(lo, hi)[:, None] * 10 + np.arange(4)[None, :]   # row r holds r*10 + [0..3]
res["tokens"] = index.fetch_rows(tokens, rows).tolist()
json.dump(res, open(out, "w"))
'''


def test_two_processes_each_index_half_and_merge_to_the_single_process_top_k(tmp_path):
  """2 processes (jax.distributed on 127.0.0.1, 4 CPU devices each): each builds an exact and a
  ScaNN index over only its half of a [1001, 16] corpus; the merged top-10 equals numpy brute
  force over the whole corpus, for shared queries and for per-process queries gathered across
  processes, and `fetch_rows` returns the owner's token rows."""
  from test_multiprocess_train import run_python_workers
  rng = np.random.default_rng(7)
  corpus = rng.standard_normal((1001, 16)).astype(np.float32)
  q = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
  np.save(tmp_path / "corpus.npy", corpus)
  outs = run_python_workers(tmp_path, _WORKER, [tmp_path / "corpus.npy"])
  want = _brute(q, corpus, 10)
  assert [(o["lo"], o["hi"]) for o in outs] == [(0, 500), (500, 1001)]
  assert set(want[:, :3].ravel() < 500) == {True, False}  # both halves hold winners
  for i, o in enumerate(outs):
    for kind in ("exact", "scann"):
      np.testing.assert_array_equal(o[kind], want, err_msg=f"process {i} {kind}")
      np.testing.assert_array_equal(o[kind + "_own"], want[3 * i:3 * i + 3],
                                    err_msg=f"process {i} {kind}, gathered queries")
    np.testing.assert_array_equal(np.asarray(o["tokens"]),
                                  want[..., None] * 10 + np.arange(4))
