"""Evaluation of a RAG system: retrieve, decode, score.

For each question: top-k passages from the current query encoder (`ragjax.system.feed.Feeder`, the
same retrieval the train step sees), an answer decoded by `cfg.eval.decoding` (RAG-Token beam
search or greedy; RAG-Sequence "thorough" or "fast"; for the `top1` loss the generator reads the
best passage only; `closed_book` reads the question alone; a FiD reader (`model.reader="fid"`)
decodes one greedy or beam search over its fused K passages), and:

* exact match and token F1 after SQuAD answer normalisation (Rajpurkar et al. 2016, the
  official evaluation script), or regex match for regex answers (CuratedTREC: EM = F1 = match);
* answer recall@k: a retrieved passage among the first k contains a normalised answer
  (DPR's `has_answer`; `ragjax.data.answers`).

Batches are global arrays (each process decodes its share), so this runs unchanged on a mesh or
several processes.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.experimental import multihost_utils

from ragjax.config import DECODINGS
from ragjax.data.answers import has_answer
from ragjax.data.qa import Question
from ragjax.decoding import beam
from ragjax.decoding.rag import rag_sequence_generate, rag_token_generate
from ragjax.evaluation.metrics import qa_scores
from ragjax.models.seq2seq import Seq2Seq
from ragjax.retrieval.evaluate import recall_at_k, recall_report
from ragjax.system.feed import Feeder


def gather(x) -> np.ndarray:
  """A global batch-sharded array as one host numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def decode_batch(feeder: Feeder, params, batch: dict, ecfg) -> tuple[np.ndarray, np.ndarray]:
  """`(generated ids [B, 1 + max_new_tokens], doc_scores [B, K])` for one step batch."""
  system = feeder.system
  model = system.model
  ids, mask = batch["context_input_ids"], batch["context_attention_mask"]
  with jax.set_mesh(feeder.mesh), nn_partitioning.axis_rules(feeder.rules):
    if system.closed_book:
      scores = batch["doc_scores"]
    else:
      scores = feeder.doc_scores(params, batch)
    k = 1 if system.cfg.model.loss == "top1" else system.reader_k  # the reader's K of K_r
    ids, mask, scores = ids[:, :k], mask[:, :k], scores[:, :k]
    kw = dict(num_beams=int(ecfg.num_beams), max_new_tokens=int(ecfg.max_new_tokens))
    if system.cfg.model.get("reader", "rag") == "fid":  # one search over the fused passages
      gen, g_params = Seq2Seq(model.generator_cfg), params["generator"]
      if kw["num_beams"] == 1:
        seqs = beam.greedy_search(gen, g_params, ids, mask, kw["max_new_tokens"])
      else:
        seqs = beam.beam_search(gen, g_params, ids, mask, **kw).sequences
    elif ecfg.decoding == "rag_token" or system.closed_book or system.cfg.model.loss == "top1":
      seqs = rag_token_generate(model, params, ids, mask, scores, **kw).sequences
    elif ecfg.decoding in ("rag_sequence_fast", "rag_sequence_thorough"):
      mode = ecfg.decoding.rsplit("_", 1)[1]
      seqs = rag_sequence_generate(model, params, ids, mask, scores, mode=mode, **kw
                                   ).sequences[:, 0]
    else:
      raise ValueError(f"eval.decoding {ecfg.decoding!r}: expected one of {DECODINGS}")
  return gather(seqs), gather(scores)


def hub_stats(top1_n: np.ndarray, num_passages: int) -> dict:
  """How concentrated the questions' top-1 passages are (hubness, Radovanovic et al. 2010): the
  fraction of distinct passages among the N top-1 rows (1.0: every question retrieves its own;
  a collapsed query encoder sends many questions to a few passages), the largest share of
  questions one passage is top-1 for, and the corpus fraction ever retrieved at rank 1."""
  top1_n = np.asarray(top1_n)
  counts = np.bincount(top1_n, minlength=num_passages)
  return {"top1_distinct_fraction": float(len(np.unique(top1_n)) / len(top1_n)),
          "top1_max_share": float(counts.max() / len(top1_n)),
          "top1_corpus_coverage": float(np.count_nonzero(counts) / num_passages)}


