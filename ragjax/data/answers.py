"""What an answer is: SQuAD answer normalisation, DPR's has-answer test, regex answers.

Exact match and F1 (`ragjax.evaluation.metrics`) and answer recall@k
(`ragjax.retrieval.evaluate`) are built on these.
"""
from __future__ import annotations

import functools
import re
import string
from typing import Iterable, Sequence

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


def check_answers(answers: Sequence[str]) -> None:
  if isinstance(answers, str):
    raise TypeError("answers must be a sequence of strings, not a single string")
  if len(answers) == 0:
    raise ValueError("answers is empty; expected at least one reference answer")


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
