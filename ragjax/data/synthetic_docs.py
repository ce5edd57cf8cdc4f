"""Synthetic biographies as multi-passage documents: a benchmark where a frozen retriever is weak.

The one-passage biographies of `ragjax.data.synthetic` name their person in the title and the first
sentence, so frozen MiniLM already finds them (answer recall@2 0.99 in experiments/bios.py) and
retriever training has nothing to gain. Here the same people (`synthetic.iter_people`) each get
two documents, split into passages that keep the document title but mostly not the name:

  "Ximena Costa - profile"  sections, one passage each: early life (birth date and city, always),
                            education (university, major), career (employer), personal life
  "Ximena Costa: news"      a news-style article of `news_passages` passages

Each of university, major and employer is stated in the profile or (probability
`news_attribute_rate`) in the news article, so which passage answers a question differs from
person to person. A document's first passage names the person with probability `name_in_text`;
the other passages say "she", "the engineer" or, in the news, the surname. Every passage carries
`distractors` sentences about relatives or events with values of the *other* attributes' kinds
(another city, year, university or employer, never the person's own), so the question's wording
("born", "studied", "works for") matches several of a person's passages. About
`2 * shared_name_rate` of the people share their full name with one or two others (their titles
read "Ximena Costa (born 1961) - profile", as Wikipedia disambiguates), who differ in birth year and
birth city; their questions name the one meant: "Where did the Ximena Costa born in 1961 study?",
"When was the Ximena Costa from Lisbon born?" (the birth date's passage states the city).

Every question is about one attribute of one person, its single answer is stated (verbatim, once)
in exactly one passage of that person, and that passage's id is the question's gold passage id. No
other passage of the person contains the answer string (distractor values exclude it). The option
`restate_rate` (default 0, the benchmark) states an attribute a second time in the person's other
document, the redundancy that salient-span pretraining needs (a masked fact stated once, in the
query's own passage, can be retrieved from nowhere); the gold id stays the first statement's.
(`ragjax make-bios --layout documents --option restate_rate=1.0 --option distractors=0 --out D`.)

Determinism: as `synthetic` (seeded PCG64 streams, no `hash()`): person `i`'s passages and
questions depend on `(seed, i, options)` only: the namesake groups are drawn per chunk of 4,096
people, the rest per person from `[seed, 31, i]`, so the first `n` people of a larger corpus are
those of a smaller one. The train/eval split is `synthetic.eval_person_mask` (the same people as
the one-passage layout).

  bios = make_bio_documents(700, seed=0)      # 3,370 passages, 560*5 train, 140*5 eval questions
  write_bio_documents("data/bios_docs", 700)  # corpus.jsonl, {train,eval}_questions.jsonl

Measured (2-core AMD EPYC, AVX2, shared with other jobs; 2026-12-01): recommended size 700 people
= 3,370 passages (4-6 per person; MiniLM wordpieces of `title [SEP] text` 67 mean, 98 max;
questions <= 21), 2,800 train and 700 held-out questions (140 eval people), default options:

  ragjax make-bios --layout documents --num-people 700 --out D                         # 1.5 s
  ragjax eval-retrieval --corpus D/corpus.jsonl --questions D/eval_questions.jsonl \
    --retriever minilm --index exact --k 1,2,5,10,50 --out D/minilm_exact.json         # 151 s
  (the same with --retriever bm25 --out D/bm25.json)                                   # 6 s

  held-out questions (700)  |  @1   |  @2   |  @5   |  @10  |  @50
  MiniLM exact, answer      | 0.304 | 0.501 | 0.824 | 0.967 | 1.000
  MiniLM exact, gold        | 0.300 | 0.494 | 0.811 | 0.963 | 0.999
  BM25, answer              | 0.273 | 0.441 | 0.919 | 0.999 | 1.000
  BM25, gold                | 0.273 | 0.440 | 0.917 | 0.999 | 1.000

MiniLM embeds the 3,370 passages in 135 s. Its gold@2 by question: birth date 0.76, birth city 0.54,
university 0.46, major 0.36, employer 0.35; gold passage in the profile 0.56, in the news 0.36;
namesakes' questions 0.34, others 0.61; its top-1 passage is the right person's in 82% (so the
misses are mostly the right person's wrong passage, what retriever training can target; the gain
is not measured here). Tuning path
(700 people, answer@2 / @5 / @50 for MiniLM; BM25 @2 / @5): shared_name_rate 0.15, name_in_text
0.3, news_attribute_rate 0.4, distractors 2: 0.724 / 0.919 / 1.000 (BM25 0.454 / 0.913); then
shared 0.25, distractors 3: 0.597 / 0.854 / 1.000; shared 0.2, distractors 3, name_in_text 0.15:
0.593 / 0.864 / 1.000; and the defaults (also news_attribute_rate 0.5, distractors 4) above.
A RAG config over this corpus needs `model.context_max_length` ~ 120 (passage <= 98 + question).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import pathlib
import tempfile
from typing import Iterator

import numpy as np

from ragjax.data import synthetic
from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.fsutil import chmod_default
from ragjax.data.synthetic import ATTRIBUTES, Person, SyntheticBios
from ragjax.data.synthetic_docs_text import (ATTR_KIND, DISTRACTORS, FILLERS, HEADINGS, KINDS,
                                             NEWS_LEADS, RELATIVES, ROLES)


@dataclasses.dataclass(frozen=True)
class DocOptions:
  """Generator options (`make_bio_documents(..., **options)`); the defaults are the tuned ones."""
  shared_name_rate: float = 0.2    # P(person takes the name of an earlier one in its chunk)
  max_namesakes: int = 3           # people per shared name, at most
  name_in_text: float = 0.15       # P(a document's first passage names the person in full)
  surname_in_news: float = 0.5     # P(a news passage calls the person by surname)
  role_noun: float = 0.3           # P(a later sentence says "the engineer", not "she")
  news_attribute_rate: float = 0.5  # P(university / major / employer is told in the news)
  news_passages: int = 2           # passages of the news article
  personal_section: float = 0.5    # P(the profile has a "personal life" passage)
  distractors: int = 4             # distractor sentences per passage
  headings: bool = False           # profile passages open "Early life." / "Education." / ...
  restate_rate: float = 0.0        # P(an attribute is stated again in the person's other
                                   # document): redundancy for joint pretraining (REALM's
                                   # salient spans need the fact told twice); 0: told once

  def __post_init__(self):
    for name in ("shared_name_rate", "name_in_text", "surname_in_news", "role_noun",
                 "news_attribute_rate", "personal_section", "restate_rate"):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"option {name} must be a probability in [0, 1], got {v!r}")
    for name, lo, hi in (("max_namesakes", 2, 8), ("news_passages", 1, 4),
                         ("distractors", 0, 4)):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"option {name} must be an int in [{lo}, {hi}], got {v!r}")
    if not isinstance(self.headings, bool):
      raise ValueError(f"option headings must be a bool, got {self.headings!r}")


def doc_options(**options) -> DocOptions:
  """`DocOptions(**options)`, with an unknown option named. Raises: ValueError."""
  known = [f.name for f in dataclasses.fields(DocOptions)]
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown}; known: {known}")
  return DocOptions(**options)


_FEMALE = frozenset(synthetic.FEMALE_FIRST_NAMES)
_GROUP_CHUNK = 4096   # people per namesake-group stream; changing it changes every corpus
_WINDOW = 64          # a namesake copies someone at most this many people earlier
_FIRST_YEAR, _YEAR_SPAN = 1940, 64  # namesakes' years are moved by 4k within 1940..2003
_EVENT_YEARS = (1985, 2025)          # news and distractor dates (and >= birth year + 18)
_OTHER_YEARS = (1930, 2024)          # distractor years ("moved to Lyon in 1990")


@dataclasses.dataclass(frozen=True)
class DocPerson:
  """A person of the documents layout: `person` (final attributes) and how it is named.

  `display` is the title name ("Ximena Costa", or "Ximena Costa (born 1961)" when `shared`);
  `shared`: the full name belongs to more than one person (in the full chunk, so independent of
  `num_people`).
  """
  person: Person
  gender: int  # 0 female, 1 male (synthetic's pronoun table)
  shared: bool
  display: str


def _namesake_groups(seed: int, chunk: int, opts: DocOptions) -> tuple[np.ndarray, np.ndarray]:
  """`(root_c, shared_c)` for the people of one chunk: `root_c[j]` the in-chunk index whose name
  person j takes (j itself for a root), `shared_c[j]` whether j's name is shared in the chunk."""
  rng = np.random.default_rng([seed, 30, chunk])
  n = _GROUP_CHUNK
  copy_c = (rng.random(n) < opts.shared_name_rate).tolist()  # [C]
  back_c = rng.integers(1, _WINDOW + 1, size=n).tolist()  # [C]
  root_c = np.arange(n)
  size_c = np.ones(n, dtype=np.int64)
  for j in range(n):
    if copy_c[j] and back_c[j] <= j:
      r = int(root_c[j - back_c[j]])
      if size_c[r] < opts.max_namesakes:
        root_c[j] = r
        size_c[r] += 1
  shared_c = size_c[root_c] > 1
  return root_c, shared_c


