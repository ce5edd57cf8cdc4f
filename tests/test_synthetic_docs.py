"""Multi-passage synthetic biographies: answerable from one passage, namesakes told apart, split
by person, readable by the corpus and question loaders.

Checks read the generated data only (titles, texts, answers) and facts known independently (the
synthetic people's pools and person 0 of seed 0, pinned by tests/test_synthetic.py).
"""
import collections
import re

import numpy as np
import pytest

from ragjax.data import synthetic, synthetic_docs
from ragjax.data.answers import has_answer
from ragjax.data.corpus import Passage, read_passages
from ragjax.data.qa import Question, read_questions

N = 1000
_TITLE = re.compile(r"^(?P<name>.+?)(?: \(born (?P<year>\d{4})\))?(?: - profile|: news)$")
_PID = re.compile(r"^bio-(\d{7})-(profile|news)-(\d+)$")


@pytest.fixture(scope="module")
def bios():
  return synthetic_docs.make_bio_documents(N, seed=0)


def _person(passage_or_question_id: str) -> int:
  return int(passage_or_question_id.split("-")[1])


def _by_person(bios):
  out = collections.defaultdict(list)
  for p in bios.passages:
    out[_person(p.id)].append(p)
  return out


def _answers_by_person(bios):
  """{person: {attribute: answer}}, read from the questions."""
  out = collections.defaultdict(dict)
  for q in bios.train_questions + bios.eval_questions:
    out[_person(q.id)][q.id.rsplit("-", 1)[1]] = q.answers[0]
  return out


def test_same_args_same_output(bios):
  again = synthetic_docs.make_bio_documents(N, seed=0)
  assert again.passages == bios.passages
  assert again.train_questions == bios.train_questions
  assert again.eval_questions == bios.eval_questions
  np.testing.assert_array_equal(again.eval_person_mask, bios.eval_person_mask)
  other = synthetic_docs.make_bio_documents(N, seed=1)
  assert sum(a.text == b.text for a, b in zip(other.passages, bios.passages)) < 10


def test_first_people_of_a_larger_corpus_are_those_of_a_smaller_one(bios):
  small = synthetic_docs.make_bio_documents(150, seed=0)
  assert small.passages == [p for p in bios.passages if _person(p.id) < 150]
  small_q = {q.id: q for q in small.train_questions + small.eval_questions}
  big_q = {q.id: q for q in bios.train_questions + bios.eval_questions if _person(q.id) < 150}
  assert small_q == big_q


def test_person_zero_is_synthetic_person_zero():
  # tests/test_synthetic.py pins person 0 of seed 0: Orlando Valdivia, Glasgow, 18 June 1974.
  b = synthetic_docs.make_bio_documents(3, seed=0)
  first = [p for p in b.passages if _person(p.id) == 0]
  assert first[0].id == "bio-0000000-profile-0"
  assert {p.title for p in first} == {"Orlando Valdivia - profile", "Orlando Valdivia: news"}
  assert "18 June 1974" in first[0].text and "Glasgow" in first[0].text


def test_counts_ids_and_documents(bios):
  n_eval = int(bios.eval_person_mask.sum())
  assert n_eval == 200
  assert len(bios.eval_questions) == 5 * n_eval and len(bios.train_questions) == 5 * (N - n_eval)
  assert all(isinstance(p, Passage) for p in bios.passages)
  assert all(isinstance(q, Question) for q in bios.train_questions + bios.eval_questions)
  assert len({p.id for p in bios.passages}) == len(bios.passages)
  people = _by_person(bios)
  assert sorted(people) == list(range(N))
  for i, passages in people.items():
    assert all(_PID.match(p.id) for p in passages)
    kinds = collections.Counter(_PID.match(p.id).group(2) for p in passages)
    assert kinds["profile"] >= 2 and kinds["news"] >= 1, (i, kinds)  # two multi-passage docs
    assert len({_TITLE.match(p.title).group("name") for p in passages}) == 1
  assert 3 * N < len(bios.passages) < 7 * N


