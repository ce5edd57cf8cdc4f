"""Hybrid BM25 + dense retrieval: reciprocal rank fusion against hand-computed fusions, and the
host feeder's batches against an independent fusion of brute-force dense search and bm25s."""
import bm25s
import numpy as np
import pytest

from ragjax import config as config_lib
from ragjax.errors import ConfigError
from ragjax.models.rag import RagModel
from ragjax.retrieval.hybrid import reciprocal_rank_fusion
from test_train import Harness, smoke


def test_rrf_by_hand():
  dense = np.array([[3, 1, 2], [0, 1, 2]])
  sparse = np.array([[1, 4, 3], [2, 1, -1]])
  # query 0: 1 -> 1/62 + 1/61, 3 -> 1/61 + 1/63, 4 -> 1/62, 2 -> 1/63
  # query 1: 1 -> 1/62 + 1/62, 2 -> 1/63 + 1/61, 0 -> 1/61
  out = reciprocal_rank_fusion([dense, sparse], 3)
  np.testing.assert_array_equal(out, [[1, 3, 4], [2, 1, 0]])
  with pytest.raises(ValueError, match="fewer than depth"):
    reciprocal_rank_fusion([dense[:, :1], sparse[:, :1]], 3)


def test_hybrid_feeder_fuses_dense_and_bm25(tmp_path):
  h = Harness(smoke(**{"index.kind": "exact_host", "index.hybrid_bm25_candidates": 5,
                       "generator.dropout_rate": 0.0}), tmp_path)
  qs = h.run.system.train_questions[:8]
  batch = h.batch(8)
  import jax
  q = np.asarray(jax.device_get(h.run.model.apply(
      {"params": h.state.params}, batch["query_input_ids"], batch["query_attention_mask"],
      method=RagModel.encode_query)), np.float64)
  corpus = np.asarray(h.run.feeder.corpus, np.float64)
  dense = np.argsort(-(q @ corpus.T), axis=1, kind="stable")[:, :5]
  ps = h.run.system.passages
  model = bm25s.BM25(method="lucene")
  model.index(bm25s.tokenize([f"{p.title} {p.text}" for p in ps], show_progress=False),
              show_progress=False)
  sparse, _ = model.retrieve(bm25s.tokenize([x.question for x in qs], show_progress=False), k=5,
                             show_progress=False)
  want = []
  for d, s in zip(dense, sparse):
    score = {}
    for ranking in (d, s):
      for rank, row in enumerate(ranking):
        score[int(row)] = score.get(int(row), 0.0) + 1 / (60 + rank + 1)
    order = list(dict.fromkeys([*map(int, d), *map(int, s)]))
    want.append(sorted(order, key=lambda r: (-score[r], order.index(r)))[:2])
  np.testing.assert_array_equal(np.asarray(jax.device_get(batch["doc_ids"])), want)
  assert not np.array_equal(np.asarray(want), dense[:, :2]), "fusion changed nothing: untested"
  deep = h.run.feeder.top_rows(h.state.params, batch, 4)
  np.testing.assert_array_equal(deep[:, :2], want)


def test_hybrid_needs_a_host_index():
  with pytest.raises(ConfigError, match="exact_host or scann"):
    config_lib.validate(smoke(**{"index.kind": "device", "index.hybrid_bm25_candidates": 5}),
                        data=False)
