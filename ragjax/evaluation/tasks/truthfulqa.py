"""TruthfulQA multiple choice (Lin et al. 2022): MC1 and MC2 by answer log-likelihood.

As EleutherAI's lm-evaluation-harness (`tasks/truthfulqa/truthfulqa_mc1.yaml`, `utils.py`
`process_results_mc2`), on the log-likelihood `ll(c) = log p(c | question)` of each choice c in
nats, which for a RAG system is the marginal over its retrieved passages (Lewis et al. 2020
eq. 1 / eq. 2; `Engine.score`), for a closed-book system the generator's own:

  MC1 = 1 when the choice with the highest ll among `mc1_targets` is a true one (the harness puts
        the single true choice first and takes argmax == 0; ties go to the first, as here);
  MC2 = sum over true choices t of exp(ll(t)) / sum over all choices c of exp(ll(c)), the
        normalised probability mass on the true `mc2_targets`, computed as a softmax.

The question is the reader's input as it is (no few-shot preamble: the harness's preamble is a
decoder-only LM's prompt; a seq2seq reader reads the question and scores the choice as its
target). Data: `mc_task.json` (a list of `{"question", "mc1_targets": {choice: 0|1},
"mc2_targets": {...}}`) or the HuggingFace `truthful_qa/multiple_choice` rows (`{"question",
"mc1_targets": {"choices": [...], "labels": [...]}, ...}`) as a JSON list or JSON Lines.
Empty choice strings are dropped and counted (`stats["empty_choices_dropped"]`, reported in
OUT.json's `input`): the January 2025 `mc_task.json` in the shared data has 39 choice sets with
a "" choice (in 22 of its 790 questions, e.g. #284 and #293), which would score log p(end of sequence).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ragjax.data import corpus
from ragjax.data.corpus import ErrorPolicy, type_name
from ragjax.data.qa import MISSING, Question, iter_json_array
from ragjax.errors import DataError
from ragjax.evaluation.tasks.base import Example, Scorer, Task, batches, read_passages

SETS = ("mc1_targets", "mc2_targets")


def mc1(lls: Sequence[float], labels: Sequence[int]) -> float:
  """1.0 when the highest log-likelihood choice (the first on a tie) is true, else 0.0."""
  return float(labels[int(np.argmax(np.asarray(lls, np.float64)))] == 1)


def mc2(lls: Sequence[float], labels: Sequence[int]) -> float:
  """The softmax mass of the true choices: sum_t exp(ll_t) / sum_c exp(ll_c) (lm-eval
  `process_results_mc2`), computed with the max subtracted."""
  lls = np.asarray(lls, np.float64)
  p = np.exp(lls - lls.max())
  return float(p[np.asarray(labels) == 1].sum() / p.sum())


def _targets(v, *, path, line, field, dropped: list[int]
             ) -> tuple[tuple[str, ...], tuple[int, ...]]:
  if isinstance(v, dict) and set(v) == {"choices", "labels"}:
    choices, labels = v["choices"], v["labels"]
  elif isinstance(v, dict):
    choices, labels = list(v), list(v.values())
  else:
    raise DataError(f"expected {{choice: 0|1}} or {{choices, labels}}, got {type_name(v)}",
                    path=path, line=line, field=field)
  if not choices or len(choices) != len(labels) or not all(isinstance(c, str) for c in choices):
    raise DataError("expected a non-empty list of choice strings, one label each", path=path,
                    line=line, field=field)
  kept = [(c, lab) for c, lab in zip(choices, labels) if c.strip()]
  dropped[0] += len(choices) - len(kept)  # the 2025 mc_task.json has "" choices (module doc)
  choices, labels = [c for c, _ in kept], [lab for _, lab in kept]
  if any(lab not in (0, 1) for lab in labels) or 1 not in labels:
    raise DataError(f"labels {list(labels)}: expected 0 or 1 with at least one 1", path=path,
                    line=line, field=field)
  return tuple(choices), tuple(int(x) for x in labels)


def load(path, skip_invalid: bool = False, stats: dict | None = None) -> list[Example]:
  """TruthfulQA's multiple-choice rows as Examples (module docstring for the formats).
  Raises: DataError naming file, line and field; on no rows at all."""
  policy = ErrorPolicy(skip_invalid, stats)
  dropped = [0]
  head = corpus.head_text(path).lstrip()
  rows = (iter_json_array(path, "{question, mc1_targets, mc2_targets} objects")
          if head.startswith("[") else corpus.iter_json_lines(path, policy))
  out = []
  for line, obj in rows:
    try:
      if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type_name(obj)}", path=path, line=line)
      q = obj.get("question", MISSING)
      if not isinstance(q, str) or not q.strip():
        raise DataError("missing or empty; expected the question string", path=path, line=line,
                        field="question")
      sets = []
      for name in SETS:
        if name not in obj:
          raise DataError("missing", path=path, line=line, field=name)
        choices, labels = _targets(obj[name], path=path, line=line, field=name,
                                   dropped=dropped)
        sets.append((name.split("_")[0], choices, labels))
      true = tuple(c for c, lab in zip(sets[1][1], sets[1][2]) if lab == 1)
      out.append(Example(Question(f"truthfulqa-{len(out)}", q, true), choice_sets=tuple(sets)))
      policy.ok()
    except DataError as e:
      policy.bad(e)
  if not out:
    raise DataError("no questions; expected at least one", path=path)
  policy.stats["empty_choices_dropped"] = dropped[0]
  return out


def choice_logprobs(scorer: Scorer, question: str, choices: Sequence[str]) -> dict[str, float]:
  """ll of each distinct choice (scored once, in chunks of the scorer's `max_answers`)."""
  unique = list(dict.fromkeys(choices))
  lls = [x for chunk in batches(unique, scorer.max_answers)
         for x in scorer.score(question, list(chunk))]
  return dict(zip(unique, lls))


def run(scorer: Scorer, examples: Sequence[Example], recall_ks=()) -> tuple[dict, list[dict]]:
  """MC1 and MC2 over `examples` (module docstring). Returns `({"mc1", "mc2"}, records)`; each
  record's `score` holds its mc1, mc2 and every choice's ll, `prediction` the best mc1 choice.
  Raises: ValueError (no examples)."""
  if not examples:
    raise ValueError("truthfulqa_mc: no examples")
  records, m1, m2 = [], [], []
  for e, read in zip(examples, read_passages(scorer, examples)):
    sets = {name: (choices, labels) for name, choices, labels in e.choice_sets}
    ll = choice_logprobs(scorer, e.question.question, [c for cs, _ in sets.values() for c in cs])
    c1, l1 = sets["mc1"]
    c2, l2 = sets["mc2"]
    s1, s2 = mc1([ll[c] for c in c1], l1), mc2([ll[c] for c in c2], l2)
    m1.append(s1)
    m2.append(s2)
    records.append({"id": e.question.id, "question": e.question.question,
                    "prediction": c1[int(np.argmax([ll[c] for c in c1]))],
                    "gold": list(e.question.answers), "passages": read,
                    "score": {"mc1": s1, "mc2": s2, "logprobs": ll}})
  return {"mc1": float(np.mean(m1)), "mc2": float(np.mean(m2))}, records


TASK = Task("truthfulqa_mc", load, run, "truthfulqa/mc_task.json", needs_logits=True,
            description="TruthfulQA mc_task.json or HF multiple_choice rows")