def test_every_answer_is_in_its_gold_passage_and_in_no_other_of_the_person(bios):
  by_id = {p.id: p for p in bios.passages}
  people = _by_person(bios)
  gold_kinds = collections.defaultdict(collections.Counter)
  for q in bios.train_questions + bios.eval_questions:
    assert len(q.answers) == 1 and len(q.gold_passage_ids) == 1 and not q.answers_are_regex
    (pid,) = q.gold_passage_ids
    assert pid in by_id, q
    assert _person(pid) == _person(q.id)
    gold, answer = by_id[pid], q.answers[0]
    assert gold.text.count(answer) == 1, (q, gold)
    assert has_answer(gold.text, [answer])  # what answer recall@k tests
    others = [p for p in people[_person(pid)] if p.id != pid]
    assert not any(answer in p.text for p in others), (q, others)
    name = _TITLE.match(gold.title).group("name")
    assert name in q.question
    gold_kinds[q.id.rsplit("-", 1)[1]][_PID.match(pid).group(2)] += 1
  # Where a fact is told varies: education and employer sit in the profile or in the news.
  for attr in ("university", "major", "employer"):
    assert min(gold_kinds[attr]["profile"], gold_kinds[attr]["news"]) > 0.2 * N, gold_kinds
  assert set(gold_kinds["birth_date"]) == {"profile"}


def test_shared_names_occur_and_the_question_names_exactly_one(bios):
  people_by_name = collections.defaultdict(set)
  titles_by_person = collections.defaultdict(set)
  for p in bios.passages:
    people_by_name[_TITLE.match(p.title).group("name")].add(_person(p.id))
    titles_by_person[_person(p.id)].add(p.title)
  answers = _answers_by_person(bios)
  shared = {n: ps for n, ps in people_by_name.items() if len(ps) > 1}
  n_shared_people = sum(len(ps) for ps in shared.values())
  assert 0.15 * N < n_shared_people < 0.6 * N, n_shared_people
  assert max(len(ps) for ps in shared.values()) >= 3
  for name, ps in shared.items():  # namesakes' titles differ (by birth year)
    titles = [titles_by_person[i] for i in ps]
    assert all(not (a & b) for k, a in enumerate(titles) for b in titles[k + 1:]), name
  n_disambiguated = 0
  for q in bios.train_questions + bios.eval_questions:
    me, attr = _person(q.id), q.id.rsplit("-", 1)[1]
    name = next(n for n in people_by_name if me in people_by_name[n])
    candidates = people_by_name[name]
    year = re.search(r"\(born (\d{4})\)|born in (\d{4})", q.question)
    city = re.search(r"\bthe " + re.escape(name) + r" from (\w+)\b", q.question)
    if not year and not city:
      assert len(candidates) == 1, q  # a bare name names one person
      continue
    # A root whose namesakes lie past N keeps its disambiguated questions (prefix property).
    n_disambiguated += 1
    assert bool(year) != bool(city), q
    if year:
      assert attr != "birth_date", q  # the year would give the answer away
      y = year.group(1) or year.group(2)
      match = [i for i in candidates if answers[i]["birth_date"].endswith(" " + y)]
    else:
      match = [i for i in candidates if answers[i]["birth_city"] == city.group(1)]
      gold = next(p for p in bios.passages if p.id == q.gold_passage_ids[0])
      assert city.group(1) in gold.text  # the gold passage says which namesake it is
    assert match == [me], (q, match)
  assert 5 * n_shared_people <= n_disambiguated <= 5 * n_shared_people + 5 * 30


def test_passages_mostly_do_not_name_their_person(bios):
  named = 0
  for i, passages in _by_person(bios).items():
    name = _TITLE.match(passages[0].title).group("name")
    in_text = [name in p.text for p in passages]
    assert not all(in_text), (i, passages)
    named += sum(in_text)
  assert named < 0.25 * len(bios.passages)


