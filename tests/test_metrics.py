"""ragjax.metrics against hand-computed values and the official SQuAD v1.1 script."""
import collections
import re
import string

import numpy as np
import pytest

from ragjax.data import answers
from ragjax.evaluation import metrics as em_metrics
from ragjax.data.answers import has_answer, normalize_answer, regex_match
from ragjax.evaluation.metrics import exact_match, f1
from ragjax.retrieval.evaluate import recall_at_k


# Reference: the official SQuAD v1.1 evaluate-v1.1.py, restated step by step.
def _ref_normalize(s):
  s = s.lower()
  s = "".join(ch for ch in s if ch not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def _ref_f1(prediction, ground_truth):
  p, g = _ref_normalize(prediction).split(), _ref_normalize(ground_truth).split()
  common = collections.Counter(p) & collections.Counter(g)
  same = sum(common.values())
  if same == 0:
    return 0
  precision, recall = 1.0 * same / len(p), 1.0 * same / len(g)
  return (2 * precision * recall) / (precision + recall)


_STRINGS = ["The Denver Broncos", "denver  broncos!", "Broncos", "an apple a day", "A+", "",
            "Theatre of the absurd", "U.S.A.", "Ahärôn's   (\"quoted\")", "the the the",
            "24–10", "Carolina Panthers 24-10", "x y y", "y y z", "Santa Clara, California"]


@pytest.mark.parametrize("s, expected", [
    ("The Denver Broncos!", "denver broncos"),
    ("An apple a day", "apple day"),
    ("Theatre, the THEATRE", "theatre theatre"),   # \b: "the" inside a word stays
    ("U.S.A.", "usa"),                            # punctuation removed, not replaced
    ("  tabs\tand\nnewlines ", "tabs and newlines"),
    ("24–10", "24–10"),                            # en dash is not ASCII punctuation
    ("A+", ""),
])
def test_normalize_answer_hand_values(s, expected):
  assert normalize_answer(s) == expected


def test_normalize_and_f1_match_official_script():
  for a in _STRINGS:
    assert normalize_answer(a) == _ref_normalize(a)
    for b in _STRINGS:
      assert f1(a, [b]) == pytest.approx(_ref_f1(a, b))
      assert exact_match(a, [b]) == float(_ref_normalize(a) == _ref_normalize(b))


def test_exact_match_and_f1_hand_values():
  # SQuAD dev question 56be4db0acb8001400a502ec: answers "Denver Broncos" x3.
  assert exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
  assert exact_match("Broncos", ["Denver Broncos"]) == 0.0
  assert exact_match("Broncos", ["Denver Broncos", "broncos"]) == 1.0  # max over answers
  # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8.
  assert f1("the Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
  # multiset overlap: "x y y" vs "y y z" share y twice: P = R = 2/3.
  assert f1("x y y", ["y y z"]) == pytest.approx(2 / 3)
  assert f1("x y y", ["q", "y y z", "x"]) == pytest.approx(2 / 3)  # max: "x" gives 0.5
  assert f1("nothing shared", ["Denver Broncos"]) == 0.0
  # The official script: an empty prediction scores F1 0 even against an empty answer, EM 1.
  assert f1("", [""]) == 0.0 and exact_match("", ["the"]) == 1.0


@pytest.mark.parametrize("fn", [exact_match, f1])
def test_answer_argument_checks(fn):
  with pytest.raises(ValueError, match="empty"):
    fn("x", [])
  with pytest.raises(TypeError, match="single string"):
    fn("x", "x")


def test_regex_match_dpr_curated_pattern():
  # CuratedTREC "How tall is Mount McKinley?" (brmson curated-test.tsv, id 1669).
  pat = (r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t|6,194-meter|20,?237\s*f(oo|ee)?t|"
         r"20,?073\s*f(oo|ee)?t|6,?168\s*m|6,118\s*m|6\,194 m|20\,322 feet")
  assert regex_match("McKinley rises 20,320 FEET above sea level", pat)
  assert regex_match("a 6,194-meter peak", pat)
  assert not regex_match("it is 19,000 feet tall", pat)
  assert regex_match("line one\nSEPT 5", r"^sept?(ember)?")  # case-insensitive, multiline
  with pytest.raises(ValueError, match=r"does not compile"):
    regex_match("text", "(unclosed")


def test_has_answer_string_mode():
  passage = ("The American Football Conference (AFC) champion Denver Broncos defeated the "
             "National Football Conference (NFC) champion Carolina Panthers 24–10.")
  assert has_answer(passage, ["Denver Broncos"])
  assert has_answer(passage, ["the DENVER broncos!"])           # normalised both sides
  assert has_answer(passage, ["nope", "Carolina Panthers"])      # any answer
  assert not has_answer(passage, ["Broncos Denver"])            # order matters
  assert not has_answer(passage, ["Bronco"])                    # whole tokens only
  assert not has_answer(passage, ["Denver National"])           # contiguous only
  assert has_answer(passage, ["afc"])                           # "(AFC)" -> "afc"
  assert not has_answer(passage, ["A+", ")", "."])              # normalise to nothing: no match
  assert not has_answer(passage, [])
  with pytest.raises(TypeError):
    has_answer(passage, "Denver Broncos")


def test_has_answer_regex_mode():
  assert has_answer("Founded in Sept. 1999", [r"nothing", r"Sept?(ember)?"], regex=True)
  assert not has_answer("Founded in May", [r"Sept?(ember)?"], regex=True)
  # Regex mode matches the raw text: punctuation is not normalised away.
  assert has_answer("the U.S.A. team", [r"U\.S\.A\."], regex=True)
  assert not has_answer("the USA team", [r"U\.S\.A\."], regex=True)


def test_has_answer_on_squad_gold_paragraphs(shared_data):
  """SQuAD answers are spans of their paragraph, so nearly every gold paragraph has the answer.

  The misses come from SQuAD normalisation deleting punctuation inside tokens: the answer "gold"
  is not a token of "gold-themed" -> "goldthemed".
  """
  from ragjax.data import corpus, qa
  sq = shared_data / "squad_v1.1"
  passages = {p.id: p.text for p in corpus.read_passages(sq / "squad1.1_dev_corpus.jsonl.gz")}
  qs = qa.read_questions(sq / "squad1.1_dev_questions.jsonl.gz")
  hits = [has_answer(passages[q.gold_passage_ids[0]], q.answers) for q in qs]
  assert sum(hits) / len(hits) > 0.985  # 10,461 / 10,570 when last run
  assert not has_answer("the league emphasized gold-themed initiatives", ["gold"])
  assert has_answer("the league emphasized gold-themed initiatives", ["gold-themed"])


def test_recall_at_k_hand_example():
  hits_nk = np.array([[0, 1, 0],
                      [0, 0, 0],
                      [1, 0, 0],
                      [0, 0, 1]], dtype=bool)
  assert recall_at_k(hits_nk, [1, 2, 3]) == {"1": 0.25, "2": 0.5, "3": 0.75}
  assert recall_at_k(hits_nk, (np.int64(2),)) == {"2": 0.5}


def test_recall_at_k_matches_brute_force():
  rng = np.random.default_rng(0)
  hits_nk = rng.random((50, 20)) < 0.05
  got = recall_at_k(hits_nk, range(1, 21))
  for k in range(1, 21):
    expected = sum(any(row[:k]) for row in hits_nk.tolist()) / 50
    assert got[str(k)] == pytest.approx(expected)
  values = [got[str(k)] for k in range(1, 21)]
  assert values == sorted(values)  # monotone in k


@pytest.mark.parametrize("hits, ks, err, match", [
    (np.zeros((2, 3), bool), [4], ValueError, "k=4 outside 1..K=3"),
    (np.zeros((2, 3), bool), [0], ValueError, "k=0"),
    (np.zeros((2, 3), np.int32), [1], TypeError, "bool"),
    (np.zeros(3, bool), [1], ValueError, "2-D"),
    (np.zeros((0, 3), bool), [1], ValueError, "no rows"),
])
def test_recall_at_k_errors(hits, ks, err, match):
  with pytest.raises(err, match=match):
    recall_at_k(hits, ks)


def test_compile_answer_regex_is_cached():
  assert answers.compile_answer_regex("abc") is answers.compile_answer_regex("abc")
