"""Biographies needle-in-a-haystack corpora (Contextual AI's RAG 2.0 post; Kamradt's NIAH).

A haystack of S tokens is a corpus of non-repeated synthetic biographies (`ragjax.data.synthetic`)
whose passages hold at most S tokens in all: the `num_needles` needle people, the first held-out
people of the `(num_people, seed, eval_fraction)` world a run trained on (never asked about in
training), plus filler people `num_people, num_people + 1, ...` of the same seed, whom no run on
that world has seen at all (names are unique over any corpus of one seed). Every size holds the
same needles and the same questions (all five per needle), and a larger haystack's fillers extend
a smaller one's, so EM against S isolates what the hay does. Needles sit at seeded positions.

Tokens are counted with the MiniLM WordPiece tokenizer the built-in models read with (title and
text, no special tokens): `tokens(S) <= S`, and `S - tokens(S)` is under one biography.

  paths = write_haystacks("runs/haystack", minilm_dir() / "tokenizer.json", (2_000, 8_000))
  # needle_questions.jsonl: {id, question, answers} (5 per needle person, identical at every S)
  # haystack_2000.jsonl, ...: {id, title, text} per passage;  manifest.json: tokens, passages
"""
from __future__ import annotations

import itertools
import pathlib
from typing import Sequence

import numpy as np

from ragjax.data.corpus import Passage, write_passages_jsonl
from ragjax.data.synthetic import eval_person_mask, iter_bio_passages, make_bios, question_json
from ragjax.errors import UsageError
from ragjax.fsutil import atomic_file, write_json_atomic

HAYSTACK_TOKENS = (2_000, 8_000, 32_000, 128_000, 512_000, 2_000_000)
DEFAULT_NEEDLES = 20  # 100 questions; their biographies take ~1,200 of the 2K haystack's tokens


def _token_counts(tok, passages: Sequence[Passage]) -> np.ndarray:
  """[N] int: tokens of each passage's title and text (no special tokens) under `tok`."""
  enc = tok.encode_batch([f"{p.title} {p.text}" for p in passages], add_special_tokens=False)
  return np.array([len(e.ids) for e in enc], dtype=np.int64)


def load_tokenizer(tokenizer_file):
  """A `tokenizers.Tokenizer` from `tokenizer.json`, without truncation or padding (a count of
  real tokens). The built-in one: `ragjax.models.hf_import.minilm_dir() / "tokenizer.json"`."""
  import tokenizers
  tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
  tok.no_truncation()
  tok.no_padding()
  return tok


def write_questions_jsonl(questions, path) -> None:
  """Questions as JSON Lines `{"id", "question", "answers", "gold_passage_ids"}`, atomically."""
  with atomic_file(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
      for q in questions:
        f.write(question_json(q) + "\n")


def build_haystacks(tokenizer_file, sizes: Sequence[int] = HAYSTACK_TOKENS, *,
                    num_people: int = 2000, seed: int = 0, eval_fraction: float = 0.2,
                    num_needles: int = DEFAULT_NEEDLES, chunk: int = 4096):
  """`(needle_questions, {S: [Passage]}, stats)` for the haystack sizes `sizes`, in tokens of
  `tokenizer_file` (a `tokenizer.json`; the built-in models' MiniLM one in `ragjax
  make-haystack`).

  `stats[S]` = `{"tokens", "passages", "fillers"}`. Raises: UsageError (sizes not increasing
  positive ints, too few held-out people, needles that do not fit the smallest size)."""
  sizes = [int(s) for s in sizes]
  if not sizes or any(s <= 0 for s in sizes) or sorted(set(sizes)) != sizes:
    raise UsageError(f"--sizes {sizes}: expected increasing positive token counts")
  world = make_bios(num_people, seed, eval_fraction)
  held_out = np.flatnonzero(eval_person_mask(num_people, seed, eval_fraction))
  if len(held_out) < num_needles:
    raise UsageError(f"--num-needles {num_needles}: the world has only {len(held_out)} held-out "
                     f"people ({num_people} people, eval fraction {eval_fraction})")
  needle_ids = held_out[:num_needles]
  needles = [world.passages[i] for i in needle_ids]
  keep = {p.id for p in needles}
  questions = [q for q in world.eval_questions
               if q.gold_passage_ids and q.gold_passage_ids[0] in keep]
  tok = load_tokenizer(tokenizer_file)
  needle_tokens = int(_token_counts(tok, needles).sum())
  if needle_tokens > sizes[0]:
    raise UsageError(f"--sizes {sizes[0]}: the {num_needles} needles alone take {needle_tokens} "
                     "tokens; give a larger smallest size or fewer --num-needles")
  # Fillers: people num_people.. of the same seed, counted chunk by chunk until the largest fits.
  fillers, filler_tokens, total = [], [], needle_tokens
  stream = itertools.islice(iter_bio_passages(10 ** 9, seed), num_people, None)
  while total <= sizes[-1]:
    batch = list(itertools.islice(stream, chunk))
    counts = _token_counts(tok, batch)
    fillers.extend(batch)
    filler_tokens.extend(counts.tolist())
    total += int(counts.sum())
  cum = needle_tokens + np.cumsum(np.asarray(filler_tokens, np.int64))  # [F]
  rng = np.random.default_rng([seed, 4, num_people])
  corpora, stats = {}, {}
  for s in sizes:
    m = int(np.searchsorted(cum, s, side="right"))  # fillers whose running total stays <= s
    hay = list(fillers[:m])
    slots = np.sort(rng.choice(m + num_needles, size=num_needles, replace=False))
    for needle, slot in zip(needles, slots):
      hay.insert(int(slot), needle)
    corpora[s] = hay
    stats[s] = {"tokens": int(cum[m - 1]) if m else needle_tokens, "passages": len(hay),
                "fillers": m}
  return questions, corpora, stats


def write_haystacks(out, tokenizer_file, sizes: Sequence[int] = HAYSTACK_TOKENS, **kwargs
                    ) -> dict[str, str]:
  """Write `build_haystacks(tokenizer_file, sizes, **kwargs)` under `out` (module docstring);
  returns the paths. Raises: as `build_haystacks`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  questions, corpora, stats = build_haystacks(tokenizer_file, sizes, **kwargs)
  paths = {"needle_questions": str(out / "needle_questions.jsonl")}
  write_questions_jsonl(questions, out / "needle_questions.jsonl")
  for s, passages in corpora.items():
    paths[f"haystack_{s}"] = str(out / f"haystack_{s}.jsonl")
    write_passages_jsonl(passages, out / f"haystack_{s}.jsonl")
  write_json_atomic(out / "manifest.json", {
      "sizes": {str(s): v for s, v in stats.items()}, "num_questions": len(questions),
      "tokenizer": str(tokenizer_file), "counted": "title + text, no special tokens",
      **{k: v for k, v in kwargs.items() if k != "chunk"}})
  paths["manifest"] = str(out / "manifest.json")
  return paths
