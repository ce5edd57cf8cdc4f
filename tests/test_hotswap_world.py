"""The updated biographies world for index hot-swap (`ragjax make-bios --update-fraction`): the
changed biographies state the new value and not the old, the others are byte-identical, each
changed question's new answer is in its gold passage, and the draw is deterministic."""
import json
import re

import pytest

from ragjax.cli import main
from ragjax.data.answers import has_answer
from ragjax.data.synthetic import make_bios
from ragjax.data.synthetic_updates import updated_world


def test_changed_and_unchanged_biographies():
  before = make_bios(300, seed=4).passages
  after, changes, questions = updated_world(300, seed=4, fraction=0.5, update_seed=2)
  assert len(after) == len(before)
  changed = {c["passage_id"]: c for c in changes}
  assert 130 <= len(changed) <= 150  # round(0.5 * 300) drawn, a few skipped at most
  assert {c["attribute"] for c in changes} == {"employer", "birth_city"}
  for b, a in zip(before, after):
    assert (a.id, a.title) == (b.id, b.title)
    if b.id not in changed:
      assert a.text == b.text
      continue
    c = changed[b.id]
    assert c["old"] != c["new"]
    word = lambda v: re.compile(r"(?<!\w)" + re.escape(v) + r"(?!\w)")
    assert len(word(c["old"]).findall(b.text)) == 1 and not word(c["old"]).search(a.text)
    assert word(c["new"]).search(a.text)
  gold = {p.id: p for p in after}
  for q, old, new in questions:
    assert changed[q.gold_passage_ids[0]]["eval"]
    assert has_answer(gold[q.gold_passage_ids[0]].text, [new])
    assert not has_answer(gold[q.gold_passage_ids[0]].text, [old])
  again = updated_world(300, seed=4, fraction=0.5, update_seed=2)
  assert again[1] == changes and [p.text for p in again[0]] == [p.text for p in after]
  assert updated_world(300, seed=4, fraction=0.5, update_seed=3)[1] != changes
  with pytest.raises(ValueError, match="fraction must be in"):
    updated_world(10, fraction=0.0)


def test_make_bios_writes_the_updated_world(tmp_path, capsys):
  out = tmp_path / "bios"
  assert main(["make-bios", "--num-people", "200", "--seed", "1", "--update-fraction", "0.5",
               "--out", str(out)]) == 0
  new = [json.loads(x) for x in (out / "changed_questions.jsonl").read_text().splitlines()]
  old = [json.loads(x) for x in (out / "changed_questions_old.jsonl").read_text().splitlines()]
  assert new and [q["id"] for q in new] == [q["id"] for q in old]
  assert all(a["answers"] != b["answers"] for a, b in zip(new, old))
  eval_ids = {json.loads(x)["id"] for x in (out / "eval_questions.jsonl").read_text().splitlines()}
  assert {q["id"] for q in new} <= eval_ids
  assert len((out / "corpus_updated.jsonl").read_text().splitlines()) == 200
  assert main(["make-bios", "--num-people", "20", "--layout", "documents", "--update-fraction",
               "0.5", "--out", str(tmp_path / "d")]) == 2
  assert "only the single layout" in capsys.readouterr().err
