"""Open-domain QA tasks: NQ-open, TriviaQA, WebQuestions, CuratedTREC, SQuAD-open, HotpotQA.

Each question is answered by the system's decoding (RAG-Token / RAG-Sequence / FiD, as the
bundle says) and scored against its reference answers by exact match and token F1 after SQuAD
answer normalisation (Rajpurkar et al. 2016, `evaluate-v1.1.py`), or for CuratedTREC's regex
answers by `regex_match` (EM = F1 = match, DPR `qa_validation.py`). Answer recall@k (DPR's top-k
retrieval accuracy, Karpukhin et al. 2020 §5.1): a passage among the first k retrieved contains
an answer (`ragjax.data.answers.has_answer` on the passage text). Defaults read the DPR test
splits in the shared data (NQ-open: its dev set, the usual open-domain test set).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ragjax.data.answers import has_answer
from ragjax.data.qa import read_questions
from ragjax.evaluation.metrics import qa_scores
from ragjax.evaluation.tasks.base import (Example, Scorer, Task, batches, retrieval_depth,
                                         retrieve_all)
from ragjax.retrieval.evaluate import recall_at_k


def load_questions(path, fmt: str | None = None, *, skip_invalid: bool = False,
                   stats: dict | None = None) -> list[Example]:
  """`ragjax.data.qa.read_questions` of `path` (format detected unless `fmt`), as Examples.
  Raises: DataError naming file and line."""
  return [Example(q) for q in read_questions(path, fmt, skip_invalid=skip_invalid, stats=stats)]


def run_qa(scorer: Scorer, examples: Sequence[Example], recall_ks: Sequence[int] = (1, 5, 20),
           ranked: list[list[dict]] | None = None) -> tuple[dict, list[dict]]:
  """Decode every question, score EM / F1, and answer recall@k over `recall_ks` (those up to the
  system's deepest search; none for a closed-book system). `ranked`: the passages already
  retrieved for each example to `retrieval_depth(scorer, recall_ks)` (retrieved here if None).

  Returns `(metrics, records)`: metrics `{"exact_match", "f1", "answer_recall": {"k": r}}`
  (fractions in [0, 1]); a record per example with `prediction`, `gold`, `passages` (the ids the
  reader read) and `score` `{"exact_match", "f1", "first_hit"}` (the 1-based rank of the first
  retrieved passage with an answer, or null). Raises: ValueError (no examples)."""
  if not examples:
    raise ValueError("run_qa: no examples")
  texts = [e.question.question for e in examples]
  outs = [o for chunk in batches(texts, scorer.max_batch) for o in scorer.answer(list(chunk))]
  depth = retrieval_depth(scorer, recall_ks)
  ks = [k for k in recall_ks if k <= depth]
  top = retrieve_all(scorer, examples, depth) if ranked is None else ranked
  records, em, f1s, hits = [], [], [], []
  for e, out, ranked in zip(examples, outs, top):
    q = e.question
    score_em, score_f1 = qa_scores(out["answer"], q.answers, q.answers_are_regex)
    hit = [has_answer(p["text"], q.answers, regex=q.answers_are_regex) for p in ranked]
    hit += [False] * (depth - len(hit))  # fewer passages than the depth (a small corpus)
    em.append(score_em)
    f1s.append(score_f1)
    hits.append(hit)
    records.append({"id": q.id, "question": q.question, "prediction": out["answer"],
                    "gold": list(q.answers),
                    "passages": [p["id"] for p in out["passages"][:scorer.reader_k]],
                    "score": {"exact_match": score_em, "f1": score_f1,
                              "first_hit": hit.index(True) + 1 if any(hit) else None},
                    **({"tags": dict(e.tags)} if e.tags else {})})
  metrics = {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1s))}
  if ks:
    metrics["answer_recall"] = recall_at_k(np.array(hits, dtype=bool), ks)
  return metrics, records


def _qa_task(name: str, default: str | None, fmt: str | None, description: str) -> Task:
  def load(path, skip_invalid=False, stats=None):
    return load_questions(path, fmt, skip_invalid=skip_invalid, stats=stats)
  return Task(name, load, run_qa, default, description=description)


TASKS = (
    _qa_task("qa", None, None, "any question file ragjax reads: questions JSON Lines {id, "
             "question, answers}, NQ-open, DPR qa.csv, SQuAD, CuratedTREC, WebQuestions, "
             "HotpotQA"),
    _qa_task("nq_open", "nq_open/NQ-open.dev.jsonl", None,
             "NQ-open JSON Lines {question, answer: [...]}"),
    _qa_task("triviaqa", "triviaqa_open/topics.dpr.trivia.test.txt.gz", None,
             "DPR qa.csv: question<TAB>['answer', ...]"),
    _qa_task("webquestions", "webquestions/topics.dpr.wq.test.txt", None,
             "DPR JSON Lines {question, answer: [...]}, or brmson JSON"),
    _qa_task("curatedtrec", "curatedtrec/topics.dpr.curated.test.txt", None,
             "DPR qa.csv with regex answers, or brmson TSV"),
    _qa_task("squad_open", "squad_v1.1/squad1.1_dev_questions.jsonl.gz", None,
             "questions JSON Lines, or SQuAD v1.1 JSON"),
    _qa_task("hotpotqa", None, "hotpotqa",
             "HotpotQA JSON list {_id, question, answer, supporting_facts}, e.g. "
             "hotpot_dev_distractor_v1.json"),
)