def _birth_year(p: Person) -> int:
  return int(p.birth_date.rsplit(" ", 1)[1])


def _distinct_from(p: Person, earlier: list[Person]) -> Person:
  """`p` with birth year and city moved (deterministically) off those of `earlier` namesakes.

  Years move by multiples of 4 within 1940..2003, so 29 February stays a valid date.
  """
  years = {_birth_year(q) for q in earlier}
  cities = {q.birth_city for q in earlier}
  year, city_i = _birth_year(p), synthetic.CITIES.index(p.birth_city)
  step = 0
  while year in years:
    step += 1
    year = _FIRST_YEAR + (_birth_year(p) - _FIRST_YEAR + 4 * step) % _YEAR_SPAN
  step = 0
  while synthetic.CITIES[city_i] in cities:
    step += 1
    city_i = (synthetic.CITIES.index(p.birth_city) + step) % len(synthetic.CITIES)
  day_month = p.birth_date.rsplit(" ", 1)[0]
  return dataclasses.replace(p, birth_date=f"{day_month} {year}",
                             birth_city=synthetic.CITIES[city_i])


def _iter_people(num_people: int, seed: int, opts: DocOptions) -> Iterator[DocPerson]:
  """`synthetic.iter_people` with namesakes: a copy takes its root's name, then moves its birth
  year and city off those of the group's earlier members."""
  groups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
  members: dict[int, list[Person]] = {}  # root index -> final members so far
  for p in synthetic.iter_people(num_people, seed):
    chunk, j = divmod(p.index, _GROUP_CHUNK)
    if chunk not in groups:
      groups = {chunk: _namesake_groups(seed, chunk, opts)}  # one chunk at a time
      members = {}
    root_c, shared_c = groups[chunk]
    root = chunk * _GROUP_CHUNK + int(root_c[j])
    if root != p.index:
      earlier = members[root]
      p = _distinct_from(dataclasses.replace(p, name=earlier[0].name), earlier)
    if shared_c[j]:
      members.setdefault(root, []).append(p)
    year = _birth_year(p)
    display = f"{p.name} (born {year})" if shared_c[j] else p.name
    yield DocPerson(p, 0 if p.name.split()[0] in _FEMALE else 1, bool(shared_c[j]), display)


