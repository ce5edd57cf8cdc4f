"""Exact match and token F1 of a predicted answer (Rajpurkar et al. 2016, the official SQuAD v1.1
evaluation script `evaluate-v1.1.py`), over `ragjax.data.answers.normalize_answer`."""
from __future__ import annotations

import collections
from typing import Sequence

from ragjax.data.answers import check_answers, normalize_answer, regex_match


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  """1.0 if normalize_answer(prediction) equals that of any answer, else 0.0.

  Source: `exact_match_score` + `metric_max_over_ground_truths`, SQuAD v1.1 evaluate-v1.1.py.
  Raises: TypeError (answers is a str), ValueError (answers is empty).
  """
  check_answers(answers)
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(a) for a in answers))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
  """Max over answers of the bag-of-tokens F1 between normalised prediction and answer.

  F1 = 2 P R / (P + R), P = |common| / |pred tokens|, R = |common| / |answer tokens|, common =
  multiset intersection; 0 when nothing is shared. Source: `f1_score` +
  `metric_max_over_ground_truths`, SQuAD v1.1 evaluate-v1.1.py.
  Raises: TypeError (answers is a str), ValueError (answers is empty).
  """
  check_answers(answers)
  pred = normalize_answer(prediction).split()
  return max(_token_f1(pred, normalize_answer(a).split()) for a in answers)


def qa_scores(prediction: str, answers: Sequence[str], regex: bool = False) -> tuple[float, float]:
  """`(exact match, F1)` of one prediction: SQuAD's `exact_match` and `f1` above, or for regex
  answers (CuratedTREC, DPR's `regex_match`) EM = F1 = 1.0 when any pattern matches the
  prediction. Raises: as `exact_match`; ValueError (a pattern that does not compile)."""
  if regex:
    hit = float(any(regex_match(prediction, a) for a in answers))
    return hit, hit
  return exact_match(prediction, answers), f1(prediction, answers)
