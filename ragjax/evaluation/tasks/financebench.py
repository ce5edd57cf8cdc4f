"""FinanceBench (Islam et al. 2023): questions over company filings, with their evidence pages as
the corpus.

Data: `financebench_open_source.jsonl` (JSON Lines `{"financebench_id", "question", "answer",
"doc_name", "evidence": [{"evidence_text", "doc_name", "evidence_page_num",
"evidence_text_full_page"?}], ...}`). The corpus (`corpus(path)`, used unless `--corpus` names
another) is every distinct evidence page (its full text when given, else the evidence text),
split into 100-word passages titled with the document name (DPR's splitting,
`ragjax.data.corpus.split_document`), ids `"<doc_name>#page<N>-<i>"`. Metrics: EM / F1 and answer
recall@k as `open_qa.run_qa` (FinanceBench's answers are sentences, so EM is strict; F1 is the
informative one), plus evidence recall@k: a passage among the first k retrieved is from an
evidence document (`evidence_doc_recall`, by title) or an evidence page
(`evidence_page_recall`, by id).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ragjax.data import corpus
from ragjax.data.corpus import ErrorPolicy, Passage, split_document, type_name
from ragjax.data.qa import Question
from ragjax.errors import DataError
from ragjax.evaluation.tasks.base import Example, Scorer, Task, retrieval_depth, retrieve_all
from ragjax.evaluation.tasks.open_qa import run_qa
from ragjax.retrieval.evaluate import recall_at_k

WORDS_PER_PASSAGE = 100


def _evidence(obj, *, path, line) -> list[tuple[str, str, str]]:
  """`(doc_name, page, page text)` per evidence item."""
  ev = obj.get("evidence")
  if not isinstance(ev, list) or not ev:
    raise DataError(f"got {type_name(ev)}; expected a non-empty list of evidence objects",
                    path=path, line=line, field="evidence")
  out = []
  for i, e in enumerate(ev):
    if not isinstance(e, dict):
      raise DataError(f"item {i}: expected an object, got {type_name(e)}", path=path, line=line,
                      field="evidence")
    doc = e.get("doc_name", obj.get("doc_name"))
    page = e.get("evidence_page_num")
    text = e.get("evidence_text_full_page") or e.get("evidence_text")
    if not isinstance(doc, str) or not doc or not isinstance(page, (int, str)) or \
        not isinstance(text, str) or not text.strip():
      raise DataError(f"item {i}: expected doc_name, evidence_page_num and evidence_text",
                      path=path, line=line, field="evidence")
    out.append((doc, str(page), text))
  return out


def _rows(path, policy):
  for line, obj in corpus.iter_json_lines(path, policy):
    try:
      q, a = obj.get("question"), obj.get("answer")
      for key, v in (("question", q), ("answer", a)):
        if not isinstance(v, str) or not v.strip():
          raise DataError(f"got {type_name(v)}; expected a non-empty string", path=path,
                          line=line, field=key)
      yield line, obj, _evidence(obj, path=path, line=line)
    except DataError as e:
      policy.bad(e)


def load(path, skip_invalid: bool = False, stats: dict | None = None) -> list[Example]:
  """FinanceBench rows as Examples carrying their `(doc_name, page)` evidence.
  Raises: DataError naming file, line and field."""
  policy = ErrorPolicy(skip_invalid, stats)
  out = []
  for line, obj, ev in _rows(path, policy):
    qid = str(obj.get("financebench_id", f"financebench-{line}"))
    out.append(Example(Question(qid, obj["question"], (obj["answer"],)),
                       evidence=tuple(dict.fromkeys((d, p) for d, p, _ in ev))))
    policy.ok()
  if not out:
    raise DataError("no questions; expected at least one", path=path)
  return out


def load_corpus(path) -> list[Passage]:
  """The distinct evidence pages of a FinanceBench file as passages (module docstring)."""
  pages: dict[tuple[str, str], str] = {}
  for _, _, ev in _rows(path, ErrorPolicy()):
    for doc, page, text in ev:
      pages.setdefault((doc, page), text)
  return [p for (doc, page), text in pages.items()
          for p in split_document(f"{doc}#page{page}", doc, text, WORDS_PER_PASSAGE)]


def page_of(passage_id: str) -> tuple[str, str] | None:
  """`(doc_name, page)` of a passage id made by `load_corpus`, else None."""
  base = passage_id.rsplit("-", 1)[0]
  if "#page" not in base:
    return None
  doc, page = base.rsplit("#page", 1)
  return doc, page


def run(scorer: Scorer, examples: Sequence[Example], recall_ks=(1, 5, 20)
        ) -> tuple[dict, list[dict]]:
  """`run_qa`'s metrics plus `evidence_doc_recall` and `evidence_page_recall` `{"k": r}`."""
  depth = retrieval_depth(scorer, recall_ks)
  ranked = retrieve_all(scorer, examples, depth)
  metrics, records = run_qa(scorer, examples, recall_ks, ranked=ranked)
  if not depth:
    return metrics, records
  def hits(test):  # [N, depth], a short list (a small corpus) padded with misses
    return np.array([[test(e, p) for p in r] + [False] * (depth - len(r))
                     for e, r in zip(examples, ranked)], dtype=bool)
  docs = hits(lambda e, p: p["title"] in {d for d, _ in e.evidence})
  pages = hits(lambda e, p: page_of(p["id"]) in set(e.evidence))
  ks = [k for k in recall_ks if k <= depth]
  metrics["evidence_doc_recall"] = recall_at_k(docs, ks)
  metrics["evidence_page_recall"] = recall_at_k(pages, ks)
  for rec, d, p in zip(records, docs, pages):
    rec["score"]["evidence_doc_hit"] = bool(d.any())
    rec["score"]["evidence_page_hit"] = bool(p.any())
  return metrics, records


TASK = Task("financebench", load, run, None, corpus=load_corpus,
            description="FinanceBench financebench_open_source.jsonl")