def test_eval_people_never_in_train_questions(bios):
  train_people = {_person(q.gold_passage_ids[0]) for q in bios.train_questions}
  eval_people = {_person(q.gold_passage_ids[0]) for q in bios.eval_questions}
  assert not train_people & eval_people
  assert train_people | eval_people == set(range(N))
  assert eval_people == set(np.flatnonzero(bios.eval_person_mask).tolist())
  assert {_person(q.id) for q in bios.train_questions} == train_people
  # The same held-out people as the one-passage layout.
  np.testing.assert_array_equal(bios.eval_person_mask, synthetic.eval_person_mask(N, 0, 0.2))


def test_attribute_values_come_from_the_pools(bios):
  pools = {"birth_city": synthetic.CITIES, "university": synthetic.UNIVERSITIES,
           "major": synthetic.MAJORS, "employer": synthetic.EMPLOYERS}
  for person, attrs in _answers_by_person(bios).items():
    for attr, pool in pools.items():
      assert attrs[attr] in pool
    day, month, year = attrs["birth_date"].split()
    assert 1 <= int(day) <= 31 and month in synthetic.MONTHS and 1940 <= int(year) <= 2005


def test_make_bios_layout_documents_writes_loadable_files(tmp_path):
  from ragjax.cli import main
  out = tmp_path / "docs"
  assert main(["make-bios", "--layout", "documents", "--num-people", "40", "--seed", "3",
               "--eval-fraction", "0.25", "--out", str(out)]) == 0
  assert sorted(p.name for p in out.iterdir()) == [
      "corpus.jsonl", "eval_questions.jsonl", "train_questions.jsonl"]  # no temp files left
  want = synthetic_docs.make_bio_documents(40, seed=3, eval_fraction=0.25)
  assert list(read_passages(out / "corpus.jsonl")) == want.passages
  assert list(read_questions(out / "train_questions.jsonl")) == want.train_questions
  assert list(read_questions(out / "eval_questions.jsonl")) == want.eval_questions
  assert len(want.eval_questions) == 5 * 10
  single = tmp_path / "single"
  assert main(["make-bios", "--num-people", "40", "--out", str(single)]) == 0
  assert len(list(read_passages(single / "corpus.jsonl"))) == 40  # default layout unchanged


