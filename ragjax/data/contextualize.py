"""Chunk contextualisation ("contextual retrieval", Anthropic 2024): each passage is prefixed
with context about its document before it is embedded and BM25-indexed.

Anthropic has an LLM write 50-100 tokens of context per chunk. With no LLM here the context
comes from the document itself or from the user:

  none            the passage as it is
  first_sentence  the first sentence of its document's first passage (the document of
                  `"<doc>-<i>"` is `<doc>`, as `corpus.split_document` and the SQuAD and
                  biographies corpora number passages), for every passage but that first one
  file            a JSON Lines file of `{"id": passage id, "context": str}` (e.g. written by an
                  LLM offline); a passage without a line is left as it is

The title is not repeated: the passage encoder reads `[CLS] title [SEP] text [SEP]` and BM25
indexes `title text` already. The context becomes part of the passage text everywhere (embedding,
BM25, and what the reader reads), as `f"{context} {text}"`.
"""
from __future__ import annotations

import re
from typing import Sequence

from ragjax.config_checks import CONTEXT_MODES  # none | first_sentence | file
from ragjax.data import corpus
from ragjax.data.corpus import ErrorPolicy, Passage
from ragjax.errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def document_id(passage_id: str) -> str:
  """`"<doc>"` of a passage id `"<doc>-<i>"` (i a number), else the id itself."""
  head, sep, tail = passage_id.rpartition("-")
  return head if sep and tail.isdigit() else passage_id


def first_sentence(text: str, max_words: int = 40) -> str:
  """The text up to its first sentence end (., ! or ? before a capital or digit), at most
  `max_words` words."""
  sentence = _SENTENCE_END.split(text.strip(), maxsplit=1)[0]
  return " ".join(sentence.split()[:max_words])


def read_contexts(path) -> dict[str, str]:
  """`{passage id: context}` of a context file. Raises: DataError naming file, line and field."""
  out = {}
  for line, obj in corpus.iter_json_lines(path, ErrorPolicy()):
    pid = corpus.get_id(obj, "id", path=path, line=line)
    ctx = obj.get("context")
    if not isinstance(ctx, str):
      raise DataError(f"expected a string, got {corpus.type_name(ctx)}", path=path, line=line,
                      field="context")
    if pid in out:
      raise DataError(f"passage id {pid!r} given twice", path=path, line=line, field="id")
    out[pid] = ctx.strip()
  return out


def contextualize(passages: Sequence[Passage], mode: str = "none", context_file=None
                  ) -> list[Passage]:
  """The passages with their context prefixed (module docstring). Raises: ValueError (unknown
  mode; `file` without `context_file`), DataError (a bad context file, or one naming ids that
  are not in the corpus)."""
  if mode not in CONTEXT_MODES:
    raise ValueError(f"context mode {mode!r}: expected one of {CONTEXT_MODES}")
  if mode == "none":
    return list(passages)
  if mode == "file":
    if context_file is None:
      raise ValueError("context mode 'file' needs a context file")
    contexts = read_contexts(context_file)
    unknown = sorted(set(contexts) - {p.id for p in passages})
    if unknown:
      raise DataError(f"{len(unknown)} ids not in the corpus, e.g. {unknown[:3]}; expected the "
                      "corpus's passage ids", path=context_file)
  else:
    firsts: dict[str, tuple[str, str]] = {}
    for p in passages:
      firsts.setdefault(document_id(p.id), (p.id, first_sentence(p.text)))
    contexts = {p.id: firsts[document_id(p.id)][1] for p in passages
                if firsts[document_id(p.id)][0] != p.id}
  return [Passage(p.id, p.title, f"{contexts[p.id]} {p.text}") if contexts.get(p.id) else p
          for p in passages]
