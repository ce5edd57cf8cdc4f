"""Question sets: NQ-open, DPR qa.csv / JSONL, SQuAD, CuratedTREC, WebQuestions, HotpotQA; plain
or gzip.

Each format becomes a stream of `Question`s; a bad record raises `DataError` naming file, line and
field, or, with `skip_invalid=True`, is skipped and counted into `stats`.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import pathlib
import re
from typing import Iterator

from ragjax.data.answers import compile_answer_regex
from ragjax.data import corpus
from ragjax.data.corpus import ErrorPolicy, type_name
from ragjax.errors import DataError

QUESTION_FORMATS = ("questions_jsonl", "nq_open", "dpr_qa_csv", "squad", "curatedtrec_tsv",
                    "dpr_jsonl", "webquestions", "hotpotqa")
_HOTPOT_KEY = re.compile(r'\A\s*\[\s*\{[^{}]*"(_id|supporting_facts)"')
_WS = re.compile(r"\s*")


@dataclasses.dataclass(frozen=True)
class Question:
  """A question with its reference answers (strings, or regexes when `answers_are_regex`).
  `exclude_passage_ids`: corpus ids its retrieval must never return (a pretraining example's own
  passage or document, `ragjax.data.pretraining`)."""
  id: str
  question: str
  answers: tuple[str, ...]
  gold_passage_ids: tuple[str, ...] = ()
  answers_are_regex: bool = False
  exclude_passage_ids: tuple[str, ...] = ()


def _stem(path) -> str:
  """File name without .gz and one more suffix: topics.dpr.nq.dev.txt.gz -> topics.dpr.nq.dev."""
  name = pathlib.Path(path).name.removesuffix(".gz")
  return name.rsplit(".", 1)[0] if "." in name else name


def _regex_by_name(path) -> bool:
  return "curated" in pathlib.Path(path).name.lower()


def detect_question_format(path) -> str:
  """The question format of `path`, from its first bytes (and, for two cases, its name).

  Rules, on the first non-blank character of the (decompressed) file:
    `[` -> 'hotpotqa' when the first object has an "_id" or "supporting_facts" key before any
      nested object, else 'webquestions' (brmson JSON list).
    `{` -> 'squad' when the first key is "data" or "version"; otherwise JSON Lines, decided by
      the keys of the first parseable line: "answer" (singular), or only "question" ->
      'dpr_jsonl' when the file name contains "dpr", else 'nq_open'; "id" or "answers" ->
      'questions_jsonl'.
    anything else -> tab-separated: 4 columns on the first line -> 'curatedtrec_tsv', otherwise
      'dpr_qa_csv'.
  An empty file -> 'questions_jsonl' (the reader then reports it empty).
  """
  head = corpus.head_text(path).lstrip()
  dpr_or_nq = "dpr_jsonl" if "dpr" in pathlib.Path(path).name.lower() else "nq_open"
  if head.startswith("["):
    return "hotpotqa" if _HOTPOT_KEY.match(head) else "webquestions"
  if head.startswith("{"):
    if corpus.first_json_key(head) in ("data", "version"):
      return "squad"
    for line in head.splitlines()[:10]:
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(obj, dict):
        if "answer" in obj:
          return dpr_or_nq
        if "id" in obj or "answers" in obj:
          return "questions_jsonl"
        return dpr_or_nq
    return "questions_jsonl"
  if head:
    return "curatedtrec_tsv" if len(head.split("\n", 1)[0].split("\t")) == 4 else "dpr_qa_csv"
  return "questions_jsonl"


# ----------------------------------------------------------------------------------------------
# Field checks.

MISSING = object()  # `obj.get(key, MISSING)`: the field is absent (not null)


def _question_text(v, *, path, line, field="question") -> str:
  if v is MISSING:
    raise DataError("missing; expected a non-empty string", path=path, line=line, field=field)
  if not isinstance(v, str) or not v.strip():
    got = f"{type_name(v)} {v!r}" if isinstance(v, str) else type_name(v)
    raise DataError(f"expected a non-empty string, got {got}", path=path, line=line, field=field)
  return v


def _answer_list(v, *, path, line, field, regex: bool, require: bool) -> tuple[str, ...]:
  """A list of non-empty answer strings (compiled when `regex`); DataError otherwise."""
  if not isinstance(v, (list, tuple)):
    raise DataError(f"expected a list of strings, got {type_name(v)}", path=path, line=line,
                    field=field)
  for i, a in enumerate(v):
    if not isinstance(a, str):
      raise DataError(f"answer {i}: expected a string, got {type_name(a)}", path=path, line=line,
                      field=field)
    if not a.strip():
      raise DataError(f"answer {i}: expected a non-empty string, got {a!r}", path=path, line=line,
                      field=field)
    if regex:
      try:
        compile_answer_regex(a)
      except ValueError as e:
        raise DataError(f"answer {i}: {e}", path=path, line=line, field=field) from None
  if require and not v:
    raise DataError("question with no answers; expected at least one answer string, e.g. "
                    '["Paris"]', path=path, line=line, field=field)
  return tuple(v)


def _optional_answers(obj: dict, key: str, *, path, line, regex, require) -> tuple[str, ...]:
  if key not in obj:
    if require:
      raise DataError('missing; expected a list of answer strings, e.g. ["Paris"]', path=path,
                      line=line, field=key)
    return ()
  return _answer_list(obj[key], path=path, line=line, field=key, regex=regex, require=require)


def _id_list(v, *, path, line, field) -> tuple[str, ...]:
  if not isinstance(v, list):
    raise DataError(f"expected a list of passage ids, got {type_name(v)}", path=path, line=line,
                    field=field)
  out = []
  for i, x in enumerate(v):
    if isinstance(x, bool) or not isinstance(x, (str, int)) or x == "":
      raise DataError(f"id {i}: expected a non-empty string or int, got {type_name(x)} {x!r}",
                      path=path, line=line, field=field)
    out.append(str(x))
  return tuple(out)


# ----------------------------------------------------------------------------------------------
# One reader per format: each yields (line | None, Question) and sends bad records to `policy`.

def _questions_jsonl(path, policy, *, regex, require):
  for line, obj in corpus.iter_json_lines(path, policy):
    try:
      rx = obj.get("answers_are_regex", regex)
      if not isinstance(rx, bool):
        raise DataError(f"expected a bool, got {type_name(rx)}", path=path, line=line,
                        field="answers_are_regex")
      q = Question(
          id=corpus.get_id(obj, "id", path=path, line=line),
          question=_question_text(obj.get("question", MISSING), path=path, line=line),
          answers=_optional_answers(obj, "answers", path=path, line=line, regex=rx,
                                    require=require),
          gold_passage_ids=_id_list(obj.get("gold_passage_ids", []), path=path, line=line,
                                    field="gold_passage_ids"),
          answers_are_regex=rx)
    except DataError as e:
      policy.bad(e)
      continue
    yield line, q


def _answer_jsonl(path, policy, *, regex, require):
  """nq_open / dpr_jsonl: `{"question": str, "answer": [str, ...]}` per line."""
  stem = _stem(path)
  for line, obj in corpus.iter_json_lines(path, policy):
    try:
      q = Question(id=f"{stem}-{line - 1}",
                   question=_question_text(obj.get("question", MISSING), path=path, line=line),
                   answers=_optional_answers(obj, "answer", path=path, line=line, regex=regex,
                                             require=require),
                   answers_are_regex=regex)
    except DataError as e:
      policy.bad(e)
      continue
    yield line, q


def _dpr_qa_csv(path, policy, *, regex, require):
  """DPR qa.csv: question<TAB>python list literal, CSV quoting (csv.reader, then literal_eval)."""
  stem = _stem(path)
  for line, row in corpus.iter_tsv_rows(path, policy):
    try:
      if len(row) != 2:
        raise DataError(f"expected 2 tab-separated columns (question, answers), got {len(row)}",
                        path=path, line=line)
      question = _question_text(row[0], path=path, line=line)
      try:
        answers = ast.literal_eval(row[1])
      except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise DataError(f"expected a Python list literal of strings, got {row[1][:80]!r} ({e})",
                        path=path, line=line, field="answers") from None
      q = Question(id=f"{stem}-{line - 1}", question=question,
                   answers=_answer_list(answers, path=path, line=line, field="answers",
                                        regex=regex, require=require),
                   answers_are_regex=regex)
    except DataError as e:
      policy.bad(e)
      continue
    yield line, q


def _curatedtrec_tsv(path, policy, *, regex, require):
  """brmson CuratedTREC: id<TAB>type<TAB>question<TAB>answer regex; no header, no CSV quoting."""
  for line, row in corpus.iter_tsv_rows(path, policy, quoting=csv.QUOTE_NONE):
    try:
      if len(row) != 4:
        raise DataError(f"expected 4 tab-separated columns (id, type, question, answer regex), "
                        f"got {len(row)}", path=path, line=line)
      if not row[0]:
        raise DataError("expected a non-empty id", path=path, line=line, field="id")
      q = Question(id=row[0], question=_question_text(row[2], path=path, line=line),
                   answers=_answer_list([row[3]] if row[3] else [], path=path, line=line,
                                        field="answer", regex=regex, require=require),
                   answers_are_regex=regex)
    except DataError as e:
      policy.bad(e)
      continue
    yield line, q


def _squad(path, policy, *, regex, require, squad_prefix):
  """SQuAD JSON: one question per qa; answers = unique texts in first-appearance order."""
  for a, article in enumerate(corpus.squad_articles(path)):
    paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
    if not isinstance(paragraphs, list):
      policy.bad(DataError("expected an object with a 'paragraphs' list", path=path,
                           field=f"data[{a}].paragraphs"))
      continue
    for p, para in enumerate(paragraphs):
      qas = para.get("qas") if isinstance(para, dict) else None
      if not isinstance(qas, list):
        policy.bad(DataError(f"expected a list, got {type_name(qas)}", path=path,
                             field=f"data[{a}].paragraphs[{p}].qas"))
        continue
      for k, qa in enumerate(qas):
        where = f"data[{a}].paragraphs[{p}].qas[{k}]"
        try:
          if not isinstance(qa, dict):
            raise DataError(f"expected an object, got {type_name(qa)}", path=path, field=where)
          raw = qa.get("answers", [])
          if not isinstance(raw, list) or not all(
              isinstance(x, dict) and isinstance(x.get("text"), str) for x in raw):
            raise DataError("expected a list of {'text': str, ...} objects", path=path,
                            field=f"{where}.answers")
          texts = list(dict.fromkeys(x["text"] for x in raw))
          q = Question(
              id=corpus.get_id(qa, "id", path=path, line=None, field=f"{where}.id"),
              question=_question_text(qa.get("question", MISSING), path=path, line=None,
                                      field=f"{where}.question"),
              answers=_answer_list(texts, path=path, line=None, field=f"{where}.answers",
                                   regex=regex, require=require),
              gold_passage_ids=(corpus.squad_paragraph_id(squad_prefix, a, p),),
              answers_are_regex=regex)
        except DataError as e:
          policy.bad(e)
          continue
        yield None, q


def iter_json_array(path, expected: str = "objects") -> Iterator[tuple[int, object]]:
  """(line where the element starts, element) for each element of a top-level JSON list.
  Raises: DataError naming file and line (not a list: "expected a JSON list of `expected`")."""
  text = corpus.read_document(path)
  dec = json.JSONDecoder()
  i = _WS.match(text).end()
  if text[i:i + 1] != "[":
    raise DataError(f"expected a JSON list of {expected}", path=path,
                    line=text.count("\n", 0, i) + 1)
  i = _WS.match(text, i + 1).end()
  line, last = 1, 0
  if text[i:i + 1] == "]":
    return
  while True:
    line += text.count("\n", last, i)
    last = i
    try:
      obj, end = dec.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=path,
                      line=e.lineno) from None
    yield line, obj
    i = _WS.match(text, end).end()
    sep = text[i:i + 1]
    if sep == ",":
      i = _WS.match(text, i + 1).end()
    elif sep == "]" and not text[i + 1:].strip():
      return
    else:
      raise DataError(f"malformed JSON: expected ',' or ']' after a list element, got {sep!r}",
                      path=path, line=text.count("\n", 0, i) + 1)


def _webquestions(path, policy, *, regex, require):
  """brmson WebQuestions: a JSON list of `{"qId": str, "answers": [str], "qText": str}`."""
  for line, obj in iter_json_array(path, "{qId, answers, qText} objects"):
    try:
      if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type_name(obj)}", path=path, line=line)
      q = Question(id=corpus.get_id(obj, "qId", path=path, line=line),
                   question=_question_text(obj.get("qText", MISSING), path=path, line=line, field="qText"),
                   answers=_optional_answers(obj, "answers", path=path, line=line, regex=regex,
                                             require=require),
                   answers_are_regex=regex)
    except DataError as e:
      policy.bad(e)
      continue
    yield line, q


def _hotpotqa(path, policy, *, regex, require):
  """HotpotQA (Yang et al. 2018) `hotpot_dev_*_v1.json`: a JSON list of `{"_id", "question",
  "answer": str, "supporting_facts": [[title, sentence index]], "context", "type", "level"}`;
  gold_passage_ids are the supporting facts' titles."""
  for line, obj in iter_json_array(path, "{_id, question, answer} objects"):
    try:
      if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type_name(obj)}", path=path, line=line)
      answer = obj.get("answer", MISSING)
      if answer is MISSING and require:
        raise DataError("missing; expected the answer string", path=path, line=line,
                        field="answer")
      if answer is not MISSING and not isinstance(answer, str):
        raise DataError(f"expected a string, got {type_name(answer)}", path=path, line=line,
                        field="answer")
      answers = () if answer is MISSING else _answer_list(
          [answer], path=path, line=line, field="answer", regex=regex, require=require)
      facts = obj.get("supporting_facts") or []
      titles = tuple(dict.fromkeys(f[0] for f in facts if isinstance(f, list) and f
                                   and isinstance(f[0], str)))
      q = Question(id=corpus.get_id(obj, "_id", path=path, line=line),
                   question=_question_text(obj.get("question", MISSING), path=path, line=line),
                   answers=answers, gold_passage_ids=titles, answers_are_regex=regex)
    except DataError as e:
      policy.bad(e)
      continue
    yield line, q


