"""Synthetic biographies: deterministic, answerable from the gold passage, split by person."""
import collections
import json

import numpy as np
import pytest

from ragjax.data import synthetic
from ragjax.data.corpus import Passage
from ragjax.data.qa import Question


@pytest.fixture(scope="module")
def bios():
  return synthetic.make_bios(3000, seed=0)


def test_same_args_same_output(bios):
  again = synthetic.make_bios(3000, seed=0)
  assert again.passages == bios.passages
  assert again.train_questions == bios.train_questions
  assert again.eval_questions == bios.eval_questions
  np.testing.assert_array_equal(again.eval_person_mask, bios.eval_person_mask)


def test_fixed_output_on_every_machine():
  # A golden value: a change here changes every corpus built from a seed (and every result).
  p = synthetic.make_bios(3, seed=0).passages[0]
  assert p.id == "bio-0000000"
  assert p.title == "Orlando Valdivia"
  assert p.text.startswith("Orlando Valdivia's birthplace is Glasgow. He was born on 18 June 1974.")


def test_other_seed_other_output(bios):
  other = synthetic.make_bios(3000, seed=1)
  assert [p.id for p in other.passages] == [p.id for p in bios.passages]
  same_text = sum(a.text == b.text for a, b in zip(other.passages, bios.passages))
  assert same_text == 0
  assert not np.array_equal(other.eval_person_mask, bios.eval_person_mask)


def test_smaller_corpus_is_a_prefix(bios):
  small = synthetic.make_bios(100, seed=0)
  assert small.passages == bios.passages[:100]
  assert list(synthetic.iter_bio_passages(3000, seed=0)) == bios.passages


def test_types_and_counts(bios):
  assert len(bios.passages) == 3000
  assert all(isinstance(p, Passage) for p in bios.passages)
  assert all(isinstance(q, Question) for q in bios.train_questions + bios.eval_questions)
  n_eval = int(bios.eval_person_mask.sum())
  assert n_eval == 600
  assert len(bios.eval_questions) == 5 * n_eval
  assert len(bios.train_questions) == 5 * (3000 - n_eval)


def test_answer_in_gold_passage_exactly_once(bios):
  by_id = {p.id: p for p in bios.passages}
  for q in bios.train_questions + bios.eval_questions:
    assert len(q.answers) == 1 and len(q.gold_passage_ids) == 1 and not q.answers_are_regex
    (pid,) = q.gold_passage_ids
    passage = by_id[pid]
    assert q.id.startswith(pid + "-")
    assert passage.text.count(q.answers[0]) == 1, (q, passage)
    assert passage.title in q.question


def test_bio_shape(bios):
  for person, p in zip(synthetic.iter_people(3000, seed=0), bios.passages):
    assert p.id == person.passage_id and p.title == person.name
    assert person.name in p.text.split(". ")[0]  # first sentence names the person
    assert 5 <= p.text.replace(person.name, "X").count(". ") + 1 <= 6, p.text
    for attr in synthetic.ATTRIBUTES:
      assert p.text.count(person.attribute(attr)) == 1


def test_train_and_eval_people_disjoint(bios):
  train_people = {q.gold_passage_ids[0] for q in bios.train_questions}
  eval_people = {q.gold_passage_ids[0] for q in bios.eval_questions}
  assert not train_people & eval_people
  assert train_people | eval_people == {p.id for p in bios.passages}
  assert eval_people == {f"bio-{i:07d}" for i in np.flatnonzero(bios.eval_person_mask)}


def test_ids_unique(bios):
  qs = bios.train_questions + bios.eval_questions
  assert len({q.id for q in qs}) == len(qs)
  assert len({p.id for p in bios.passages}) == len(bios.passages)
  assert {q.id.rsplit("-", 1)[1] for q in qs} == set(synthetic.ATTRIBUTES)


def test_names_unique_at_scale():
  names = [p.title for p in synthetic.iter_bio_passages(40_000, seed=3)]
  assert len(set(names)) == len(names)
  assert any(". " in n for n in names)  # past 120 x 121 (first, last) pairs: middle initials
  # Middle-initial rounds are unique too (no full table needed; checked on the name generator).
  many = [n for n, _ in synthetic._names(400_000, seed=0)]
  assert len(set(many)) == len(many)


