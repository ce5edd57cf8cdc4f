"""Answer matching (SQuAD EM/F1, DPR has-answer, regex) and retrieval recall@k."""
from __future__ import annotations

import collections
import functools
import re
import string
from typing import Iterable, Sequence

import numpy as np

_PUNCT = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE


def normalize_answer(s: str) -> str:
  """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

  Source: `normalize_answer` in the official SQuAD v1.1 evaluation script (evaluate-v1.1.py),
  same steps in the same order: lower -> remove punctuation -> remove articles -> whitespace.
  Note that an answer may normalise to "" (e.g. "A+", ")", "."); see `has_answer`.
  """
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  return " ".join(_ARTICLES_RE.sub(" ", s).split())


def _check_answers(answers: Sequence[str]) -> None:
  if isinstance(answers, str):
    raise TypeError("answers must be a sequence of strings, not a single string")
  if len(answers) == 0:
    raise ValueError("answers is empty; expected at least one reference answer")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  """1.0 if normalize_answer(prediction) equals that of any answer, else 0.0.

  Source: `exact_match_score` + `metric_max_over_ground_truths`, SQuAD v1.1 evaluate-v1.1.py.
  Raises: TypeError (answers is a str), ValueError (answers is empty).
  """
  _check_answers(answers)
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
  _check_answers(answers)
  pred = normalize_answer(prediction).split()
  return max(_token_f1(pred, normalize_answer(a).split()) for a in answers)


@functools.lru_cache(maxsize=65536)
def compile_answer_regex(pattern: str) -> re.Pattern:
  """`re.compile(pattern, IGNORECASE | UNICODE | MULTILINE)` (DPR's flags), cached.

  Raises: ValueError naming the pattern when it does not compile.
  """
  try:
    return re.compile(pattern, _REGEX_FLAGS)
  except re.error as e:
    raise ValueError(f"regex {pattern!r} does not compile: {e}") from None


def regex_match(text: str, pattern: str) -> bool:
  """True when `pattern` matches anywhere in `text`, case-insensitively (re.search).

  Source: `_regex_match` in DPR dpr/data/qa_validation.py (same flags), used there for
  CuratedTREC. Unlike DPR, a pattern that does not compile raises instead of returning False.
  Raises: ValueError (pattern does not compile).
  """
  return compile_answer_regex(pattern).search(text) is not None


def has_answer(passage_text: str, answers: Iterable[str], regex: bool = False) -> bool:
  """Whether a passage contains any answer: DPR's top-k retrieval accuracy test.

  String mode: the normalised answer's tokens occur as a contiguous run of the normalised
  passage's tokens (normalisation: `normalize_answer`, tokens: whitespace split). An answer that
  normalises to no tokens (e.g. "A+", ".") never matches: an empty run would match every passage.
  Regex mode: any pattern matches the raw passage text (`regex_match`).
  Source: `has_answer` in DPR dpr/data/qa_validation.py (match_type "string" / "regex"), here
  with SQuAD normalisation instead of DPR's SimpleTokenizer.
  Raises: TypeError (answers is a str); ValueError (regex mode, a pattern does not compile).
  """
  if isinstance(answers, str):
    raise TypeError("answers must be an iterable of strings, not a single string")
  if regex:
    return any(regex_match(passage_text, p) for p in answers)
  # Tokens never contain spaces, so " a b " in " x a b y " <=> [a, b] is a contiguous run.
  text = f" {normalize_answer(passage_text)} "
  for a in answers:
    norm = normalize_answer(a)
    if norm and f" {norm} " in text:
      return True
  return False


def recall_at_k(hits_nk: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
  """Fraction of rows (queries) with a hit among their first k columns (ranked results).

  hits_nk: bool [N, K]; hits_nk[i, j] = result j of query i contains an answer. Returns
  {str(k): mean_i any(hits_nk[i, :k])} (DPR "top-k retrieval accuracy", Karpukhin et al. 2020).
  Raises: TypeError (not a bool array); ValueError (not 2-D, N == 0, a k < 1 or k > K).
  """
  hits_nk = np.asarray(hits_nk)
  if hits_nk.dtype != np.bool_:
    raise TypeError(f"hits_nk must be a bool array, got dtype {hits_nk.dtype}")
  if hits_nk.ndim != 2:
    raise ValueError(f"hits_nk must be 2-D [N, K], got shape {hits_nk.shape}")
  n, k_max = hits_nk.shape
  if n == 0:
    raise ValueError("hits_nk has no rows; recall@k is undefined")
  first_hit_n = np.where(hits_nk.any(axis=1), hits_nk.argmax(axis=1), k_max)  # [N]
  out = {}
  for k in ks:
    k = int(k)
    if not 1 <= k <= k_max:
      raise ValueError(f"k={k} outside 1..K={k_max} (hits_nk has {k_max} columns)")
    out[str(k)] = float(np.mean(first_hit_n < k))
  return out
