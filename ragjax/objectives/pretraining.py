"""Joint-pretraining tasks on unlabelled text: each passage of any corpus becomes a (query,
target) example whose retrieval must not return the passage itself.

- "salient_span" (REALM, Guu et al. 2020 §3.4 "Salient span masking"): one salient span per
  example (a date, a number or a name) is replaced by the mask token; the query is the masked
  passage, the target the span. REALM finds spans with a BERT tagger trained on CoNLL-2003 plus
  a date regex; here a documented rule tagger (`salient_spans`) runs at data-build time:
    dates    "12 March 1987", "March 12, 1987", "March 1987", a year 1000-2099
    numbers  digits with thousands separators or a decimal part ("3,370", "4.5", "17")
    names    a run of >= 2 capitalised words (joined by "of", "de", "van", ...), or 1 not at
             the start of a sentence ("Ximena Costa", "University of Tokyo", "Lyon"); month
             names and a sentence's first word alone are not names.
  `query="title_sentence"` makes the query the passage's title and the sentence holding the mask
  ("Ximena Costa: news: She studied at [MASK]."), so that a short query encoder window
  (`model.query_max_length`) still sees the mask and who the passage is about; a span whose text
  shares a capitalised word or a number with the title's words is then never masked (the title
  would give it away); sentences end at . ! ? before a capital, except after an initial or a
  common abbreviation ("U.S.", "Dr."). Salient-span pretraining needs redundancy: a fact
  stated only in the query's own (excluded) passage can be retrieved from nowhere, and its
  target then carries no signal for the retriever (`bench/pretrain_probe.py` measures both for a corpus).
- "prefix_lm" (Atlas, Izacard et al. 2022 §2.3 "Prefix language modeling"): the passage split
  at a word boundary near the middle; the query is the prefix, the target the next words.
- "span_corruption" (T5, Raffel et al. 2020 §3.1.4; Atlas §2.3 "Masked language modeling"):
  words sampled as spans (noise density 0.15, mean span length 3) are replaced by sentinels
  `sentinel.format(i)`; the target is each sentinel followed by its span. Words stand in for
  tokens, so the rate is over whitespace words.

Every example carries `exclude_passage_ids`: its own passage, or with `exclude="document"` every
passage of its document (same title), which the feeder drops from the retrieved rows inside the
step (`ragjax.retrieval.topk.exclude_rows`, with over-retrieval so K rows remain).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

import numpy as np

from ragjax.config import PRETRAIN_EXCLUDE as EXCLUDE
from ragjax.config import PRETRAIN_OBJECTIVES
from ragjax.config import PRETRAIN_QUERIES as QUERIES
from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.errors import DataError

_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|"
           "December")
_DATE = re.compile(rf"\b(?:\d{{1,2}} (?:{_MONTHS}) \d{{4}}|(?:{_MONTHS}) \d{{1,2}}, \d{{4}}|"
                   rf"(?:{_MONTHS}) \d{{4}}|(?:1\d{{3}}|20\d{{2}}))\b")
_NUMBER = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w,]*\d)|(?<![\w.,])\d+(?:\.\d+)?"
                     r"(?![\w]|[.,]\d)")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:[ -](?:(?:of|de|da|van|von|del|le|la) )?[A-Z][a-z]+)*\b")
_MONTH_WORD = re.compile(rf"^(?:{_MONTHS})$")


def salient_spans(text: str) -> list[tuple[int, int, str]]:
  """The salient spans of `text` as `(start, end, kind)` character offsets, non-overlapping,
  in order; kind is "date", "number" or "name" (rules in the module docstring). Dates win over
  the numbers inside them."""
  taken = np.zeros(len(text) + 1, bool)
  out = []

  def add(m, kind):
    a, b = m.span()
    if not taken[a:b].any():
      taken[a:b] = True
      out.append((a, b, kind))

  for m in _DATE.finditer(text):
    add(m, "date")
  for m in _NUMBER.finditer(text):
    add(m, "number")
  for m in _NAME.finditer(text):
    a, b = m.span()
    words = m.group().split()
    if all(_MONTH_WORD.match(w) for w in words):
      continue
    before = text[:a].rstrip()
    sentence_start = not before or before[-1] in ".!?:;\"("
    if len(words) == 1 and sentence_start:
      continue  # a capital that may only mark the start of a sentence
    add(m, "name")
  return sorted(out)


# A sentence ends at . ! ? before white space and a capital, a digit or an opening quote,
# unless the period closes an initial or a common abbreviation ("U.S. Army", "Dr. Lee").
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\u201c])")
_ABBREVIATION = re.compile(r"(?:\b[A-Z]|\b(?:[A-Z]\.)+[A-Z]|\b(?:Dr|Mr|Mrs|Ms|Prof|St|Mt|Jr|Sr|"
                           r"Gen|Col|Lt|Sgt|Rev|No|vs|etc|e\.g|i\.e|Inc|Ltd|Co|Corp))\.$")


def _sentence_bounds(text: str) -> list[tuple[int, int]]:
  """`[(start, end)]` character offsets of `text`'s sentences (rule above), in order."""
  out, start = [], 0
  for m in _SENTENCE_END.finditer(text):
    if not _ABBREVIATION.search(text[start:m.start()]):
      out.append((start, m.start()))
      start = m.end()
  return out + [(start, len(text))]


