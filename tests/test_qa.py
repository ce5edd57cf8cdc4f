"""Question-set readers (ragjax.data.qa) against the shared evaluation data and every error path."""
import ast
import collections
import gzip
import json

import pytest

from ragjax.data import qa
from ragjax.data.qa import Question, iter_questions, read_questions
from conftest import check_error as _check_error, write_bytes as _write
from ragjax.errors import DataError




# ---------------------------------------------------------------------------------------------
# Every shared file: format detected, record count as in /work/shared/data/README.md.

_NO_ANSWERS = ("no-annotations",)
_COUNTS = [
    ("nq_open/NQ-open.dev.jsonl", "nq_open", 3610),
    ("nq_open/NQ-open.efficientqa.dev.1.1.jsonl", "nq_open", 1800),
    ("nq_open/NQ-open.efficientqa.dev.1.1.no-annotations.jsonl", "nq_open", 1800),
    ("nq_open/NQ-open.efficientqa.test.1.1.jsonl", "nq_open", 1769),
    ("nq_open/NQ-open.efficientqa.test.1.1.no-annotations.jsonl", "nq_open", 1769),
    ("nq_open/dpr_format/topics.dpr.nq.test.txt", "dpr_qa_csv", 3610),
    ("nq_open/dpr_format/topics.dpr.nq.dev.txt", "dpr_qa_csv", 8757),
    ("nq_open/dpr_format/topics.nq.test.txt", "dpr_qa_csv", 3610),
    ("nq_open/dpr_format/topics.nq.dev.txt", "dpr_qa_csv", 8757),
    ("squad_v1.1/dev-v1.1.json.gz", "squad", 10570),
    ("squad_v1.1/squad1.1_dev_questions.jsonl.gz", "questions_jsonl", 10570),
    ("squad_v1.1/topics.dpr.squad.test.txt.gz", "dpr_jsonl", 10570),
    ("triviaqa_open/topics.dpr.trivia.test.txt.gz", "dpr_qa_csv", 11313),
    ("triviaqa_open/topics.dpr.trivia.dev.txt.gz", "dpr_qa_csv", 8837),
    ("webquestions/brmson_main_test.json", "webquestions", 2032),
    ("webquestions/brmson_main_trainmodel.json", "webquestions", 2834),
    ("webquestions/brmson_main_val.json", "webquestions", 755),
    ("webquestions/brmson_main_devtest.json", "webquestions", 189),
    ("webquestions/topics.dpr.wq.test.txt", "dpr_jsonl", 2032),
    ("curatedtrec/brmson_curated-full.tsv", "curatedtrec_tsv", 867),
    ("curatedtrec/brmson_curated-train.tsv", "curatedtrec_tsv", 430),
    ("curatedtrec/brmson_curated-test.tsv", "curatedtrec_tsv", 430),
    ("curatedtrec/brmson_large2470-train.tsv", "curatedtrec_tsv", 1704),
    ("curatedtrec/brmson_large2470-test.tsv", "curatedtrec_tsv", 766),
    ("curatedtrec/topics.dpr.curated.test.txt", "dpr_jsonl", 694),
]


@pytest.mark.parametrize("rel, fmt, count", _COUNTS, ids=[c[0] for c in _COUNTS])
def test_shared_file_count_and_format(shared_data, rel, fmt, count):
  path = shared_data / rel
  assert qa.detect_question_format(path) == fmt
  no_answers = any(s in rel for s in _NO_ANSWERS)
  stats = {}
  qs = read_questions(path, require_answers=not no_answers, stats=stats)
  assert len(qs) == count and stats == {"records": count, "skipped": 0, "errors": []}
  assert all(q.answers_are_regex == ("curated" in rel) for q in qs)
  assert all((not q.answers) == no_answers for q in qs)
  if no_answers:
    with pytest.raises(DataError) as e:
      read_questions(path)
    _check_error(e.value, path, 1, "answer", "missing")