_READERS = {"questions_jsonl": _questions_jsonl, "nq_open": _answer_jsonl,
            "dpr_jsonl": _answer_jsonl, "dpr_qa_csv": _dpr_qa_csv,
            "curatedtrec_tsv": _curatedtrec_tsv, "squad": _squad, "webquestions": _webquestions,
            "hotpotqa": _hotpotqa}


def _iter_questions(path, fmt, policy, *, require_answers, answers_are_regex, squad_prefix,
                    unique) -> Iterator[Question]:
  fmt = fmt or detect_question_format(path)
  regex = answers_are_regex
  if regex is None:
    regex = (fmt == "curatedtrec_tsv"
             or (fmt in ("dpr_jsonl", "nq_open", "dpr_qa_csv", "questions_jsonl")
                 and _regex_by_name(path)))
  kw = dict(regex=regex, require=require_answers)
  if fmt == "squad":
    kw["squad_prefix"] = squad_prefix
  yield from corpus.checked_records(_READERS[fmt](path, policy, **kw), path, policy,
                                   kind="question", unique=unique)


def iter_questions(path, fmt: str | None = None, *, require_answers: bool = True,
                   skip_invalid: bool = False, stats: dict | None = None,
                   answers_are_regex: bool | None = None,
                   squad_prefix: str = corpus.DEFAULT_SQUAD_PREFIX) -> Iterator[Question]:
  """Stream the questions of a question file (plain or gzip, detected by its magic bytes).

  Args:
    path: the question file.
    fmt: one of QUESTION_FORMATS; None: `detect_question_format`.
      'questions_jsonl': `{"id", "question", "answers", "gold_passage_ids"?, "answers_are_regex"?}`.
      'nq_open', 'dpr_jsonl': JSON Lines `{"question", "answer": [...]}`; id
        `f"{stem}-{line - 1}"` (stem: file name without .gz and its last suffix).
      'dpr_qa_csv': DPR qa.csv, question<TAB>Python list literal, CSV quoting; id as above.
      'squad': SQuAD v1.1 JSON; id = qa id; answers = unique texts, first-appearance order;
        gold_passage_ids = (`corpus.squad_paragraph_id(squad_prefix, article, paragraph)`,).
      'curatedtrec_tsv': brmson id<TAB>type<TAB>question<TAB>regex, no quoting; regex answers.
      'webquestions': brmson JSON list `{"qId", "answers", "qText"}`.
      'hotpotqa': HotpotQA JSON list `{"_id", "question", "answer"}`; gold_passage_ids = the
        supporting facts' titles (HotpotQA's passages are titled paragraphs).
    require_answers: a question with no answers (or no answer field) is an error.
    skip_invalid: skip bad records (counted into `stats`) instead of raising.
    stats: optional dict filled in place with "records", "skipped", "errors".
    answers_are_regex: None: True for 'curatedtrec_tsv' and for line formats whose file name
      contains "curated" (DPR's CuratedTREC files), else False.
    squad_prefix: passage id prefix for 'squad' gold ids.
  Returns:
    A lazy iterator over Question, in file order (file errors surface while iterating).
  Raises:
    DataError naming file, line (a field path for SQuAD) and field: malformed JSON, a missing or
      wrongly-typed field, undecodable UTF-8, a wrong column count, an unparseable answer list, an
      empty answer string, a question with no answers (`require_answers`), a regex that does
      not compile.
    ValueError: unknown `fmt`.
  """
  corpus.check_format(fmt, QUESTION_FORMATS, "question")
  return _iter_questions(path, fmt, ErrorPolicy(skip_invalid, stats),
                         require_answers=require_answers, answers_are_regex=answers_are_regex,
                         squad_prefix=squad_prefix, unique=False)


def read_questions(path, fmt: str | None = None, *, require_answers: bool = True,
                   skip_invalid: bool = False, stats: dict | None = None,
                   answers_are_regex: bool | None = None,
                   squad_prefix: str = corpus.DEFAULT_SQUAD_PREFIX) -> list[Question]:
  """All questions of a file, as `iter_questions`, also rejecting duplicate ids and no questions.

  Returns:
    list[Question], in file order.
  Raises:
    DataError: everything `iter_questions` raises; a duplicate id (naming both lines; skipped
      and counted with `skip_invalid`); a file with no questions (always).
  """
  corpus.check_format(fmt, QUESTION_FORMATS, "question")
  policy = ErrorPolicy(skip_invalid, stats)
  out = list(_iter_questions(path, fmt, policy, require_answers=require_answers,
                             answers_are_regex=answers_are_regex, squad_prefix=squad_prefix,
                             unique=True))
  if not out:
    raise DataError(f"no questions ({policy.stats['skipped']} invalid records skipped); expected "
                    "at least one", path=path)
  return out
