"""What every task of the evaluation suite shares: `Scorer`, `Example`, `Task` and helpers.

A task reads its own file format into `Example`s and scores them through a `Scorer`: anything
that answers, retrieves and scores answer log-likelihoods the way `ragjax.serving.engine.Engine`
does (a bundle or workdir loaded in this process, or a running `ragjax serve` over HTTP;
`ragjax.serving.suite`). Every task returns `(metrics, records)`: a JSON-able metrics dict and one
record per example `{"id", "question", "prediction", "gold", "passages", "score"}`.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Protocol, Sequence

from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.errors import UsageError

SHARED_DATA_ENV = "RAGJAX_SHARED_DATA"


class Scorer(Protocol):
  """What a task needs of a RAG system (`ragjax.serving.engine.Engine`'s requests).

  Attributes: `max_batch` (questions per `answer` / `retrieve` call), `max_retrieve_k` (0 for a
  closed-book system), `max_answers` (answers per `score` call), `reader_k` (passages the reader
  reads, the first of those `answer` returns)."""
  max_batch: int
  max_retrieve_k: int
  max_answers: int
  reader_k: int

  def answer(self, questions: list[str]) -> list[dict]:
    """`[{"answer": str, "passages": [{"id", "title", "text", "score"}, ...]}]`, one per question."""

  def retrieve(self, questions: list[str], k: int) -> list[list[dict]]:
    """The top `k` passages per question, best first."""

  def score(self, question: str, answers: list[str]) -> list[float]:
    """log p(answer | question) in nats per answer (the RAG marginal, or FiD's likelihood)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One evaluation item: `question` (text, reference answers, regex flag), `choice_sets`
  (multiple-choice tasks: `(name, choices, labels)` with label 1 for a true choice, e.g.
  TruthfulQA's "mc1" and "mc2"), `tags` (the task's breakdown keys, e.g. FreshQA's fact type) and
  `evidence` (`(doc_name, page)` pairs of FinanceBench)."""
  question: Question
  choice_sets: tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...] = ()
  tags: tuple[tuple[str, str], ...] = ()
  evidence: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Task:
  """A benchmark: `load(path) -> [Example]` (DataError naming file and line on a bad record;
  `skip_invalid` skips and counts into `stats`), `run(scorer, examples, recall_ks) -> (metrics,
  records)`, `default_data` (its file under the shared data folder, or None: `--data` needed),
  `needs_logits` (scores answers rather than decoding them), and `corpus(path)` (a task that
  brings its own passages, e.g. FinanceBench's evidence pages; None: the system's corpus)."""
  name: str
  load: Callable[..., list[Example]]
  run: Callable[..., tuple[dict, list[dict]]]
  default_data: str | None
  needs_logits: bool = False
  corpus: Callable[[pathlib.Path], list[Passage]] | None = None
  description: str = ""

  def data_path(self, data=None) -> pathlib.Path:
    """`data` if given, else the task's copy in the shared data folder (`$RAGJAX_SHARED_DATA`,
    else `../shared/data` from the working directory). Raises: UsageError when neither exists."""
    if data is not None:
      path = pathlib.Path(data)
      if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
      return path
    if self.default_data is None:
      raise UsageError(f"--task {self.name}: its data is not shared here; pass --data FILE "
                       f"({self.description})")
    path = shared_data_dir() / self.default_data
    if not path.is_file():
      raise UsageError(f"--task {self.name}: {path} not found; pass --data FILE or set "
                       f"{SHARED_DATA_ENV}")
    return path


def shared_data_dir() -> pathlib.Path:
  """The shared evaluation data folder: `$RAGJAX_SHARED_DATA`, else `../shared/data`."""
  return pathlib.Path(os.environ.get(SHARED_DATA_ENV, "../shared/data"))


def batches(items: Sequence, size: int):
  """Consecutive slices of at most `size` items."""
  for start in range(0, len(items), size):
    yield items[start:start + size]


def read_passages(scorer: Scorer, examples: Sequence[Example]) -> list[list[str]]:
  """The ids of the passages the reader reads for each question (none when closed-book)."""
  k = min(scorer.reader_k, scorer.max_retrieve_k)
  return [[p["id"] for p in r] for r in retrieve_all(scorer, examples, k)]


def retrieval_depth(scorer: Scorer, recall_ks: Sequence[int]) -> int:
  """How deep to search for recall@k over `recall_ks`: the largest k, capped at the system's
  deepest search (0 for a closed-book system)."""
  return min(max(recall_ks, default=0), scorer.max_retrieve_k)


def retrieve_all(scorer: Scorer, examples: Sequence[Example], k: int) -> list[list[dict]]:
  """The top `k` passages of every example's question, best first, in `scorer.max_batch`
  chunks (an empty list per example when `k` is 0)."""
  if not k:
    return [[] for _ in examples]
  texts = [e.question.question for e in examples]
  return [r for chunk in batches(texts, scorer.max_batch) for r in scorer.retrieve(list(chunk), k)]