def test_shared_first_records_match_readme_examples(shared_data):
  first = lambda rel: next(iter_questions(shared_data / rel))  # noqa: E731
  assert first("nq_open/NQ-open.dev.jsonl") == Question(
      "NQ-open.dev-0", "when was the last time anyone was on the moon",
      ("14 December 1972 UTC", "December 1972"))
  assert first("squad_v1.1/dev-v1.1.json.gz") == Question(
      "56be4db0acb8001400a502ec", "Which NFL team represented the AFC at Super Bowl 50?",
      ("Denver Broncos",), ("squad1.1-dev-000-000",))
  assert first("squad_v1.1/topics.dpr.squad.test.txt.gz").answers == ("Denver Broncos",) * 3
  assert first("webquestions/brmson_main_test.json") == Question(
      "wqs000000", "what does jamaican people speak?",
      ("Jamaican Creole English Language", "Jamaican English"))
  assert first("triviaqa_open/topics.dpr.trivia.test.txt.gz") == Question(
      "topics.dpr.trivia.test-0", "Who was the man behind The Chipmunks?", ("David Seville",))
  mckinley = first("curatedtrec/brmson_curated-test.tsv")
  assert mckinley.id == "1669" and mckinley.question == "How tall is Mount McKinley?"
  assert mckinley.answers[0].startswith(r"20\s?,?\s?(32|40)0") and mckinley.answers_are_regex
  nq = read_questions(shared_data / "nq_open/dpr_format/topics.nq.test.txt")
  assert nq[0] == Question("topics.nq.test-0", "who got the first nobel prize in physics",
                           ("Wilhelm Conrad Röntgen",))
  assert nq[1].answers == ("May 18, 2018",)  # untokenized, unlike topics.dpr.nq.*


def test_trivia_csv_quoted_lines(shared_data):
  """README: 15 test lines fail a naive split + literal_eval; all parse with csv.reader."""
  path = shared_data / "triviaqa_open/topics.dpr.trivia.test.txt.gz"
  naive_fail = 0
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      try:
        ast.literal_eval(line.rstrip("\n").split("\t")[1])
      except (ValueError, SyntaxError):
        naive_fail += 1
  assert naive_fail == 15
  qs = read_questions(path)
  assert qs[12].question == "In which decade did stereo records first go on sale?"  # line 13
  assert qs[12].answers == ("1930’s", "Thirties", "1930s literature", "Nineteen-thirties",
                            "1930–1939", "1930-1939", "'30s", "1930s", "1930's", "%6030s",
                            "1930s (decade)", "The Thirties")
  # Line 18 is CSV-quoted twice upstream; one csv parse (as DPR does) leaves the inner quoting.
  assert qs[17].question == '"How many different animal shapes are there in the ""Animal ' \
                            'Crackers"" cookie zoo?"'


def test_squad_json_equals_derived_questions(shared_data):
  """dev-v1.1.json read directly equals the derived file; answer-count histogram from README."""
  sq = shared_data / "squad_v1.1"
  direct = read_questions(sq / "dev-v1.1.json.gz")
  assert direct == read_questions(sq / "squad1.1_dev_questions.jsonl.gz")
  assert collections.Counter(len(q.answers) for q in direct) == {1: 4945, 2: 4051, 3: 1368,
                                                                  4: 166, 5: 40}
  passage_ids = {f"squad1.1-dev-{a:03d}-{p:03d}" for a in range(48) for p in range(200)}
  assert all(len(q.gold_passage_ids) == 1 and q.gold_passage_ids[0] in passage_ids
             for q in direct)


def test_shared_cross_file_relations(shared_data):
  """Relations the README states were checked upstream."""
  questions = lambda rel: [q.question for q in read_questions(shared_data / rel)]  # noqa: E731
  nq_test = set(questions("nq_open/dpr_format/topics.nq.test.txt"))
  nq_dev = set(questions("nq_open/NQ-open.dev.jsonl"))
  assert len(nq_test) == 3610 and nq_test <= nq_dev
  wq_dpr = read_questions(shared_data / "webquestions/topics.dpr.wq.test.txt")
  wq = read_questions(shared_data / "webquestions/brmson_main_test.json")
  same = sum((a.question, a.answers) == (b.question, b.answers) for a, b in zip(wq_dpr, wq))
  assert same == 2027
  cur_dpr = set(questions("curatedtrec/topics.dpr.curated.test.txt"))
  large = set(questions("curatedtrec/brmson_large2470-test.tsv"))
  assert len(cur_dpr) == 693 and cur_dpr <= large


def test_curated_tsv_is_not_csv_quoted(shared_data):
  """brmson TSV keeps literal quotes: csv quoting would turn '"The Muppets" was ...' into junk."""
  qs = read_questions(shared_data / "curatedtrec/brmson_large2470-train.tsv")
  q = next(q for q in qs if q.id == "825")
  assert q.question == '"The Muppets" was created by whom?' and q.answers == ("Henson",)


# ---------------------------------------------------------------------------------------------
# Formats on small files

