"""The data a run trains and evaluates on, from `cfg.data`: passages and question splits."""
from __future__ import annotations

from ragjax.config import DATA_SOURCES
from ragjax.data.contextualize import contextualize
from ragjax.data.corpus import Passage, read_passages
from ragjax.data.qa import Question, read_questions
from ragjax.data.splits import squad_article_split
from ragjax.data.synthetic import make_bios
from ragjax.data.synthetic_docs import make_bio_documents
from ragjax.errors import DataError


def load_data(cfg) -> tuple[list[Passage], list[Question], list[Question]]:
  """`(passages, train questions, eval questions)` of `cfg.data.source`:
  "bios" (built-in synthetic biographies; `data.bios_layout` "single": one passage per person,
  "documents": profile and news documents, `ragjax.data.synthetic_docs`), "files" (corpus +
  question files), or
  "squad_split" (SQuAD v1.1 dev split by article, `ragjax.data.splits`). (Joint
  pretraining replaces the training questions in `ragjax.system.build`.)

  The config's sources are checked by `ragjax.config.validate` (paths exist, known source).
  Raises: DataError for bad records (file and line) or no training questions.
  """
  d = cfg.data
  if d.source == "bios":
    layout = d.get("bios_layout", "single")
    if layout == "documents":  # multi-passage documents: a frozen retriever is weak there
      try:
        bios = make_bio_documents(int(d.num_people), seed=int(d.bios_seed),
                                  eval_fraction=float(d.eval_fraction),
                                  **dict(d.get("bios_docs", {})))
      except ValueError as e:
        raise DataError(str(e), path="config", field="data.bios_docs") from e
    elif layout == "single":
      bios = make_bios(int(d.num_people), seed=int(d.bios_seed),
                       eval_fraction=float(d.eval_fraction))
    else:
      raise DataError("expected 'single' or 'documents'", path=str(layout),
                      field="data.bios_layout")
    passages, train, evals = bios.passages, bios.train_questions, bios.eval_questions
  elif d.source == "files":
    passages = read_passages(d.corpus)
    train, evals = read_questions(d.train_questions), read_questions(d.eval_questions)
  elif d.source == "squad_split":
    passages, train, evals = squad_article_split(d.squad, int(d.num_eval_articles),
                                                 seed=int(d.split_seed))
  else:  # `ragjax.config.validate` names the key; this keeps a direct call honest
    raise DataError(f"expected one of {DATA_SOURCES}", path=d.source, field="data.source")
  passages = contextualize(passages, d.get("passage_context", "none"),
                           d.get("passage_context_file") or None)
  if d.max_train_questions:
    train = train[:int(d.max_train_questions)]
  if d.max_eval_questions:
    evals = evals[:int(d.max_eval_questions)]
  if not train:
    raise DataError("no training questions", path=str(d.get("train_questions") or d.source),
                    field="data")
  return passages, train, evals