def evaluate(feeder: Feeder, params, questions: Sequence[Question], ecfg, step: int = 0,
             num_examples: int = 20) -> dict:
  """Exact match, F1 and answer recall@k over `questions` (module docstring).

  Questions are decoded in global batches of `ecfg.batch_size` (the last one padded by
  repetition, padding not scored). Returns a JSON-able dict with `step`, `num_questions`,
  `exact_match`, `f1` (fractions in [0, 1]), `answer_recall` `{"@k": r}` for k in
  `ecfg.recall_ks` (k beyond K: the same search run k deep, `Feeder.top_rows`), `retrieval`
  (`hub_stats` of the top-1 passages), `decoding`,
  `seconds`, and the first `num_examples` predictions (with the K passages the generator read).

  Raises: ValueError on an empty question list or an unknown decoding.
  """
  if not questions:
    raise ValueError("evaluate: no questions")
  if feeder.system.cfg.model.loss == "dpr":
    return evaluate_retrieval_only(feeder, params, questions, ecfg, step, num_examples)
  system = feeder.system
  size = int(ecfg.batch_size)
  t0 = time.perf_counter()
  preds, rows_all = [], []
  depth = max([system.k, *ecfg.recall_ks]) if not system.closed_book else 0
  for start in range(0, len(questions), size):
    chunk = list(questions[start:start + size])
    chunk += [chunk[-1]] * (size - len(chunk))
    batch = feeder.batch(params, chunk[feeder.local_rows(size)])
    seqs, _ = decode_batch(feeder, params, batch, ecfg)
    n = min(size, len(questions) - start)
    preds += [system.gen_tok.decode(s) for s in seqs[:n]]
    rows = gather(batch["doc_ids"]) if depth <= system.k else feeder.top_rows(params, batch,
                                                                              depth)
    rows_all.append(rows[:n])
  rows = np.concatenate(rows_all)
  em, f1s = [], []
  for q, pred in zip(questions, preds):
    e, f = qa_scores(pred, q.answers, q.answers_are_regex)
    em.append(e)
    f1s.append(f)
  out = {"step": int(step), "num_questions": len(questions), "decoding": ecfg.decoding,
         "loss": system.cfg.model.loss, "exact_match": float(np.mean(em)),
         "f1": float(np.mean(f1s))}
  if not system.closed_book:
    hits = np.array([[has_answer(system.passages[r].text, q.answers,
                                         regex=q.answers_are_regex) for r in row]
                     for q, row in zip(questions, rows)], dtype=bool)
    ks = [k for k in ecfg.recall_ks if k <= hits.shape[1]]
    out["answer_recall"] = recall_at_k(hits, ks)
    out["retrieval"] = hub_stats(rows[:, 0], len(system.passages))
  out["seconds"] = round(time.perf_counter() - t0, 2)
  out["examples"] = [{"question": q.question, "answers": list(q.answers), "prediction": p,
                      "passages": ([system.passages[r].id for r in row[:system.reader_k]]
                                   if not system.closed_book else [])}
                     for q, p, row in list(zip(questions, preds, rows))[:num_examples]]
  return out


def evaluate_retrieval_only(feeder: Feeder, params, questions: Sequence[Question], ecfg,
                            step: int = 0, num_examples: int = 20) -> dict:
  """A retriever-only run's evaluation (`model.loss="dpr"`): the live query encoder searches
  the current index `max(K, recall_ks)` deep. Returns `step`, `num_questions`, `loss`,
  `answer_recall` and, when every question has gold ids, `gold_recall` (`{"k": r}`, fractions
  in [0, 1]; DPR's top-k retrieval accuracy), `retrieval` (`hub_stats`), `seconds` and the first
  `num_examples` questions with their top-K passage ids. Raises: ValueError on no questions."""
  if not questions:
    raise ValueError("evaluate: no questions")
  system = feeder.system
  size, t0 = int(ecfg.batch_size), time.perf_counter()
  depth = max([system.k, *ecfg.recall_ks])
  rows_all = []
  for start in range(0, len(questions), size):
    chunk = list(questions[start:start + size])
    chunk += [chunk[-1]] * (size - len(chunk))
    host = system.question_batch(chunk[feeder.local_rows(size)])
    batch = {key: feeder._put(host[key]) for key in ("query_input_ids", "query_attention_mask")}
    rows_all.append(feeder.top_rows(params, batch, depth)[:len(questions) - start])
  rows = np.concatenate(rows_all)
  ks = [k for k in ecfg.recall_ks if k <= rows.shape[1]]
  recall = recall_report(system.passages, questions, rows, ks)
  out = {"step": int(step), "num_questions": len(questions), "loss": "dpr",
         "answer_recall": recall["answer"],
         **({"gold_recall": recall["gold"]} if "gold" in recall else {}),
         "retrieval": hub_stats(rows[:, 0], len(system.passages)),
         "seconds": round(time.perf_counter() - t0, 2)}
  out["examples"] = [{"question": q.question, "answers": list(q.answers),
                      "passages": [system.passages[r].id for r in row[:system.k]]}
                     for q, row in list(zip(questions, rows))[:num_examples]]
  return out
