"""Built-in default data: seeded, deterministic synthetic biographies and questions about them.

Each synthetic person has a unique full name and five attributes (birth date, birth city,
university, major, employer). Their biography is one passage of 5-6 sentences stating each
attribute exactly once, in surface forms drawn from several templates per attribute; each
attribute gets one question, phrased with one of several paraphrases. The facts are invented, so
a reader can only answer by retrieving the right biography (the bioS setting of Allen-Zhu & Li,
"Physics of Language Models 3.1", 2023).

Determinism: person `i` depends only on `(seed, i)` (numpy PCG64 streams keyed by
`[seed, 1, i // _CHUNK]`; no `hash()`, no global state), so the same arguments give the same text
on any machine, and the first `n` people of a larger corpus are the `n` people of a smaller one.
The train/eval split is drawn per `(seed, num_people, eval_fraction)`: eval people are never asked
about in training, but their biographies are in the corpus.

  bios = make_bios(1000, seed=0)            # 1000 passages, 800*5 train and 200*5 eval questions
  write_bios("runs/bios", 1_000_000)        # streams; corpus.jsonl, {train,eval}_questions.jsonl
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import pathlib
import tempfile
from typing import Iterator

import numpy as np

from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.fsutil import chmod_default

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")

# Names are single tokens (no spaces, periods or apostrophes), so "First M. Last" never collides.
FEMALE_FIRST_NAMES = (
    "Abigail", "Adaeze", "Aiko", "Alejandra", "Amara", "Anneliese", "Aurelia", "Beatriz",
    "Brigitta", "Camille", "Chiara", "Dagny", "Delphine", "Elif", "Esperanza", "Fatima", "Freya",
    "Giulia", "Hana", "Ingrid", "Isadora", "Jasmine", "Katarina", "Leilani", "Liesel", "Lucinda",
    "Magdalena", "Mariko", "Marisol", "Matilda", "Mirela", "Nadia", "Naomi", "Nkechi", "Odette",
    "Ophelia", "Priya", "Rosalind", "Saanvi", "Serafina", "Sigrid", "Soraya", "Svetlana",
    "Tamsin", "Thandiwe", "Ursula", "Valentina", "Wilhelmina", "Ximena", "Yasmin", "Yelena",
    "Zainab", "Zofia", "Henrietta", "Clementine", "Rosalie", "Greta", "Ines", "Noor", "Paloma",
)
MALE_FIRST_NAMES = (
    "Abelard", "Ahmed", "Alaric", "Anselm", "Arjun", "Augustin", "Bartholomew", "Bogdan",
    "Casimir", "Chidi", "Cormac", "Dario", "Desmond", "Dmitri", "Emeka", "Evander", "Fabian",
    "Florian", "Gideon", "Gustavo", "Hamish", "Hiroshi", "Ignatius", "Ambrose", "Jaroslav",
    "Joaquin", "Kenji", "Kwame", "Lachlan", "Leopold", "Lorcan", "Malik", "Mateus", "Nikolai",
    "Obinna", "Octavio", "Orlando", "Pascal", "Percival", "Rafferty", "Ravi", "Rodrigo",
    "Rupert", "Santiago", "Silvan", "Stellan", "Tariq", "Thaddeus", "Tobias", "Ulrich",
    "Vikram", "Wendell", "Xavier", "Yusuf", "Zoltan", "Benedikt", "Cyrus", "Emil", "Henrik",
    "Lucian",
)
FIRST_NAMES = FEMALE_FIRST_NAMES + MALE_FIRST_NAMES
LAST_NAMES = (
    "Abernathy", "Achterberg", "Adeyemi", "Albrecht", "Alvarado", "Amundsen", "Arakawa",
    "Ashworth", "Balogun", "Barrientos", "Beaumont", "Bergstrom", "Blackwood", "Bozkurt",
    "Castellano", "Chakraborty", "Christensen", "Costa", "Dalgaard", "Delacroix", "Dimitriou",
    "Donovan", "Eberhardt", "Ekwueme", "Espinoza", "Fairbanks", "Falkenrath", "Fitzgerald",
    "Fonseca", "Galloway", "Gonzaga", "Grimaldi", "Gunawardena", "Hadley", "Halvorsen",
    "Hashimoto", "Hawthorne", "Iglesias", "Ivanova", "Jablonski", "Jankowski", "Kalinowski",
    "Kapoor", "Kavanagh", "Kowalczyk", "Kuznetsov", "Lindqvist", "Lockhart", "Lombardi",
    "Lundgren", "Machado", "Malhotra", "Marchetti", "Mbeki", "Montgomery", "Moreau", "Nakamura",
    "Navarro", "Nwachukwu", "Okonkwo", "Oyelaran", "Pacheco", "Papadopoulos", "Pemberton",
    "Petrov", "Quintero", "Radcliffe", "Ramaswamy", "Rasmussen", "Ravensworth", "Rinaldi",
    "Rosenthal", "Saarinen", "Sandoval", "Sarkozy", "Schellenberg", "Sorensen", "Stavros",
    "Takahashi", "Tanaka", "Thorne", "Tremblay", "Underhill", "Valdivia", "Vasquez",
    "Vanderberg", "Villanueva", "Vogel", "Wainwright", "Wakefield", "Westergaard", "Whitfield",
    "Wojcik", "Yamamoto", "Yilmaz", "Zabrowski", "Zamora", "Zeller", "Zielinski", "Zimmerman",
    "Okafor", "Haddad", "Lindberg", "Ferreira", "Moretti", "Bianchi", "Novak", "Horvath",
    "Kovacs", "Szabo", "Dubois", "Lefebvre", "Fontaine", "Mercier", "Oyama", "Sato",
    "Fujimoto", "Mehta", "Iyer", "Banerjee", "Castillo",
)
CITIES = (
    "Lisbon", "Porto", "Seville", "Valencia", "Marseille", "Lyon", "Bordeaux", "Antwerp",
    "Rotterdam", "Utrecht", "Hamburg", "Leipzig", "Dresden", "Munich", "Salzburg", "Zurich",
    "Geneva", "Milan", "Turin", "Bologna", "Naples", "Palermo", "Ljubljana", "Zagreb",
    "Belgrade", "Sarajevo", "Krakow", "Gdansk", "Wroclaw", "Prague", "Brno", "Bratislava",
    "Budapest", "Bucharest", "Sofia", "Thessaloniki", "Istanbul", "Izmir", "Tbilisi", "Yerevan",
    "Tallinn", "Riga", "Vilnius", "Helsinki", "Tampere", "Uppsala", "Gothenburg", "Bergen",
    "Trondheim", "Aarhus", "Reykjavik", "Dublin", "Cork", "Glasgow", "Edinburgh", "Manchester",
    "Bristol", "Montreal", "Winnipeg", "Halifax", "Denver", "Portland", "Milwaukee", "Nashville",
    "Monterrey", "Guadalajara", "Cordoba", "Valparaiso", "Medellin", "Quito", "Osaka", "Sapporo",
    "Busan", "Kaohsiung", "Chennai", "Pune", "Nairobi", "Accra", "Lagos", "Casablanca",
)
UNIVERSITIES = (
    "Stanford University", "Harvard University", "Princeton University", "Yale University",
    "Columbia University", "Cornell University", "Duke University", "Rice University",
    "Brown University", "Vanderbilt University", "Emory University", "Tufts University",
    "Carnegie Mellon University", "Johns Hopkins University", "Northwestern University",
    "Georgetown University", "Purdue University", "Dartmouth College", "Williams College",
    "Amherst College", "Oxford University", "Cambridge University", "Imperial College London",
    "University College London", "Durham University", "Bocconi University",
    "McGill University", "Heidelberg University", "Sorbonne University", "Leiden University",
    "EPFL", "KU Leuven", "Lund University", "Charles University",
    "Jagiellonian University", "Kyoto University", "Seoul National University",
    "Tsinghua University", "Peking University", "National University of Singapore",
    "Australian National University", "University of Cape Town", "University of Melbourne",
    "Indian Institute of Science", "Technion", "Caltech", "MIT", "Georgia Tech",
)
MAJORS = (
    "computer science", "mechanical engineering", "electrical engineering",
    "chemical engineering", "civil engineering", "applied mathematics", "statistics",
    "theoretical physics", "astronomy", "biochemistry", "molecular biology", "neuroscience",
    "economics", "finance", "accounting", "marketing", "political science", "sociology",
    "anthropology", "psychology", "linguistics", "philosophy", "comparative literature",
    "medieval history", "art history", "musicology", "architecture", "urban planning",
    "journalism", "geology", "oceanography", "materials science", "nursing", "pharmacology",
    "public health", "international relations",
)
EMPLOYERS = (
    "Northwind Analytics", "Bluefin Robotics", "Copperleaf Energy", "Halcyon Biotech",
    "Ironbark Logistics", "Juniper Maritime", "Kestrel Aerospace", "Lumen Optics",
    "Marigold Foods", "Nimbus Cloudworks", "Oakridge Capital", "Pinecrest Health",
    "Quarry Stone Materials", "Redwater Pharmaceuticals", "Saltmarsh Shipping",
    "Tidewater Insurance", "Umber Textiles", "Vantage Semiconductors", "Willowbrook Publishing",
    "Xylo Acoustics", "Yellowstone Outfitters", "Zephyr Airlines", "Amberline Rail",
    "Brightforge Steel", "Cobalt Mining Group", "Driftwood Hotels", "Emberglow Ceramics",
    "Fernhill Nurseries", "Granite Peak Bank", "Harborview Hospital", "Inkwell Media",
    "Jadestone Jewelers", "Keystone Construction", "Lighthouse Software", "Meridian Telecom",
    "Northstar Satellites", "Orchard Valley Farms", "Palisade Security", "Quicksilver Motors",
    "Riverbend Chemicals", "Silverline Studios", "Thornfield Architects", "Upland Water Works",
    "Velvet Pictures", "Westwind Turbines", "Yarrow Cosmetics", "Zenith Instruments",
    "Arclight Games", "Birchwood Furniture", "Cascade Semiconductor Labs", "Dunmore Consulting",
    "Evergreen Pharmacy Chain", "Foxglove Perfumery", "Glacier Bay Fisheries",
    "Hollowell Law Partners", "Ivory Tower Press",
)
HOBBIES = (
    "birdwatching", "rock climbing", "sailing", "chess", "pottery", "beekeeping", "fencing",
    "calligraphy", "cross-country skiing", "origami", "kayaking", "astrophotography",
    "woodworking", "salsa dancing", "gardening", "marathon running", "knitting", "archery",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
_FIRST_BIRTH_ORDINAL = datetime.date(1940, 1, 1).toordinal()
_LAST_BIRTH_ORDINAL = datetime.date(2005, 12, 31).toordinal()

# Sentence templates. {s}/{S}: subject (full name or pronoun; {S} sentence-initial), {poss}/{Poss}:
# possessive, {o}: object, {v}: the attribute value, stated verbatim.
SENTENCE_TEMPLATES = {
    "birth_date": (
        "{S} was born on {v}.",
        "{Poss} date of birth is {v}.",
        "{S} came into the world on {v}.",
        "{S} celebrates a birthday every year, having been born on {v}.",
        "The records show that {s} was born on {v}.",
    ),
    "birth_city": (
        "{S} was born in {v}.",
        "{Poss} birthplace is {v}.",
        "{S} is a native of {v}.",
        "{v} is the city where {s} was born.",
        "{S} spent {poss} childhood in {v}, the city of {poss} birth.",
    ),
    "university": (
        "{S} attended {v}.",
        "{S} graduated from {v}.",
        "{S} enrolled at {v}.",
        "{S} received {poss} education at {v}.",
        "{S} completed {poss} degree at {v}.",
    ),
    "major": (
        "{S} studied {v}.",
        "{S} majored in {v}.",
        "{Poss} field of study was {v}.",
        "{S} earned a degree in {v}.",
        "{S} chose to specialize in {v}.",
    ),
    "employer": (
        "{S} works for {v}.",
        "{S} is employed by {v}.",
        "{S} took a job at {v}.",
        "{Poss} employer is {v}.",
        "{S} is on the payroll of {v}.",
    ),
}
HOBBY_TEMPLATES = (
    "{S} enjoys {v} in {poss} spare time.",
    "In {poss} free time, {s} is passionate about {v}.",
    "Friends know {o} for a love of {v}.",
)
QUESTION_TEMPLATES = {
    "birth_date": (
        "When was {n} born?",
        "What is the birth date of {n}?",
        "On what date was {n} born?",
        "What is {n}'s date of birth?",
        "What day was {n} born on?",
    ),
    "birth_city": (
        "Where was {n} born?",
        "In which city was {n} born?",
        "What is the birthplace of {n}?",
        "Which city is {n}'s birthplace?",
        "What city was {n} born in?",
    ),
    "university": (
        "Which university did {n} attend?",
        "Where did {n} go to university?",
        "Which university did {n} graduate from?",
        "At which university was {n} educated?",
        "What school did {n} attend?",
    ),
    "major": (
        "What did {n} study?",
        "What was {n}'s major?",
        "Which field did {n} major in?",
        "What subject did {n} study at university?",
        "In what field did {n} earn a degree?",
    ),
    "employer": (
        "Who employed {n}?",
        "Which company does {n} work for?",
        "Who is {n}'s employer?",
        "What company employs {n}?",
        "Where does {n} work?",
    ),
}
_PRONOUNS = {  # female, male: (subject, possessive, object)
    0: ("she", "her", "her"),
    1: ("he", "his", "him"),
}
_ORDERS_BIRTH = ((0, 1), (1, 0))  # indices into ATTRIBUTES: birth_date, birth_city
_ORDERS_SCHOOL = ((2, 3), (3, 2))  # university, major
_CHUNK = 4096  # people per PCG64 stream; changing it changes every corpus


@dataclasses.dataclass(frozen=True)
class Person:
  """One synthetic person. Attribute strings are exactly as written in the biography."""
  index: int
  name: str
  birth_date: str  # e.g. "12 March 1987"
  birth_city: str
  university: str
  major: str
  employer: str

  @property
  def passage_id(self) -> str:
    return f"bio-{self.index:07d}"

  def attribute(self, name: str) -> str:
    return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class SyntheticBios:
  """A synthetic corpus split by person.

  `passages[i]` is person `i`'s biography. `train_questions` ask only about train people,
  `eval_questions` only about eval people (whose biographies are still in `passages`).
  `eval_person_mask[i]` (bool, [num_people]) says which split person `i` is in.
  """
  passages: list[Passage]
  train_questions: list[Question]
  eval_questions: list[Question]
  eval_person_mask: np.ndarray  # [N] bool


def _check_args(num_people: int, seed: int, eval_fraction: float = 0.0) -> None:
  if not isinstance(num_people, (int, np.integer)) or num_people < 0:
    raise ValueError(f"num_people must be an int >= 0, got {num_people!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")


def _names(num_people: int, seed: int) -> Iterator[tuple[str, int]]:
  """Yields (unique full name, gender 0/1) for people 0..num_people-1.

  Person i takes (first, last) pair `perm[i % P]` of a seeded permutation of all P pairs, and in
  round `r = i // P` >= 1 adds middle initials spelling r in bijective base 26, each letter
  rotated by a per-pair offset (so the initials vary between pairs). Distinct (pair, r) give
  distinct names, so names are unique at any scale with O(P) memory.
  """
  num_first, num_last = len(FIRST_NAMES), len(LAST_NAMES)
  num_pairs = num_first * num_last
  pair_perm_p = np.random.default_rng([seed, 0]).permutation(num_pairs)  # [P]
  for i in range(num_people):
    rnd, k = divmod(i, num_pairs)
    pair = int(pair_perm_p[k])
    first_i, last_i = divmod(pair, num_last)
    first, last = FIRST_NAMES[first_i], LAST_NAMES[last_i]
    gender = 0 if first_i < len(FEMALE_FIRST_NAMES) else 1
    if rnd == 0:
      yield f"{first} {last}", gender
      continue
    initials, r, pos = [], rnd, 0
    while r > 0:
      r, digit = divmod(r - 1, 26)
      initials.append(chr(ord("A") + (digit + 7 * pair + 5 * pos) % 26) + ".")
      pos += 1
    yield f"{first} {' '.join(reversed(initials))} {last}", gender


def _format_date(ordinal: int) -> str:
  d = datetime.date.fromordinal(ordinal)
  return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def _fill(template: str, subject: str, possessive: str, obj: str, value: str) -> str:
  # str.replace, not str.format: attribute values may contain braces in custom lists.
  s = template
  for key, val in (("{S}", subject[:1].upper() + subject[1:]), ("{s}", subject),
                   ("{Poss}", possessive[:1].upper() + possessive[1:]), ("{poss}", possessive),
                   ("{o}", obj)):
    s = s.replace(key, val)
  return s.replace("{v}", value)


def _iter_records(num_people: int, seed: int, questions: bool = True
                  ) -> Iterator[tuple[Person, Passage, list[Question]]]:
  """Person i, their biography and (if `questions`, else []) their 5 questions, i < num_people."""
  _check_args(num_people, seed)
  names = _names(num_people, seed)
  n_attr = len(ATTRIBUTES)
  for c0 in range(0, num_people, _CHUNK):
    rng = np.random.default_rng([seed, 1, c0 // _CHUNK])
    # Always draw a full chunk, so person i does not depend on num_people. `.tolist()`: Python
    # ints index faster than numpy scalars in the per-person loop below.
    n = _CHUNK
    ordinal_c = rng.integers(_FIRST_BIRTH_ORDINAL, _LAST_BIRTH_ORDINAL + 1, size=n).tolist()  # [C]
    city_c = rng.integers(0, len(CITIES), size=n).tolist()  # [C]
    univ_c = rng.integers(0, len(UNIVERSITIES), size=n).tolist()  # [C]
    major_c = rng.integers(0, len(MAJORS), size=n).tolist()  # [C]
    employer_c = rng.integers(0, len(EMPLOYERS), size=n).tolist()  # [C]
    sent_tpl_ca = rng.integers(0, 5, size=(n, n_attr)).tolist()  # [C, A] template per attribute
    q_tpl_ca = rng.integers(0, 5, size=(n, n_attr)).tolist()  # [C, A] question paraphrase
    use_pronoun_ca = (rng.random(size=(n, n_attr)) < 0.5).tolist()  # [C, A]; not 1st sentence
    swap_c2 = (rng.random(size=(n, 2)) < 0.5).tolist()  # [C, 2] order in (birth), (education)
    hobby_c = rng.integers(-len(HOBBIES), len(HOBBIES), size=n).tolist()  # [C]; < 0: no hobby
    hobby_tpl_c = rng.integers(0, len(HOBBY_TEMPLATES), size=n).tolist()  # [C]
    for j in range(min(_CHUNK, num_people - c0)):
      i = c0 + j
      name, gender = next(names)
      values = (_format_date(ordinal_c[j]), CITIES[city_c[j]], UNIVERSITIES[univ_c[j]],
                MAJORS[major_c[j]], EMPLOYERS[employer_c[j]])  # in ATTRIBUTES order
      person = Person(i, name, *values)
      pid = person.passage_id
      order = (_ORDERS_BIRTH[swap_c2[j][0]] + _ORDERS_SCHOOL[swap_c2[j][1]] + (4,))
      pro_s, pro_poss, pro_o = _PRONOUNS[gender]
      sent_tpl_a, use_pronoun_a = sent_tpl_ca[j], use_pronoun_ca[j]
      sentences = []
      for pos, a in enumerate(order):
        tpl = SENTENCE_TEMPLATES[ATTRIBUTES[a]][sent_tpl_a[a]]
        if pos > 0 and use_pronoun_a[a]:
          subj, poss, obj = pro_s, pro_poss, pro_o
        else:
          subj, poss, obj = name, name + "'s", name
          if "{poss}" in tpl and "{S}" in tpl:  # not "Ann spent Ann's childhood"
            poss = pro_poss
        sentences.append(_fill(tpl, subj, poss, obj, values[a]))
      if hobby_c[j] >= 0:
        tpl = HOBBY_TEMPLATES[hobby_tpl_c[j]]
        sentences.append(_fill(tpl, pro_s, pro_poss, pro_o, HOBBIES[hobby_c[j]]))
      passage = Passage(id=pid, title=name, text=" ".join(sentences))
      if not questions:
        yield person, passage, []
        continue
      q_tpl_a = q_tpl_ca[j]
      person_questions = [
          Question(id=f"{pid}-{attr}",
                   question=QUESTION_TEMPLATES[attr][q_tpl_a[a]].replace("{n}", name),
                   answers=(values[a],), gold_passage_ids=(pid,))
          for a, attr in enumerate(ATTRIBUTES)
      ]
      yield person, passage, person_questions


def iter_people(num_people: int, seed: int = 0) -> Iterator[Person]:
  """Yields the `num_people` synthetic people of `seed` in index order.

  Raises:
    ValueError: `num_people` or `seed` negative or not an int.
  """
  for person, _, _ in _iter_records(num_people, seed, questions=False):
    yield person


def iter_bio_passages(num_people: int, seed: int = 0) -> Iterator[Passage]:
  """Yields the biographies of people 0..num_people-1 in order, in O(1) memory per person.

  `Passage(id=f"bio-{i:07d}", title=full_name, text=...)`; identical to `make_bios(...).passages`
  for the same `num_people` and `seed`.

  Raises:
    ValueError: `num_people` or `seed` negative or not an int.
  """
  for _, passage, _ in _iter_records(num_people, seed, questions=False):
    yield passage


def eval_person_mask(num_people: int, seed: int = 0, eval_fraction: float = 0.2) -> np.ndarray:
  """[N] bool: True for the `round(eval_fraction * N)` people held out for evaluation.

  Raises:
    ValueError: bad `num_people`, `seed` or `eval_fraction` (must be in [0, 1)).
  """
  _check_args(num_people, seed, eval_fraction)
  n_eval = int(round(eval_fraction * num_people))
  perm_n = np.random.default_rng([seed, 2]).permutation(num_people)  # [N]
  mask_n = np.zeros(num_people, dtype=bool)
  mask_n[perm_n[:n_eval]] = True
  return mask_n


def make_bios(num_people: int, seed: int = 0, eval_fraction: float = 0.2) -> SyntheticBios:
  """Builds `num_people` biographies and 5 questions per person, split by person.

  Args:
    num_people: corpus size N (one passage per person).
    seed: int >= 0; same arguments give identical output on any machine.
    eval_fraction: share of people whose questions go to `eval_questions` (rounded).

  Returns:
    `SyntheticBios` with N passages, 5 * (N - N_eval) train and 5 * N_eval eval questions, each
    question's single answer stated verbatim in its gold passage.

  Raises:
    ValueError: bad `num_people`, `seed` or `eval_fraction`.
  """
  mask_n = eval_person_mask(num_people, seed, eval_fraction)
  passages, train_q, eval_q = [], [], []
  # Millions of small acyclic objects: the cyclic GC would rescan them over and over (half the
  # run time at 100k people), so pause it while building.
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    for person, passage, questions in _iter_records(num_people, seed):
      passages.append(passage)
      (eval_q if mask_n[person.index] else train_q).extend(questions)
  finally:
    if gc_was_enabled:
      gc.enable()
  return SyntheticBios(passages=passages, train_questions=train_q, eval_questions=eval_q,
                       eval_person_mask=mask_n)


def question_json(q: Question) -> str:
  """One question as the JSON line `{"id", "question", "answers", "gold_passage_ids"}`."""
  return json.dumps({"id": q.id, "question": q.question, "answers": list(q.answers),
                     "gold_passage_ids": list(q.gold_passage_ids)}, ensure_ascii=False)


def write_bios(out_dir, num_people: int, seed: int = 0,
               eval_fraction: float = 0.2) -> dict[str, pathlib.Path]:
  """Streams `make_bios(num_people, seed, eval_fraction)` to JSON-lines files in `out_dir`.

  Writes `corpus.jsonl` ({id, title, text} per line), `train_questions.jsonl` and
  `eval_questions.jsonl` ({id, question, answers, gold_passage_ids} per line), UTF-8. Each file
  is written to a temporary file in `out_dir` and moved into place with `os.replace`, so a reader
  never sees a partial file (an interrupted run leaves the previous files, if any).

  Returns:
    {"corpus": path, "train_questions": path, "eval_questions": path}.

  Raises:
    ValueError: bad `num_people`, `seed` or `eval_fraction`.
    OSError: `out_dir` cannot be created or written.
  """
  mask_n = eval_person_mask(num_people, seed, eval_fraction)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"corpus": out / "corpus.jsonl", "train_questions": out / "train_questions.jsonl",
           "eval_questions": out / "eval_questions.jsonl"}
  tmp = {}
  try:
    for key, path in paths.items():
      fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out)
      tmp[key] = (tmp_name, os.fdopen(fd, "w", encoding="utf-8", newline="\n"))
    corpus_f, train_f, eval_f = (tmp[k][1] for k in paths)
    for person, passage, questions in _iter_records(num_people, seed):
      corpus_f.write(json.dumps({"id": passage.id, "title": passage.title, "text": passage.text},
                                ensure_ascii=False) + "\n")
      q_f = eval_f if mask_n[person.index] else train_f
      for q in questions:
        q_f.write(question_json(q) + "\n")
    for key, (tmp_name, f) in tmp.items():
      f.flush()
      os.fsync(f.fileno())
      f.close()
    for key, (tmp_name, _) in tmp.items():
      chmod_default(tmp_name)
      os.replace(tmp_name, paths[key])
  finally:
    for tmp_name, f in tmp.values():
      if not f.closed:
        f.close()
      if os.path.exists(tmp_name):
        os.unlink(tmp_name)
  return paths
