"""Biographies needle-in-a-haystack corpora (`ragjax.data.haystack`, `ragjax make-haystack`):
token budgets recounted with the tokenizer here, the same needles and questions at every size,
fillers nobody trained on, nested haystacks, and one-line errors."""
import json
import subprocess
import sys

import pytest
import tokenizers

from ragjax.data import haystack, synthetic
from ragjax.errors import UsageError
from ragjax.models import hf_import

SIZES = (2_000, 8_000, 32_000)
TOKENIZER = hf_import.minilm_dir(verify=False) / "tokenizer.json"


@pytest.fixture(scope="module")
def built():
  return haystack.build_haystacks(TOKENIZER, SIZES, num_people=200, seed=3, num_needles=20)


def test_every_haystack_fits_its_token_budget_to_within_one_biography(built):
  tok = tokenizers.Tokenizer.from_file(str(TOKENIZER))
  tok.no_truncation()
  tok.no_padding()
  _, corpora, stats = built
  for s, passages in corpora.items():
    counts = [len(tok.encode(f"{p.title} {p.text}", add_special_tokens=False).ids)
              for p in passages]
    assert sum(counts) == stats[s]["tokens"] <= s
    assert s - sum(counts) < max(counts)  # one more filler would not fit
    assert stats[s]["passages"] == len(passages)


def test_the_same_needles_and_questions_hide_in_every_size(built):
  questions, corpora, _ = built
  assert len(questions) == 100 and len({q.id for q in questions}) == 100
  world = synthetic.make_bios(200, seed=3)
  held_out = {q.gold_passage_ids[0] for q in world.eval_questions}
  needles = {q.gold_passage_ids[0] for q in questions}
  assert len(needles) == 20 and needles <= held_out  # never asked about in training
  by_id = {p.id: p for p in world.passages}
  for q in questions:
    assert q.answers[0] in by_id[q.gold_passage_ids[0]].text
  world_names = {p.title for p in world.passages}
  for s, passages in corpora.items():
    ids = [p.id for p in passages]
    assert needles <= set(ids)
    fillers = [p for p in passages if p.id not in needles]
    assert all(int(p.id.split("-")[1]) >= 200 for p in fillers)  # outside the trained world
    assert not {p.title for p in fillers} & world_names
    assert len({p.title for p in passages}) == len(passages)  # non-repeated people
    where = [i for i, p in enumerate(passages) if p.id in needles]
    assert where[-1] >= len(passages) // 2  # hidden throughout the hay, not all at its start
  small, large = ([p.id for p in corpora[s] if p.id not in needles] for s in SIZES[:2])
  assert large[:len(small)] == small  # a larger haystack extends a smaller one's hay


def test_bad_sizes_and_needles_are_one_line_errors():
  with pytest.raises(UsageError, match="increasing"):
    haystack.build_haystacks(TOKENIZER, (8_000, 2_000), num_people=200)
  with pytest.raises(UsageError, match="needles alone take"):
    haystack.build_haystacks(TOKENIZER, (500,), num_people=200)
  with pytest.raises(UsageError, match="held-out people"):
    haystack.build_haystacks(TOKENIZER, (2_000,), num_people=20, num_needles=20)


def test_make_haystack_writes_the_corpora_questions_and_manifest(tmp_path):
  out = tmp_path / "hs"
  r = subprocess.run([sys.executable, "-m", "ragjax.cli", "make-haystack", "--out", str(out),
                      "--sizes", "2000,8000", "--num-people", "200"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["num_questions"] == 100
  for s in ("2000", "8000"):
    lines = (out / f"haystack_{s}.jsonl").read_text().splitlines()
    assert len(lines) == manifest["sizes"][s]["passages"]
  from ragjax.data.qa import read_questions
  assert len(read_questions(out / "needle_questions.jsonl")) == 100
  r = subprocess.run([sys.executable, "-m", "ragjax.cli", "make-haystack", "--out", str(out),
                      "--sizes", "2000,x"], capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "--sizes '2000,x'" in r.stderr