class _Writer:
  """Sentences about one person: subject forms and distractor values drawn from `rng`."""

  def __init__(self, dp: DocPerson, rng: np.random.Generator, opts: DocOptions):
    self.dp, self.rng, self.opts = dp, rng, opts
    p = dp.person
    self.pronouns = synthetic._PRONOUNS[dp.gender]
    self.role = ROLES[int(rng.integers(len(ROLES)))]
    self.surname = p.name.rsplit(" ", 1)[1]
    self.own = {p.birth_city, p.university, p.major, p.employer}
    self.birth_year = _birth_year(p)

  def pick(self, seq):
    return seq[int(self.rng.integers(len(seq)))]

  def subject(self, kind: str) -> tuple[str, str, str]:
    """(subject, possessive, object) for `kind` "name" | "surname" | "pronoun" | "later"."""
    if kind == "name":
      return self.dp.person.name, self.dp.person.name + "'s", self.dp.person.name
    if kind == "surname":
      return self.surname, self.surname + "'s", self.surname
    if kind == "later" and self.rng.random() < self.opts.role_noun:
      r = f"the {self.role}"
      return r, r + "'s", r
    return self.pronouns

  def _other(self, pool) -> str:
    while True:
      v = self.pick(pool)
      if v not in self.own:
        return v

  def _year(self, lo: int, hi: int) -> int:
    while True:
      year = int(self.rng.integers(lo, hi + 1))
      if year != self.birth_year:  # a date never contains the person's birth date
        return year

  def _date(self, lo: int = 0, hi: int = 0) -> str:
    """A day-month-year; by default an event date in the person's adult life."""
    if not hi:
      lo, hi = max(_EVENT_YEARS[0], self.birth_year + 18), _EVENT_YEARS[1]
    year = self._year(lo, hi)
    month, day = int(self.rng.integers(12)), int(self.rng.integers(1, 29))
    return f"{day} {synthetic.MONTHS[month]} {year}"

  def fill(self, template: str, subj: tuple[str, str, str], value: str = "") -> str:
    """`template` with subject slots from `subj`, `{v}` = value, and fresh distractor values."""
    s = template
    if "{rel}" in s:
      s = s.replace("{rel}", self.pick(RELATIVES))
    if "{city}" in s:
      s = s.replace("{city}", self._other(synthetic.CITIES))
    if "{univ}" in s:
      s = s.replace("{univ}", self._other(synthetic.UNIVERSITIES))
    if "{major}" in s:
      s = s.replace("{major}", self._other(synthetic.MAJORS))
    if "{employer}" in s:
      s = s.replace("{employer}", self._other(synthetic.EMPLOYERS))
    if "{date}" in s:
      s = s.replace("{date}", self._date())
    if "{bdate}" in s:
      s = s.replace("{bdate}", self._date(*_OTHER_YEARS))
    if "{year}" in s:
      s = s.replace("{year}", str(self._year(*_OTHER_YEARS)))
    sub, poss, obj = subj
    if "{poss}" in template and "{S}" in template and sub != self.pronouns[0]:
      poss = self.pronouns[1]  # not "Ann spent Ann's childhood"
    return synthetic._fill(s, sub, poss, obj, value)

  def fact(self, attr: str, subj) -> str:
    return self.fill(self.pick(synthetic.SENTENCE_TEMPLATES[attr]), subj,
                     self.dp.person.attribute(attr))

  def distractors(self, kinds: tuple[str, ...]) -> list[str]:
    """`opts.distractors` sentences of distinct templates, each of a kind drawn from `kinds`."""
    used, out = set(), []
    while len(out) < self.opts.distractors:
      template = self.pick(DISTRACTORS[self.pick(kinds)])
      if template not in used:
        used.add(template)
        out.append(self.fill(template, self.subject("later")))
    return out


