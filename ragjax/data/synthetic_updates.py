"""An updated biographies world for index hot-swap (Lewis et al. 2020 §4.5, "Index hot-swapping").

The RAG paper swaps a 2016 Wikipedia index for a 2018 one at test time, without retraining, and
answers "who is the leader of X" right for the new world (70% with the new index against 4%
with the old). Here the world is the built-in biographies (`ragjax.data.synthetic`, the same
`num_people`, `seed` and `eval_fraction` as the run): a seeded `fraction` of the people changed
one fact, their employer or their birth city (a corrected record), and their biography says the
new value where it said the old one (the value is stated once per biography; a person whose old
value does not occur exactly once, as a whole phrase, is left unchanged and not counted).

  paths = write_updated_world("runs/bios_updated", 2000, seed=1, fraction=0.25)
  # corpus_updated.jsonl: every biography, the changed ones rewritten
  # changed_questions.jsonl: the held-out people's questions about a changed fact, new answers
  # changed_questions_old.jsonl: the same questions with the old answers
  # changes.jsonl: {"passage_id", "attribute", "old", "new"} per changed person

Determinism: which people change and their new values depend only on `(seed, update_seed,
num_people)` (numpy PCG64 keyed by `[seed, 3, update_seed]`).
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from ragjax.data.corpus import Passage, write_passages_jsonl
from ragjax.data.synthetic import CITIES, EMPLOYERS, make_bios
from ragjax.fsutil import atomic_file

CHANGEABLE = {"employer": EMPLOYERS, "birth_city": CITIES}


def updated_world(num_people: int, seed: int = 0, eval_fraction: float = 0.2,
                  fraction: float = 0.25, update_seed: int = 0,
                  attributes=("employer", "birth_city")):
  """`(passages, changes, questions)`: the updated corpus `[N]`, one change dict per changed
  person, and the eval people's questions about a changed fact as `(question, old answer, new
  answer)`. Raises: ValueError (`fraction` outside (0, 1], an attribute not in CHANGEABLE, or
  the arguments `make_bios` refuses)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  bad = [a for a in attributes if a not in CHANGEABLE]
  if bad or not attributes:
    raise ValueError(f"attributes {bad or attributes}: expected some of {sorted(CHANGEABLE)}")
  bios = make_bios(num_people, seed, eval_fraction)
  rng = np.random.default_rng([seed, 3, update_seed])
  chosen_n = rng.permutation(num_people)[:int(round(fraction * num_people))]  # [M]
  attr_m = rng.integers(0, len(attributes), size=len(chosen_n))  # [M]
  offset_m = rng.integers(1, 10**6, size=len(chosen_n))  # [M]; a new value != the old one
  questions_by_id = {q.id: q for q in bios.train_questions + bios.eval_questions}
  passages = list(bios.passages)
  changes, questions = [], []
  for i, a, off in zip(chosen_n.tolist(), attr_m.tolist(), offset_m.tolist()):
    attr, values = attributes[a], CHANGEABLE[attributes[a]]
    p = passages[i]
    q = questions_by_id[f"{p.id}-{attr}"]
    old = q.answers[0]
    new = values[(values.index(old) + off % (len(values) - 1) + 1) % len(values)]
    pattern = re.compile(r"(?<!\w)" + re.escape(old) + r"(?!\w)")
    if len(pattern.findall(p.text)) != 1:
      continue
    passages[i] = Passage(p.id, p.title, pattern.sub(new, p.text))
    changes.append({"passage_id": p.id, "attribute": attr, "old": old, "new": new,
                    "eval": bool(bios.eval_person_mask[i])})
    if bios.eval_person_mask[i]:
      questions.append((q, old, new))
  return passages, changes, questions


def write_updated_world(out_dir, num_people: int, seed: int = 0, eval_fraction: float = 0.2,
                        fraction: float = 0.25, update_seed: int = 0
                        ) -> dict[str, pathlib.Path]:
  """Write `updated_world(...)` to `out_dir` (module docstring), each file atomically.
  Returns the four paths by name. Raises: ValueError as `updated_world`; OSError."""
  passages, changes, questions = updated_world(num_people, seed, eval_fraction, fraction,
                                               update_seed)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"corpus_updated": out / "corpus_updated.jsonl",
           "changed_questions": out / "changed_questions.jsonl",
           "changed_questions_old": out / "changed_questions_old.jsonl",
           "changes": out / "changes.jsonl"}
  write_passages_jsonl(passages, paths["corpus_updated"])

  def write_lines(path, rows):
    with atomic_file(path) as tmp:
      with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
          f.write(json.dumps(r, ensure_ascii=False) + "\n")
  for key, pick in (("changed_questions", 2), ("changed_questions_old", 1)):
    write_lines(paths[key], ({"id": q.id, "question": q.question, "answers": [qa[pick]],
                              "gold_passage_ids": list(q.gold_passage_ids)}
                             for qa in questions for q in [qa[0]]))
  write_lines(paths["changes"], changes)
  return paths