def test_make_bios_options_reach_the_generator_and_bad_ones_exit_2(tmp_path, capsys):
  from ragjax.cli import main
  out = tmp_path / "red"
  assert main(["make-bios", "--layout", "documents", "--num-people", "30", "--option",
               "restate_rate=1.0", "--option", "headings=true", "--out", str(out)]) == 0
  want = synthetic_docs.make_bio_documents(30, restate_rate=1.0, headings=True)
  assert list(read_passages(out / "corpus.jsonl")) == want.passages
  for bad, said in ((["--layout", "documents", "--option", "restate=1"], "restate_rate"),
                    (["--layout", "documents", "--option", "distractors=x"], "integer"),
                    (["--layout", "documents", "--option", "headings=flase"], "true or false"),
                    (["--layout", "documents", "--option", "distractors=9"], "distractors"),
                    (["--option", "distractors=1"], "documents layout")):
    assert main(["make-bios", "--num-people", "5", *bad, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err


def test_load_data_documents_layout():
  from ragjax import config as config_lib
  from ragjax.data.sources import load_data
  from ragjax.errors import DataError
  c = config_lib.base_config()
  assert c.data.bios_layout == "single"
  c.data.num_people = 30
  assert len(load_data(c)[0]) == 30
  c.data.bios_layout = "documents"
  passages, train, evals = load_data(c)
  assert passages == synthetic_docs.make_bio_documents(30).passages and len(passages) > 60
  assert len(train) + len(evals) == 150
  c.data.bios_layout = "pages"
  with pytest.raises(DataError, match="bios_layout"):
    load_data(c)


def test_options_change_the_data_and_bad_ones_are_named():
  few = synthetic_docs.make_bio_documents(200, distractors=0, shared_name_rate=0.0)
  many = synthetic_docs.make_bio_documents(200, distractors=4)
  words = lambda b: np.mean([len(p.text.split()) for p in b.passages])
  assert words(many) > words(few) + 15
  assert not any("(born" in p.title for p in few.passages)
  with pytest.raises(ValueError, match="distractor"):
    synthetic_docs.make_bio_documents(10, distractors=9)
  with pytest.raises(ValueError, match="shared_name_rate"):
    synthetic_docs.make_bio_documents(10, shared_name_rate=1.5)
  with pytest.raises(ValueError, match="nmae_in_text"):
    synthetic_docs.make_bio_documents(10, nmae_in_text=0.5)
  with pytest.raises(ValueError, match="num_people"):
    synthetic_docs.make_bio_documents(-1)
  with pytest.raises(ValueError, match="eval_fraction"):
    synthetic_docs.make_bio_documents(10, eval_fraction=1.0)
  empty = synthetic_docs.make_bio_documents(0)
  assert empty.passages == [] and empty.train_questions == [] and empty.eval_questions == []


def test_restate_rate_states_each_fact_again_in_the_other_document_and_changes_nothing_else(bios):
  """restate_rate=1: every attribute's answer is also in a passage of the person's other
  document (profile <-> news); each passage's text only gains sentences at its end; the
  questions (and their gold ids) are those of restate_rate=0, which is the default corpus."""
  n = 200
  base = synthetic_docs.make_bio_documents(n, seed=0)
  red = synthetic_docs.make_bio_documents(n, seed=0, restate_rate=1.0)
  again = synthetic_docs.make_bio_documents(n, seed=0, restate_rate=1.0)  # deterministic
  assert again.passages == red.passages and again.train_questions == red.train_questions
  fewer = synthetic_docs.make_bio_documents(150, seed=0, restate_rate=1.0)
  assert fewer.passages == red.passages[:len(fewer.passages)]  # per person, as the default
  assert red.train_questions == base.train_questions
  assert red.eval_questions == base.eval_questions
  assert [p.id for p in red.passages] == [p.id for p in base.passages]
  grew = 0
  for p, q in zip(base.passages, red.passages):
    assert q.title == p.title and q.text.startswith(p.text)
    grew += q.text != p.text
  assert grew >= n  # 5 facts a person restated, into 1-2 passages of the other document
  passages = {p.id: p for p in red.passages}
  for q in red.train_questions + red.eval_questions:
    gold_doc = "profile" if "-profile-" in q.gold_passage_ids[0] else "news"
    other = [p for p in red.passages if _person(p.id) == _person(q.id) and gold_doc not in p.id]
    assert any(has_answer(p.text, q.answers) for p in other), q.id
    assert has_answer(passages[q.gold_passage_ids[0]].text, q.answers)
  half = synthetic_docs.make_bio_documents(n, seed=0, restate_rate=0.5)
  changed = sum(a.text != b.text for a, b in zip(base.passages, half.passages))
  assert 0 < changed < grew
  with pytest.raises(ValueError, match="restate_rate"):
    synthetic_docs.make_bio_documents(10, restate_rate=2.0)


def test_load_data_passes_the_documents_options_and_names_a_bad_one():
  from ragjax import config as config_lib
  from ragjax.data.sources import load_data
  from ragjax.errors import DataError
  c = config_lib.base_config()
  c.data.num_people = 30
  c.data.bios_layout = "documents"
  c.data.bios_docs.distractors = 0
  assert load_data(c)[0] == synthetic_docs.make_bio_documents(30, distractors=0).passages
  c.data.bios_docs.distractors = 7
  with pytest.raises(DataError, match=r"data\.bios_docs.*distractors must be an int in \[0, 4\]"):
    load_data(c)
  c.data.bios_docs.distractors = 1
  c.data.bios_layout = "single"
  with pytest.raises(config_lib.ConfigError, match=r"data\.bios_docs \(distractors\): options of "
                                                   r"the documents layout.*'single'"):
    config_lib.validate(c, data=True)  # before any data is read
  # the config's defaults are the generator's (config may not import the data layer)
  import dataclasses
  assert config_lib.base_config().data.bios_docs.to_dict() == dataclasses.asdict(
      synthetic_docs.DocOptions())