def _shuffled(rng: np.random.Generator, items: list) -> list:
  return [items[k] for k in rng.permutation(len(items)).tolist()] if items else []


def _restated(passages: list[Passage], gold: dict[str, str], w: _Writer,
              rng: np.random.Generator, opts: DocOptions) -> list[Passage]:
  """`passages` with each attribute (probability `opts.restate_rate`) stated once more, at the
  end of a random passage of the person's other document (profile <-> news), by the surname
  (probability `surname_in_news`) or a pronoun / role noun. Draws only from `rng`, a stream of
  its own, so the corpus at `restate_rate=0` is unchanged."""
  w = copy.copy(w)
  w.rng = rng
  out = list(passages)
  for attr in ATTRIBUTES:
    if rng.random() >= opts.restate_rate:
      continue
    doc = "-news-" if "-profile-" in gold[attr] else "-profile-"
    rows = [i for i, q in enumerate(out) if doc in q.id]
    i = rows[int(rng.integers(len(rows)))]
    who = w.subject("surname" if rng.random() < opts.surname_in_news else "later")
    out[i] = dataclasses.replace(out[i], text=f"{out[i].text} {w.fact(attr, who)}")
  return out


def _person_records(dp: DocPerson, seed: int, opts: DocOptions
                    ) -> tuple[list[Passage], list[Question]]:
  """Person `dp`'s passages (profile sections, then news) and 5 questions."""
  p = dp.person
  rng = np.random.default_rng([seed, 31, p.index])
  w = _Writer(dp, rng, opts)
  base = f"bio-{p.index:07d}"
  in_news = {a: bool(rng.random() < opts.news_attribute_rate)
             for a in ("university", "major", "employer")}
  # Profile sections: (kind, attributes stated there).
  sections = [("early", _shuffled(rng, ["birth_date", "birth_city"]))]
  school = [a for a in ("university", "major") if not in_news[a]]
  if school:
    sections.append(("education", _shuffled(rng, school)))
  if not in_news["employer"]:
    sections.append(("career", ["employer"]))
  if rng.random() < opts.personal_section or len(sections) == 1:
    sections.append(("personal", []))
  news_attrs = [a for a in ("university", "major", "employer") if in_news[a]]
  news_slot = rng.integers(0, opts.news_passages, size=len(news_attrs)).tolist()
  name_first = {"profile": rng.random() < opts.name_in_text,
                "news": rng.random() < opts.name_in_text}
  gold: dict[str, str] = {}
  passages = []

  for k, (kind, attrs) in enumerate(sections):
    first = w.subject("name" if k == 0 and name_first["profile"] else "pronoun")
    body = [w.fact(a, first if i == 0 else w.subject("later")) for i, a in enumerate(attrs)]
    if kind != "early" or rng.random() < 0.5:
      body.append(w.fill(w.pick(FILLERS[kind]), first if not body else w.subject("later")))
    if kind == "personal" and synthetic.HOBBIES:
      body.append(w.fill(w.pick(synthetic.HOBBY_TEMPLATES), w.subject("pronoun"),
                         w.pick(synthetic.HOBBIES)))  # "{S} ... {poss}": no role noun twice
    extra = w.distractors(KINDS[kind])
    sentences = body[:1] + _shuffled(rng, body[1:] + extra)
    if opts.headings:
      sentences.insert(0, HEADINGS[kind])
    pid = f"{base}-profile-{k}"
    gold.update({a: pid for a in attrs})
    passages.append(Passage(id=pid, title=f"{dp.display} - profile", text=" ".join(sentences)))

  for k in range(opts.news_passages):
    if k == 0 and name_first["news"]:
      first = w.subject("name")
    else:
      first = w.subject("surname" if rng.random() < opts.surname_in_news else "pronoun")
    attrs = [a for a, slot in zip(news_attrs, news_slot) if slot == k]
    lead = w.fill(w.pick(NEWS_LEADS), first) if k == 0 else w.fill(w.pick(FILLERS["news"]),
                                                                     first)
    body = [w.fact(a, w.subject("later")) for a in attrs]
    kinds = tuple(x for x in ("birth", "school", "work", "place")
                  if x not in {ATTR_KIND[a] for a in attrs})
    sentences = [lead] + _shuffled(rng, body + w.distractors(kinds))
    pid = f"{base}-news-{k}"
    gold.update({a: pid for a in attrs})
    passages.append(Passage(id=pid, title=f"{dp.display}: news", text=" ".join(sentences)))

  if opts.restate_rate > 0:
    passages = _restated(passages, gold, w, np.random.default_rng([seed, 32, p.index]), opts)
  questions = []
  q_tpl = rng.integers(0, 1 << 30, size=len(ATTRIBUTES)).tolist()
  q_form = rng.random(size=len(ATTRIBUTES)).tolist()
  for a, attr in enumerate(ATTRIBUTES):
    templates = synthetic.QUESTION_TEMPLATES[attr]
    if dp.shared:  # name the one meant; no "{n}'s" (it would read "the X from Y's")
      templates = tuple(t for t in templates if "{n}'s" not in t)
      if attr == "birth_date":  # the year would give the answer away: the city, stated beside it
        n = f"the {p.name} from {p.birth_city}"
      elif attr == "birth_city" or q_form[a] < 0.5:
        n = dp.display
      else:
        n = f"the {p.name} born in {_birth_year(p)}"
    else:
      n = p.name
    text = templates[q_tpl[a] % len(templates)].replace("{n}", n)
    questions.append(Question(id=f"{base}-{attr}", question=text, answers=(p.attribute(attr),),
                              gold_passage_ids=(gold[attr],)))
  return passages, questions


