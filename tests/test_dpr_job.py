"""The retriever-only DPR job (`model.loss="dpr"`): its batches (gold positive, hard negatives
mined from the current index or BM25 with the gold passages left out), its loss against DPR
eq. 2 computed here in numpy from the towers' own vectors, and a training run that fits."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragjax import config as config_lib
from ragjax.errors import ConfigError, DataError
from ragjax.models.rag import RagModel, dpr_loss
from ragjax.training import step as train_step
from test_train import Harness, smoke

DPR = {"model.loss": "dpr", "optim.freeze": "('generator',)", "generator.dropout_rate": 0.0,
       "retriever.random.hidden_size": 32, "model.dpr.hard_negatives": 2,
       "index.refresh.mode": "sync", "index.refresh.schedule": "0-1000:500",
       "optim.lr_multipliers.query_encoder": 1.0, "train.total_steps": 200}


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
  return Harness(smoke(**DPR), tmp_path_factory.mktemp("dpr"))


def _np(x):
  return np.asarray(jax.device_get(x))


def _vectors(h, method, ids, mask):
  return _np(h.run.model.apply({"params": h.state.params}, jnp.asarray(ids), jnp.asarray(mask),
                               method=method))


def test_batch_has_gold_positive_and_index_hard_negatives_without_gold(hd):
  hd.reset()
  qs = hd.run.system.train_questions[:8]
  batch = hd.batch(8)
  row_of = {p.id: i for i, p in enumerate(hd.run.system.passages)}
  gold = np.array([row_of[q.gold_passage_ids[0]] for q in qs])
  p_ids, p_mask = hd.run.feeder.passage_token_table()
  np.testing.assert_array_equal(_np(batch["positive_input_ids"]), p_ids[gold])
  np.testing.assert_array_equal(_np(batch["positive_attention_mask"]), p_mask[gold])
  want, _ = _brute_force_negatives(hd, batch, gold, 2)
  np.testing.assert_array_equal(_np(batch["doc_ids"]), want)
  np.testing.assert_array_equal(_np(batch["passage_input_ids"]), p_ids[want])


def _brute_force_negatives(h, batch, gold, n):
  """The first n rows of an exhaustive search (live query encoder, the installed index
  vectors) that are not the gold row; asserts the gold row is excluded."""
  q_bd = _vectors(h, RagModel.encode_query, batch["query_input_ids"],
                  batch["query_attention_mask"])
  corpus = _np(h.run.feeder.corpus)
  order = np.argsort(-(q_bd @ corpus.T), axis=1, kind="stable")
  assert not np.any(_np(batch["doc_ids"]) == gold[:, None])
  return np.array([[r for r in o if r != g][:n] for o, g in zip(order, gold)]), order


def test_bm25_hard_negatives_are_bm25s_top_rows_without_gold(tmp_path):
  import bm25s
  h = Harness(smoke(**DPR, **{"model.dpr.negatives": "bm25"}), tmp_path)
  qs = h.run.system.train_questions[:8]
  batch = h.batch(8)
  ps = h.run.system.passages
  row_of = {p.id: i for i, p in enumerate(ps)}
  gold = np.array([row_of[q.gold_passage_ids[0]] for q in qs])
  model = bm25s.BM25(method="lucene")
  model.index(bm25s.tokenize([f"{p.title} {p.text}" for p in ps], show_progress=False),
              show_progress=False)
  rows, _ = model.retrieve(bm25s.tokenize([q.question for q in qs], show_progress=False), k=3,
                           show_progress=False)
  want = np.array([[r for r in row if r != g][:2] for row, g in zip(rows, gold)])
  np.testing.assert_array_equal(_np(batch["doc_ids"]), want)


def test_step_loss_is_dpr_eq2_on_the_towers_vectors(hd):
  hd.reset()
  batch = hd.batch(8)
  s = float(hd.run.model.doc_score_scale)
  q = _vectors(hd, RagModel.encode_query, batch["query_input_ids"],
               batch["query_attention_mask"]).astype(np.float64) * s
  pos = _vectors(hd, RagModel.encode_passages, _np(batch["positive_input_ids"])[:, None],
                 _np(batch["positive_attention_mask"])[:, None])[:, 0]
  neg = _vectors(hd, RagModel.encode_passages, batch["passage_input_ids"],
                 batch["passage_attention_mask"])
  cand = np.concatenate([pos, neg.reshape(-1, neg.shape[-1])]).astype(np.float64)
  logits = q @ cand.T
  gold = _np(batch["positive_rows"])
  assert len(set(gold)) < len(gold), "no two questions share a passage: the mask is untested"
  dup = (gold[:, None] == gold[None, :]) & ~np.eye(8, dtype=bool)   # in-batch false negatives
  logits[:, :8][dup] = -np.inf
  ref = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
  loss, aux = jax.jit(lambda p, b: dpr_loss(hd.run.model, p, b))(hd.state.params, batch)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)          # dropout off
  np.testing.assert_allclose(float(aux["dpr_accuracy"]),
                             np.mean(np.argmax(logits, 1) == np.arange(8)))
  gen0 = jax.tree.map(_np, hd.state.params["generator"])
  state, metrics = hd.step(hd.state, batch, jax.random.key(0))     # dropout on (BERT's 0.1)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["grad_norm_query_encoder"]) > 0
  assert float(metrics["grad_norm_passage_encoder"]) > 0
  assert "grad_norm_generator" not in metrics
  jax.tree.map(np.testing.assert_array_equal, gen0,
               jax.tree.map(_np, state.params["generator"]))  # the reader is untouched
  hd.state = state


@pytest.mark.slow  # the loss is checked against numpy in CI; this is the longer descent check
def test_dpr_fits_a_batch(hd):
  """Steps on one fixed batch drive DPR's loss (dropout off) down and its accuracy up: the
  update descends the formula's loss."""
  hd.reset()
  batch = hd.batch(8)
  loss_fn = jax.jit(lambda p, b: dpr_loss(hd.run.model, p, b))
  before, acc0 = loss_fn(hd.state.params, batch)
  for i in range(40):
    hd.state, _ = hd.step(hd.state, batch, jax.random.key(i))
  after, acc = loss_fn(hd.state.params, batch)
  assert float(after) < 0.8 * float(before), (float(before), float(after))
  assert float(acc["dpr_accuracy"]) > float(acc0["dpr_accuracy"])