def test_attributes_not_degenerate(bios):
  people = list(synthetic.iter_people(3000, seed=0))
  for attr, pool in (("birth_city", synthetic.CITIES), ("university", synthetic.UNIVERSITIES),
                     ("major", synthetic.MAJORS), ("employer", synthetic.EMPLOYERS)):
    counts = collections.Counter(p.attribute(attr) for p in people)
    assert len(counts) == len(pool), attr  # 3000 draws cover every value
    assert max(counts.values()) < 3 * 3000 / len(pool), attr
  years = collections.Counter(int(p.birth_date.split()[-1]) for p in people)
  assert min(years) >= 1940 and max(years) <= 2005 and len(years) > 50
  months = collections.Counter(p.birth_date.split()[1] for p in people)
  assert set(months) == set(synthetic.MONTHS)
  # Surface forms vary: many distinct question phrasings and bio openings.
  names = {p.id: p.title for p in bios.passages}
  phrasings = {q.question.replace(names[q.gold_passage_ids[0]], "X") for q in bios.train_questions}
  assert len(phrasings) == sum(len(t) for t in synthetic.QUESTION_TEMPLATES.values())
  openings = {p.text.replace(p.title, "X").split(".")[0] for p in bios.passages}
  assert len(openings) > 100


def test_pool_sizes():
  assert len(synthetic.FIRST_NAMES) >= 100 and len(synthetic.LAST_NAMES) >= 100
  assert len(synthetic.CITIES) >= 60 and len(synthetic.UNIVERSITIES) >= 40
  assert len(synthetic.MAJORS) >= 30 and len(synthetic.EMPLOYERS) >= 50


def test_attribute_values_never_overlap():
  # No value is a substring of another, so "answer appears in passage" is unambiguous.
  values = (synthetic.CITIES + synthetic.UNIVERSITIES + synthetic.MAJORS + synthetic.EMPLOYERS
            + synthetic.HOBBIES + synthetic.FIRST_NAMES + synthetic.LAST_NAMES)
  assert len(set(values)) == len(values)
  for a in values:
    for b in values:
      assert a == b or a not in b, (a, b)


def test_write_bios(tmp_path):
  paths = synthetic.write_bios(tmp_path / "bios", 200, seed=5, eval_fraction=0.25)
  assert set(paths) == {"corpus", "train_questions", "eval_questions"}
  assert sorted(p.name for p in (tmp_path / "bios").iterdir()) == [
      "corpus.jsonl", "eval_questions.jsonl", "train_questions.jsonl"]  # no temp files left
  expected = synthetic.make_bios(200, seed=5, eval_fraction=0.25)
  rows = [json.loads(line) for line in paths["corpus"].read_text("utf-8").splitlines()]
  assert [Passage(**r) for r in rows] == expected.passages
  for key, want in (("train_questions", expected.train_questions),
                    ("eval_questions", expected.eval_questions)):
    rows = [json.loads(line) for line in paths[key].read_text("utf-8").splitlines()]
    assert set(rows[0]) == {"id", "question", "answers", "gold_passage_ids"}
    got = [Question(r["id"], r["question"], tuple(r["answers"]), tuple(r["gold_passage_ids"]))
           for r in rows]
    assert got == want
  assert len(expected.eval_questions) == 5 * 50


def test_write_bios_readable_by_loaders(tmp_path):
  from ragjax.data import corpus, qa
  paths = synthetic.write_bios(tmp_path, 50, seed=2)
  expected = synthetic.make_bios(50, seed=2)
  assert list(corpus.read_passages(paths["corpus"])) == expected.passages
  assert list(qa.read_questions(paths["train_questions"])) == expected.train_questions


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_people"):
    synthetic.make_bios(-1)
  with pytest.raises(ValueError, match="seed"):
    synthetic.make_bios(10, seed=-3)
  with pytest.raises(ValueError, match="eval_fraction"):
    synthetic.make_bios(10, eval_fraction=1.0)
  empty = synthetic.make_bios(0)
  assert empty.passages == [] and empty.train_questions == [] and empty.eval_questions == []
