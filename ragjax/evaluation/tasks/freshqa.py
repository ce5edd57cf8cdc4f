"""FreshQA (Vu et al. 2023, "FreshLLMs"): questions whose answers never, slowly or quickly change,
and false-premise questions, scored by EM / F1 over its answer fields.

FreshQA's own protocol is a human or model judge (its "relaxed" and "strict" ratings); with no
judge here, ragjax scores each prediction against every non-empty `answer_0 .. answer_9` by
SQuAD exact match and F1 (`ragjax.evaluation.tasks.open_qa.run_qa`), and reports each by the
dataset's own splits: `fact_type` (never-changing, slow-changing, fast-changing), `false_premise`
(TRUE / FALSE; the reference answer of a false-premise question debunks it) and `split` (TEST /
DEV). Data: the sheet's CSV export (`FreshQA_v04072025-freshqa.csv`), whose header row may follow
preamble rows (found as the first row that starts with `id` and has `question`).
"""
from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np

from ragjax.data import corpus
from ragjax.data.corpus import ErrorPolicy
from ragjax.data.qa import Question
from ragjax.errors import DataError
from ragjax.evaluation.tasks.base import Example, Scorer, Task
from ragjax.evaluation.tasks.open_qa import run_qa

BREAKDOWNS = ("fact_type", "false_premise", "split")
REQUIRED = ("id", "question", "answer_0", *BREAKDOWNS)


def load(path, skip_invalid: bool = False, stats: dict | None = None) -> list[Example]:
  """FreshQA rows as Examples tagged with their breakdown fields.
  Raises: DataError naming file, line and column (no header row, a missing column, an empty
  question, no answer)."""
  policy = ErrorPolicy(skip_invalid, stats)
  reader = csv.reader(io.StringIO(corpus.read_document(path), newline=""))
  header = None
  for row in reader:
    if row and row[0].strip().lower() == "id" and "question" in row:
      header = [c.strip() for c in row]
      break
    if reader.line_num > 20:
      break
  if header is None:
    raise DataError("no header row (id, split, question, ..., answer_0, ...) in the first 20 "
                    "lines; expected FreshQA's CSV export", path=path)
  missing = [c for c in REQUIRED if c not in header]
  if missing:
    raise DataError(f"header lacks columns {missing}; expected FreshQA's {list(REQUIRED)}",
                    path=path, line=reader.line_num)
  col = {c: i for i, c in enumerate(header)}
  answer_cols = [c for c in header if c.startswith("answer_")]
  out = []
  while True:
    line = reader.line_num + 1
    try:
      row = next(reader)
    except StopIteration:
      break
    if not any(x.strip() for x in row):
      continue
    try:
      if len(row) < len(header):
        raise DataError(f"{len(row)} columns; expected {len(header)}", path=path, line=line)
      q = row[col["question"]].strip()
      if not q:
        raise DataError("empty; expected the question", path=path, line=line, field="question")
      answers = tuple(a.strip() for a in (row[col[c]] for c in answer_cols) if a.strip())
      if not answers:
        raise DataError(f"all of {answer_cols} empty; expected at least one answer", path=path,
                        line=line)
      tags = tuple((b, row[col[b]].strip()) for b in BREAKDOWNS)
      out.append(Example(Question(f"freshqa-{row[col['id']].strip()}", q, answers), tags=tags))
      policy.ok()
    except DataError as e:
      policy.bad(e)
  if not out:
    raise DataError("no questions; expected at least one", path=path)
  return out


def breakdown(records: Sequence[dict], keys: Sequence[str] = BREAKDOWNS) -> dict:
  """`{key: {value: {"exact_match", "f1", "num_examples"}}}` of QA records carrying `tags`."""
  out = {}
  for key in keys:
    groups: dict[str, list[dict]] = {}
    for r in records:
      groups.setdefault(r["tags"][key], []).append(r)
    out[key] = {v: {"exact_match": float(np.mean([r["score"]["exact_match"] for r in rs])),
                    "f1": float(np.mean([r["score"]["f1"] for r in rs])),
                    "num_examples": len(rs)} for v, rs in sorted(groups.items())}
  return out


def run(scorer: Scorer, examples: Sequence[Example], recall_ks=(1, 5)) -> tuple[dict, list[dict]]:
  """`run_qa`'s metrics plus `by` (`breakdown` over fact type, false premise and split)."""
  metrics, records = run_qa(scorer, examples, recall_ks)
  metrics["by"] = breakdown(records)
  return metrics, records


TASK = Task("freshqa", load, run, "freshqa/FreshQA_v04072025-freshqa.csv",
            description="FreshQA CSV export")