def test_frozen_passage_encoder_reads_the_index_vectors_and_gold_is_never_a_negative(
    tmp_path):
  """Query-side DPR against the index vectors. An index where each gold passage's vector points
  along its questions' query vectors ranks it first, and the mined negatives still skip it."""
  h = Harness(smoke(**{**DPR, "optim.freeze": "('generator', 'passage_encoder')"}), tmp_path)
  qs = h.run.system.train_questions[:8]
  row_of = {p.id: i for i, p in enumerate(h.run.system.passages)}
  gold = np.array([row_of[q.gold_passage_ids[0]] for q in qs])
  batch = h.batch(8)
  q_bd = _vectors(h, RagModel.encode_query, batch["query_input_ids"],
                  batch["query_attention_mask"])
  corpus = _np(h.run.feeder.corpus).copy()
  for g in set(gold):
    corpus[g] = 10 * q_bd[gold == g].mean(0)
  h.run.feeder.set_corpus(corpus)
  batch = h.batch(8)
  assert "positive_input_ids" not in batch and "passage_input_ids" not in batch
  np.testing.assert_array_equal(_np(batch["positive_embeddings"]), corpus[gold])
  want, order = _brute_force_negatives(h, batch, gold, 2)
  assert np.mean(order[:, 0] == gold) >= 0.5, "gold is not on top: the exclusion is untested"
  np.testing.assert_array_equal(_np(batch["doc_ids"]), want)
  np.testing.assert_array_equal(_np(batch["passage_embeddings"]), corpus[want])
  state, m = h.step(h.state, batch, jax.random.key(0))
  assert float(m["grad_norm_query_encoder"]) > 0 and "grad_norm_passage_encoder" not in m


def test_dpr_config_and_data_errors():
  with pytest.raises(ConfigError, match="optim.freeze"):
    config_lib.validate(smoke(**{"model.loss": "dpr"}), data=False)
  with pytest.raises(ConfigError, match="model.dpr.negatives"):
    config_lib.validate(smoke(**DPR, **{"model.dpr.negatives": "random"}), data=False)
  with pytest.raises(ConfigError, match="retriever_loss"):
    config_lib.validate(smoke(**DPR, **{"model.retriever_loss": "pdist"}), data=False)
  from ragjax.system.build import build_system
  cfg = smoke(**DPR, **{"data.pretrain.objective": "salient_span"})  # no gold passages
  with pytest.raises(DataError, match="gold passage id"):
    build_system(cfg)


@pytest.mark.slow
def test_train_cli_reports_gold_recall(tmp_path, capsys):
  from ragjax.cli import main
  args = [f"--config.{k}={v}" for k, v in {**DPR, "train.total_steps": 4}.items()]
  rc = main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(tmp_path),
             "--config.train.tensorboard=False", *args])
  assert rc == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  report = json.loads((tmp_path / "eval" / "step_4.json").read_text())
  assert out["gold_recall"] == report["gold_recall"]
  assert set(report["gold_recall"]) == {"1", "2"} and "exact_match" not in report
  assert 0.0 <= report["gold_recall"]["1"] <= report["gold_recall"]["2"] <= 1.0
