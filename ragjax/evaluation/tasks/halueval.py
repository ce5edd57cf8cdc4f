"""HaluEval QA (Li et al. 2023) judged by logits: is this answer hallucinated?

For each (knowledge, question, answer) the system scores the targets "Yes" and "No" after the
HaluEval QA judgement prompt (its `#Question#` / `#Answer#` / `#Your Judgement#` layout and the
opening of its `qa_evaluation_instruction.txt`) and judges "Yes" (hallucinated) when
`log p("Yes" | prompt) > log p("No" | prompt)`; accuracy is against the label. Unlike HaluEval's
own `evaluate.py`, which parses a chat model's generated text, nothing is decoded. Deviations,
for a seq2seq RAG reader: the question comes first (the query encoder reads the prompt's first
`retriever.query_max_length` tokens, and retrieval should see the question, not the
instruction), the knowledge is included as `#Knowledge#`, and the targets have no leading space
(a seq2seq target starts a fresh sequence).

Formats: HaluEval's `qa_data.json` (JSON Lines `{"knowledge", "question", "right_answer",
"hallucinated_answer"}`: two examples each, the right answer labelled "No" and the hallucinated
one "Yes") and the HuggingFace `pminervini/HaluEval` `qa_samples` rows (`{"knowledge",
"question", "answer", "hallucination": "yes" | "no"}`), as JSON Lines or a JSON list.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ragjax.data import corpus
from ragjax.data.corpus import ErrorPolicy, type_name
from ragjax.data.qa import Question, iter_json_array
from ragjax.errors import DataError
from ragjax.evaluation.tasks.base import Example, Scorer, Task, read_passages

INSTRUCTION = ("I want you act as an answer judge. Given a question and an answer, your objective "
               "is to determine if the provided answer contains non-factual or hallucinated "
               "information.")
TARGETS = ("Yes", "No")


def prompt(question: str, answer: str, knowledge: str = "") -> str:
  """The judgement prompt of one example (module docstring)."""
  know = f"\n#Knowledge#: {knowledge}" if knowledge else ""
  return (f"#Question#: {question}\n#Answer#: {answer}{know}\n{INSTRUCTION} Answer Yes or No."
          "\n#Your Judgement#:")


def _text(obj, key, *, path, line, required=True) -> str:
  v = obj.get(key)
  if not required and (v is None or v == ""):
    return ""
  if not isinstance(v, str) or not v.strip():
    got = "missing" if key not in obj else f"got {type_name(v)} {v!r}"[:80]
    raise DataError(f"{got}; expected a non-empty string", path=path, line=line, field=key)
  return v


def load(path, skip_invalid: bool = False, stats: dict | None = None) -> list[Example]:
  """HaluEval QA rows as Examples with tag `label` = "Yes" (hallucinated) or "No".
  Raises: DataError naming file, line and field (a row of neither format names both)."""
  policy = ErrorPolicy(skip_invalid, stats)
  head = corpus.head_text(path).lstrip()
  rows = (iter_json_array(path, "HaluEval QA objects") if head.startswith("[")
          else corpus.iter_json_lines(path, policy))
  out = []
  for line, obj in rows:
    try:
      if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type_name(obj)}", path=path, line=line)
      q = _text(obj, "question", path=path, line=line)
      know = _text(obj, "knowledge", path=path, line=line, required=False)
      if "right_answer" in obj or "hallucinated_answer" in obj:
        pairs = [(_text(obj, "right_answer", path=path, line=line), "No"),
                 (_text(obj, "hallucinated_answer", path=path, line=line), "Yes")]
      elif "answer" in obj:
        label = obj.get("hallucination")
        if not isinstance(label, str) or label.lower() not in ("yes", "no"):
          raise DataError(f"got {label!r}; expected \"yes\" or \"no\"", path=path, line=line,
                          field="hallucination")
        pairs = [(_text(obj, "answer", path=path, line=line), label.capitalize())]
      else:
        raise DataError("expected right_answer + hallucinated_answer (qa_data.json) or answer + "
                        "hallucination (qa_samples)", path=path, line=line)
      for answer, label in pairs:
        i = len(out)
        out.append(Example(Question(f"halueval-{i}", prompt(q, answer, know), (label,)),
                           choice_sets=(("judgement", TARGETS, (int(label == "Yes"),
                                                                int(label == "No"))),),
                           tags=(("label", label),)))
      policy.ok()
    except DataError as e:
      policy.bad(e)
  if not out:
    raise DataError("no examples; expected at least one", path=path)
  return out


def run(scorer: Scorer, examples: Sequence[Example], recall_ks=()) -> tuple[dict, list[dict]]:
  """Accuracy of the Yes/No judgement by log-likelihood. Returns `({"accuracy", "yes_rate",
  "accuracy_by_label": {"Yes", "No"}}, records)`; a record's `score` holds both log-likelihoods
  and `correct`. Raises: ValueError (no examples)."""
  if not examples:
    raise ValueError("halueval_qa: no examples")
  records, correct, yes = [], [], []
  for e, read in zip(examples, read_passages(scorer, examples)):
    ll_yes, ll_no = scorer.score(e.question.question, list(TARGETS))
    pred = "Yes" if ll_yes > ll_no else "No"
    label = dict(e.tags)["label"]
    correct.append(float(pred == label))
    yes.append(float(pred == "Yes"))
    records.append({"id": e.question.id, "question": e.question.question, "prediction": pred,
                    "gold": [label], "passages": read,
                    "score": {"logprob_yes": ll_yes, "logprob_no": ll_no,
                              "correct": pred == label}})
  labels = np.array([dict(e.tags)["label"] for e in examples])
  acc = np.array(correct)
  by_label = {lab: float(acc[labels == lab].mean()) for lab in TARGETS if (labels == lab).any()}
  return {"accuracy": float(acc.mean()), "yes_rate": float(np.mean(yes)),
          "accuracy_by_label": by_label}, records


TASK = Task("halueval_qa", load, run, None, needs_logits=True,
            description="HaluEval qa_data.json or qa_samples rows")