def _iter_records(num_people: int, seed: int, opts: DocOptions
                  ) -> Iterator[tuple[DocPerson, list[Passage], list[Question]]]:
  for dp in _iter_people(num_people, seed, opts):
    passages, questions = _person_records(dp, seed, opts)
    yield dp, passages, questions


def iter_doc_people(num_people: int, seed: int = 0, **options) -> Iterator[DocPerson]:
  """The people of `make_bio_documents(num_people, seed, **options)`, in index order.

  Raises: ValueError (bad `num_people`, `seed` or option).
  """
  yield from _iter_people(num_people, seed, doc_options(**options))


def make_bio_documents(num_people: int, seed: int = 0, eval_fraction: float = 0.2,
                       **options) -> SyntheticBios:
  """Builds `num_people` people's profile and news documents (passages) and 5 questions each.

  Args:
    num_people: people N (each gets 3-7 passages, ~4.3 with the default options).
    seed: int >= 0; same arguments give identical output on any machine.
    eval_fraction: share of people whose questions go to `eval_questions`
      (`synthetic.eval_person_mask`, the same people as `synthetic.make_bios`).
    **options: `DocOptions` fields (namesake rate, name mentions, distractors, ...).

  Returns:
    `SyntheticBios`: all passages (person by person), 5 * (N - N_eval) train and 5 * N_eval eval
    questions, each with one answer stated once in its one gold passage; `eval_person_mask` [N].

  Raises:
    ValueError: bad `num_people`, `seed`, `eval_fraction` or an option (named).
  """
  opts = doc_options(**options)
  mask_n = synthetic.eval_person_mask(num_people, seed, eval_fraction)
  passages, train_q, eval_q = [], [], []
  gc_was_enabled = gc.isenabled()
  gc.disable()  # many small acyclic objects (see synthetic.make_bios)
  try:
    for dp, person_passages, questions in _iter_records(num_people, seed, opts):
      passages.extend(person_passages)
      (eval_q if mask_n[dp.person.index] else train_q).extend(questions)
  finally:
    if gc_was_enabled:
      gc.enable()
  return SyntheticBios(passages=passages, train_questions=train_q, eval_questions=eval_q,
                       eval_person_mask=mask_n)


def write_bio_documents(out_dir, num_people: int, seed: int = 0, eval_fraction: float = 0.2,
                        **options) -> dict[str, pathlib.Path]:
  """Writes `make_bio_documents(...)` as `synthetic.write_bios` does: `corpus.jsonl`,
  `train_questions.jsonl`, `eval_questions.jsonl` in `out_dir`, each moved into place whole.

  Returns: {"corpus": path, "train_questions": path, "eval_questions": path}.
  Raises: ValueError (bad arguments); OSError (`out_dir` not writable).
  """
  bios = make_bio_documents(num_people, seed, eval_fraction, **options)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  lines = {
      "corpus": [json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False)
                 for p in bios.passages],
      "train_questions": [synthetic.question_json(q) for q in bios.train_questions],
      "eval_questions": [synthetic.question_json(q) for q in bios.eval_questions],
  }
  paths = {key: out / f"{key}.jsonl" for key in lines}
  for key, rows in lines.items():
    fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.jsonl.", suffix=".tmp", dir=out)
    try:
      with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(r + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
      chmod_default(tmp_name)
      os.replace(tmp_name, paths[key])
    finally:
      if os.path.exists(tmp_name):
        os.unlink(tmp_name)
  return paths