@pytest.mark.parametrize("gz", [False, True])
def test_questions_jsonl(tmp_path, gz):
  path = _write(tmp_path / ("q.jsonl.gz" if gz else "q.jsonl"),
                '{"id": 1, "question": "q1?", "answers": ["a", "b"], '
                '"gold_passage_ids": [3, "p"]}\n'
                '{"id": "x", "question": "q2?", "answers": ["c.t"], "answers_are_regex": true}\n',
                gz=gz)
  assert qa.detect_question_format(path) == "questions_jsonl"
  assert read_questions(path) == [Question("1", "q1?", ("a", "b"), ("3", "p")),
                                  Question("x", "q2?", ("c.t",), (), True)]


def test_dpr_qa_csv_ids_and_quoting(tmp_path):
  path = _write(tmp_path / "my.qa.csv",
                "first q\t['a', \"b's\"]\n"
                '"a ""quoted"" q"\t"[\'x\', ""y""]"\n')
  assert qa.detect_question_format(path) == "dpr_qa_csv"
  assert read_questions(path) == [Question("my.qa-0", "first q", ("a", "b's")),
                                  Question("my.qa-1", 'a "quoted" q', ("x", "y"))]


def test_nq_open_vs_dpr_jsonl_and_curated_regex_by_name(tmp_path):
  line = '{"question": "q?", "answer": ["a(b)?"]}\n'
  assert qa.detect_question_format(_write(tmp_path / "NQ.dev.jsonl", line)) == "nq_open"
  dpr = _write(tmp_path / "topics.dpr.x.test.txt", line)
  assert qa.detect_question_format(dpr) == "dpr_jsonl"
  assert read_questions(dpr) == [Question("topics.dpr.x.test-0", "q?", ("a(b)?",))]
  cur = _write(tmp_path / "topics.dpr.curated.test.txt", line)
  assert read_questions(cur)[0].answers_are_regex
  assert not read_questions(cur, answers_are_regex=False)[0].answers_are_regex


def test_webquestions_and_squad_small(tmp_path):
  wq = _write(tmp_path / "wq.json", '[\n {"qId": "w0", "answers": ["A"], "qText": "q0?"},\n'
                                    ' {"qId": "w1", "answers": ["B", "C"], "qText": "q1?"}\n]\n')
  assert read_questions(wq) == [Question("w0", "q0?", ("A",)), Question("w1", "q1?", ("B", "C"))]
  with pytest.raises(DataError, match="no questions"):
    read_questions(_write(tmp_path / "e.json", " [ ]\n"))
  doc = {"data": [{"title": "T", "paragraphs": [
      {"context": "c", "qas": []},
      {"context": "c2", "qas": [{"id": "s1", "question": "q?", "answers": [
          {"text": "x", "answer_start": 0}, {"text": "y", "answer_start": 1},
          {"text": "x", "answer_start": 0}]}]}]}]}
  sq = _write(tmp_path / "sq.json", json.dumps(doc))
  assert read_questions(sq, squad_prefix="p") == [Question("s1", "q?", ("x", "y"), ("p-000-001",))]


def test_fmt_override_and_unknown(tmp_path):
  path = _write(tmp_path / "q.txt", "what?\t['x']\n")
  assert read_questions(path, fmt="dpr_qa_csv")[0].answers == ("x",)
  with pytest.raises(ValueError, match="unknown question format"):
    read_questions(path, fmt="trec")
  with pytest.raises(ValueError, match="unknown question format"):
    iter_questions(path, fmt="trec")  # raised at the call, before iteration