def _in_title(span: str, title_words: set[str]) -> bool:
  """Whether a capitalised word or a number of `span` is a word of the title (it would give the
  span away: "Costa" in "Ximena Costa - profile", the year of "12 March 1961" in "X (born
  1961) - profile"; "Costa" is not in "Ximena Acosta")."""
  return any(w.lower() in title_words for w in re.findall(r"\w+", span)
             if w[0].isupper() or w.isdigit())


def _salient(p: Passage, rng, mask_token, query):
  spans = salient_spans(p.text)
  if query == "title_sentence":  # "Super_Bowl_50" has the words "super", "bowl", "50"
    title_words = set(re.findall(r"[^\W_]+", p.title.lower()))
    spans = [s for s in spans if not _in_title(p.text[s[0]:s[1]], title_words)]
  if not spans:
    return None
  a, b, _ = spans[rng.randint(len(spans))]
  if query == "passage":
    return p.text[:a] + mask_token + p.text[b:], p.text[a:b]
  lo, hi = next((s, e) for s, e in _sentence_bounds(p.text) if s <= a < e)
  sentence = p.text[lo:a] + mask_token + p.text[b:hi]
  return (f"{p.title}: {sentence}" if p.title else sentence), p.text[a:b]


def _prefix(p: Passage, rng, max_target_words):
  words = p.text.split()
  if len(words) < 4:
    return None
  cut = int(rng.randint(len(words) // 3, 2 * len(words) // 3 + 1))
  return " ".join(words[:cut]), " ".join(words[cut:cut + max_target_words])


def _corrupt(p: Passage, rng, sentinel, density, mean_span):
  """T5's random spans over words: ~density * n noise words in ~n * density / mean_span spans."""
  words = p.text.split()
  n = len(words)
  num_noise = max(1, int(round(n * density)))
  num_spans = max(1, int(round(num_noise / mean_span)))
  if n < 2 or num_noise >= n:
    return None
  num_spans = min(num_spans, num_noise, n - num_noise)
  cut = lambda total, parts: np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, total), parts - 1,
                                                                 replace=False)), total])
  noise, keep = cut(num_noise, num_spans), cut(n - num_noise, num_spans)
  query, target, i = [], [], 0
  for s, (k_len, n_len) in enumerate(zip(keep, noise)):
    query += words[i:i + k_len] + [sentinel.format(s)]
    i += k_len
    target += [sentinel.format(s)] + words[i:i + n_len]
    i += n_len
  return " ".join(query + words[i:]), " ".join(target)


def pretraining_examples(passages: Sequence[Passage], objective: str, *, seed: int = 0,
                         exclude: str = "passage", mask_token: str = "[MASK]",
                         sentinel: str = "<extra_id_{}>", noise_density: float = 0.15,
                         mean_span_length: float = 3.0, max_target_words: int = 8,
                         query: str = "passage", where: str = "corpus") -> list[Question]:
  """One pretraining `Question` per passage that yields one (module docstring): `question` is
  the query text, `answers` its one target, `exclude_passage_ids` the passage (or document)
  it came from. `query` ("passage" | "title_sentence") shapes a salient-span query (module
  docstring). Deterministic in `seed`.

  Raises: DataError (naming `where`, the corpus) for an unknown objective, exclude mode or query
  form, or a corpus with no example (e.g. no salient span in any passage).
  """
  if objective not in PRETRAIN_OBJECTIVES:
    raise DataError(f"expected one of {PRETRAIN_OBJECTIVES}", path=objective,
                    field="data.pretrain.objective")
  if exclude not in EXCLUDE:
    raise DataError(f"expected one of {EXCLUDE}", path=exclude, field="data.pretrain.exclude")
  if query not in QUERIES:
    raise DataError(f"expected one of {QUERIES}", path=query, field="data.pretrain.query")
  doc_ids = defaultdict(list)
  for p in passages:
    doc_ids[p.title].append(p.id)
  rng = np.random.RandomState(seed)
  out = []
  for p in passages:
    if objective == "salient_span":
      got = _salient(p, rng, mask_token, query)
    elif objective == "prefix_lm":
      got = _prefix(p, rng, max_target_words)
    else:
      got = _corrupt(p, rng, sentinel, noise_density, mean_span_length)
    if got is None:
      continue
    own = tuple(doc_ids[p.title]) if exclude == "document" and p.title else (p.id,)
    out.append(Question(id=f"pretrain-{objective}-{p.id}", question=got[0], answers=(got[1],),
                        exclude_passage_ids=own))
  if not out:
    what = "no salient span (date, number or name)" if objective == "salient_span" else \
        "no passage long enough"
    raise DataError(f"{objective}: {what} in any of its {len(passages)} passages", path=where,
                    field="data.pretrain.objective")
  return out


def pretraining_examples_from_config(passages: Sequence[Passage], pretrain,
                                     where: str = "corpus") -> list[Question]:
  """`pretraining_examples` with the options of a run's `data.pretrain` config block
  (`ragjax.config`: objective, seed, exclude, mask_token, sentinel, noise_density,
  mean_span_length, max_target_words, query). Raises: as `pretraining_examples`."""
  return pretraining_examples(
      passages, pretrain.objective, seed=int(pretrain.seed), exclude=pretrain.exclude,
      mask_token=pretrain.mask_token, sentinel=pretrain.sentinel,
      noise_density=float(pretrain.noise_density),
      mean_span_length=float(pretrain.mean_span_length),
      max_target_words=int(pretrain.max_target_words),
      query=pretrain.get("query", "passage"), where=where)
