"""Test-side helpers for the RAG parity tests: build a RagModel from separately loaded HF towers
and tokenize generator inputs the way HuggingFace's `RagRetriever.postprocess_docs` does.

`context_strings` / `build_context_inputs` are an independent reference of the generator-input
format: the library assembles the same inputs from pre-tokenized parts
(`ragjax.system.inputs.assemble_contexts`), and tests compare the two.
"""
from __future__ import annotations

import pathlib
from typing import Any, Protocol, Sequence

import numpy as np

from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.models.hf_import import load_bert_dir
from ragjax.models.rag import RagModel
from ragjax.models.seq2seq_import import load_seq2seq_dir
from ragjax.system.inputs import DOC_SEP, TITLE_SEP


def assemble_params(query_params, generator_params, passage_params=None) -> dict:
  """RAG params from separately loaded towers (e.g. `load_bert_dir` / `load_seq2seq_dir`).
  `passage_params=None` leaves the passage tower out: only valid with `shared_encoders=True`,
  or when the passage encoder is never applied (doc scores from precomputed embeddings)."""
  towers = {"query_encoder": query_params}
  if passage_params is not None:
    towers["passage_encoder"] = passage_params
  return {"bi_encoder": towers, "generator": generator_params}


def load_rag(question_encoder_dir, generator_dir, passage_encoder_dir=None,
             **generator_overrides) -> tuple[RagModel, dict]:
  """`(RagModel, params)` from HF checkpoint directories: a DPR/BERT question encoder (pooled
  [CLS], as HF RAG uses `pooler_output`), a BART/T5 generator, optionally a passage encoder.

  Raises: WeightImportError (from the importers) on missing or mis-shaped tensors.
  """
  q_cfg, q_params = load_bert_dir(pathlib.Path(question_encoder_dir), pooling="cls",
                                  normalize=False)
  g_cfg, g_params = load_seq2seq_dir(pathlib.Path(generator_dir), **generator_overrides)
  p_cfg, p_params = None, None
  if passage_encoder_dir is not None:
    p_cfg, p_params = load_bert_dir(pathlib.Path(passage_encoder_dir), pooling="cls",
                                    normalize=False)
  model = RagModel(q_cfg, g_cfg, passage_cfg=p_cfg)
  return model, assemble_params(q_params, g_params, p_params)


class TextTokenizer(Protocol):
  """What `build_context_inputs` needs: a `tokenizers.Tokenizer`-like `encode_batch(texts)`
  whose results have `.ids` (special tokens added, no padding or truncation). A
  `ragjax.data.tokenize.WordPieceTokenizer` is accepted as well."""

  def encode_batch(self, texts: list[str]) -> Sequence[Any]: ...


def context_strings(titles_bk: Sequence[Sequence[str]], texts_bk: Sequence[Sequence[str]],
                    questions_b: Sequence[str], *, prefix: str | None = None,
                    title_sep: str = TITLE_SEP, doc_sep: str = DOC_SEP) -> list[list[str]]:
  """The generator's input text per (example, passage): `prefix + title / text // question`,
  exactly HF `RagRetriever.postprocess_docs`: one leading and one trailing `"` stripped from the
  title, then every double space replaced by one (Python `str.replace`, a single pass).

  Raises: ValueError when the three inputs disagree in B, or titles and texts in K.
  """
  if not len(titles_bk) == len(texts_bk) == len(questions_b):
    raise ValueError(f"{len(titles_bk)} title rows, {len(texts_bk)} text rows and "
                     f"{len(questions_b)} questions: expected one row per question")
  out = []
  for b, (titles_k, texts_k, question) in enumerate(zip(titles_bk, texts_bk, questions_b)):
    if len(titles_k) != len(texts_k):
      raise ValueError(f"example {b}: {len(titles_k)} titles but {len(texts_k)} passages")
    out.append([((prefix or "") + title.removeprefix('"').removesuffix('"') + title_sep + text
                 + doc_sep + question).replace("  ", " ")
                for title, text in zip(titles_k, texts_k)])
  return out


def build_context_inputs(titles_bk: Sequence[Sequence[str]], texts_bk: Sequence[Sequence[str]],
                         questions_b: Sequence[str], tokenizer: TextTokenizer | WordPieceTokenizer,
                         max_length: int, *, pad_id: int | None = None, prefix: str | None = None,
                         title_sep: str = TITLE_SEP, doc_sep: str = DOC_SEP
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenized generator inputs `(ids [B, K, max_length] int32, mask [B, K, max_length] int32)`
  of `context_strings(...)` with the GENERATOR's tokenizer, on the host (static shapes).

  Truncation keeps the first `max_length - 1` tokens and the last one (the closing special token,
  `</s>` / `[SEP]`), which is what HF's `truncation=True, padding="max_length"` gives for a
  single sequence with one trailing special token; then right-padding with `pad_id` (default:
  the tokenizer's `pad_id` attribute, or its `<pad>`/`[PAD]` token) and mask 0.

  Raises:
    ValueError: ragged K, max_length < 2, no pad id, or a `tokenizers.Tokenizer` with padding or
      truncation switched on (call `no_padding()` / `no_truncation()` on a copy first).
  """
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  strings = context_strings(titles_bk, texts_bk, questions_b, prefix=prefix,
                            title_sep=title_sep, doc_sep=doc_sep)
  b = len(strings)
  k = len(strings[0]) if b else 0
  if any(len(row) != k for row in strings):
    raise ValueError(f"every example needs the same number of passages K; got "
                     f"{[len(row) for row in strings]}")
  flat = [s for row in strings for s in row]
  if isinstance(tokenizer, WordPieceTokenizer):  # same truncation rule, its own pad id
    batch = tokenizer.encode(flat, max_length=max_length, length=max_length)
    return (batch.input_ids.reshape(b, k, max_length),
            batch.attention_mask.reshape(b, k, max_length))
  if getattr(tokenizer, "padding", None) or getattr(tokenizer, "truncation", None):
    raise ValueError("build_context_inputs: the tokenizer has padding or truncation enabled; "
                     "pass a copy with no_padding() and no_truncation() (shapes are set here)")
  if pad_id is None:
    pad_id = getattr(tokenizer, "pad_id", None)
    for token in ("<pad>", "[PAD]"):
      if pad_id is None and hasattr(tokenizer, "token_to_id"):
        pad_id = tokenizer.token_to_id(token)
  if pad_id is None:
    raise ValueError("build_context_inputs: no pad id; pass pad_id= (the generator's)")
  ids = np.full((b * k, max_length), pad_id, np.int32)
  mask = np.zeros((b * k, max_length), np.int32)
  for i, enc in enumerate(tokenizer.encode_batch(flat)):
    row = list(enc.ids)
    if len(row) > max_length:
      row = row[:max_length - 1] + row[-1:]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids.reshape(b, k, max_length), mask.reshape(b, k, max_length)


# ---------------------------------------------------------------------------------- retrieval