# ---------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("name, text, line, field, words", [
    ("q.jsonl", '{"id": "a", "question": "q", "answers": ["x"]}\n{"id": "b", "question": ', 2,
     None, ["malformed JSON"]),
    ("q.jsonl", '{"id": "a", "question": "q", "answers": []}\n', 1, "answers",
     ["question with no answers"]),
    ("q.jsonl", '{"id": "a", "question": "q"}\n', 1, "answers", ["missing"]),
    ("q.jsonl", '{"id": "a", "question": "q", "answers": "x"}\n', 1, "answers",
     ["expected a list of strings, got string"]),
    ("q.jsonl", '{"id": "a", "question": "q", "answers": ["x", 3]}\n', 1, "answers",
     ["answer 1: expected a string, got int"]),
    ("q.jsonl", '{"id": "a", "question": "q", "answers": [" "]}\n', 1, "answers",
     ["non-empty string"]),
    ("q.jsonl", '{"id": "a", "question": 5, "answers": ["x"]}\n', 1, "question",
     ["expected a non-empty string, got int"]),
    ("q.jsonl", '{"question": "q", "answers": ["x"]}\n', 1, "id", ["missing"]),
    ("q.jsonl", '{"id": "a", "question": "q", "answers": ["x"], "gold_passage_ids": "p"}\n', 1,
     "gold_passage_ids", ["expected a list of passage ids"]),
    ("q.jsonl", '{"id": "a", "question": "q", "answers": ["x"]}\n'
                '{"id": "a", "question": "q2", "answers": ["y"]}\n', 2, "id",
     ["duplicate question id 'a'", "first at line 1"]),
    ("topics.dpr.curated.test.txt", '{"question": "q", "answer": ["ok"]}\n'
                                    '{"question": "q", "answer": ["(unclosed"]}\n', 2, "answer",
     ["does not compile", "(unclosed"]),
    ("qa.csv", "q1\t['a']\nq2\t['a'\n", 2, "answers", ["Python list literal"]),
    ("qa.csv", "q1\t['a']\nq2\t['a']\textra\n", 2, None,
     ["expected 2 tab-separated columns", "got 3"]),
    ("qa.csv", "q1\t[1, 2]\n", 1, "answers", ["answer 0: expected a string, got int"]),
    ("c.tsv", "1\tfactoid\tq\tok\n2\tfactoid\tq\t[bad\n", 2, "answer", ["does not compile"]),
    ("c.tsv", "1\tfactoid\tq\tok\n2\tfactoid\tq\n", 2, None, ["expected 4 tab-separated columns"]),
    ("wq.json", '[\n {"qId": "w0", "answers": ["A"], "qText": "q"},\n'
                ' {"qId": "w1", "answers": "B", "qText": "q"}\n]\n', 3, "answers",
     ["expected a list of strings"]),
    ("wq.json", '[\n {"qId": "w0", "answers": ["A"], "qText": "q"}\n {"qId": "w1"}]\n', 3, None,
     ["expected ',' or ']'"]),
])
def test_record_errors(tmp_path, name, text, line, field, words):
  path = _write(tmp_path / name, text)
  if name == "c.tsv":
    fmt = "curatedtrec_tsv"
  elif name == "qa.csv":
    fmt = "dpr_qa_csv"
  else:
    fmt = None
  with pytest.raises(DataError) as e:
    read_questions(path, fmt=fmt)
  _check_error(e.value, path, line, field, *words)


def test_squad_errors_name_field_path(tmp_path):
  doc = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
      {"id": "s1", "question": "q?", "answers": []}]}]}]}
  path = _write(tmp_path / "sq.json", json.dumps(doc))
  with pytest.raises(DataError) as e:
    read_questions(path)
  _check_error(e.value, path, None, "data[0].paragraphs[0].qas[0].answers", "no answers")
  assert read_questions(path, require_answers=False)[0].answers == ()


def test_bad_utf8_names_line(tmp_path):
  path = _write(tmp_path / "qa.csv", b"q1\t['a']\nq\xe9\t['b']\n")
  with pytest.raises(DataError) as e:
    read_questions(path)
  _check_error(e.value, path, 2, None, "invalid UTF-8")
  wq = _write(tmp_path / "wq.json", b'[\n {"qId": "w0", "answers": ["\xff"], "qText": "q"}\n]')
  with pytest.raises(DataError) as e:
    read_questions(wq)
  _check_error(e.value, wq, 2, None, "invalid UTF-8")


def test_empty_file(tmp_path):
  path = _write(tmp_path / "q.jsonl", "\n")
  with pytest.raises(DataError, match="no questions") as e:
    read_questions(path)
  assert str(e.value).startswith(f"{path}:")


def test_skip_invalid_counts(tmp_path):
  path = _write(tmp_path / "qa.csv", b"ok1\t['a']\nbad\t['a'\nno answers\t[]\nq\xff\t['b']\n"
                                     b"x\ty\tz\nok2\t['b']\n")
  stats = {}
  qs = read_questions(path, skip_invalid=True, stats=stats)
  assert [q.id for q in qs] == ["qa-0", "qa-5"]
  assert stats["records"] == 2 and stats["skipped"] == 4
  assert [m.split(": ")[0] for m in stats["errors"]] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
  stats = {}
  assert len(list(iter_questions(path, skip_invalid=True, stats=stats,
                                 require_answers=False))) == 3
  assert stats["skipped"] == 3
