"""The generator's inputs: its tokenizer, the passage-part token tables of a corpus, and the
assembly of `[B, K, L]` contexts from retrieved rows (on the device or on the host).

  tables = passage_tables(passages, gen_tok, length)        # once per corpus
  ids_bkl, mask_bkl = assemble_contexts(tables.ids, tables.lengths, question_ids_bq,
                                        question_lengths_b, rows_bk, pad_id)

The generator reads `title / passage // question` (RAG §2.3, HF `RagRetriever.postprocess_docs`)
as `[bos] title / text` (the passage part, pre-tokenized once per corpus into a table) followed by
` // question [eos]` (per question); joining separately tokenized parts equals tokenizing the
joined string for WordPiece and byte-level BPE (both split at the space before ` //`). When the
whole does not fit in `context_max_length`, the passage part is truncated so that the question is
always read (HF truncates the joined string from the end, which can drop the question).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import jax.numpy as jnp
import numpy as np
import tokenizers

from ragjax.data.corpus import Passage
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.models.seq2seq import Seq2SeqConfig

TITLE_SEP, DOC_SEP = " / ", " // "  # HF RagConfig.title_sep / doc_sep


class GeneratorTokenizer:
  """The generator's tokenizer: a `tokenizers.Tokenizer` used without special tokens (they are
  placed explicitly from the `Seq2SeqConfig`: `bos` for BART-style inputs, `eos` last)."""

  def __init__(self, tokenizer, cfg: Seq2SeqConfig):
    self._tok = tokenizer
    self._tok.no_padding()
    self._tok.no_truncation()
    self.cfg = cfg
    # BART (and a BERT2BERT warm start) open inputs with <s>/[CLS]; T5 has no BOS.
    self.bos = cfg.bos_token_id if cfg.arch == "bart" else None
    self.eos, self.pad = cfg.eos_token_id, cfg.pad_token_id
    self.specials = {t for t in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id,
                                 cfg.decoder_start_token_id) if t is not None}

  @classmethod
  def from_dir(cls, path, cfg: Seq2SeqConfig) -> "GeneratorTokenizer":
    return cls(WordPieceTokenizer.from_dir(path)._tok
               if not (pathlib.Path(path) / "tokenizer.json").is_file()
               else tokenizers.Tokenizer.from_file(str(pathlib.Path(path) / "tokenizer.json")),
               cfg)

  def ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Text of generated ids `[T]`, special tokens and everything after the first EOS dropped."""
    out = []
    for i in np.asarray(ids).tolist()[1:]:  # [0] is the decoder start token
      if i == self.eos:
        break
      if i not in self.specials:
        out.append(int(i))
    return self._tok.decode(out, skip_special_tokens=True).strip()


@dataclasses.dataclass
class ContextTables:
  """The passage part of every generator input, tokenized once: `ids [N, L]` int32 (`[bos] title /
  text`, truncated to L - 1 tokens, padded) and `lengths [N]` int32."""
  ids: np.ndarray
  lengths: np.ndarray


def passage_text(title: str, text: str, title_sep: str = TITLE_SEP) -> str:
  """The passage part of a generator input, `title / text`, as HF `RagRetriever.postprocess_docs`
  formats it: one leading and one trailing `"` stripped from the title, then every double space
  replaced by one (a single `str.replace` pass)."""
  return (title.removeprefix('"').removesuffix('"') + title_sep + text).replace("  ", " ")


def passage_tables(passages: Sequence[Passage], tok: GeneratorTokenizer, length: int,
                   title_sep: str = TITLE_SEP) -> ContextTables:
  """`ContextTables` of `passages` (`passage_text` of each) for contexts of `length` tokens."""
  texts = [passage_text(p.title, p.text, title_sep) for p in passages]
  bos = [] if tok.bos is None else [tok.bos]
  return ContextTables(*pad_rows([(bos + row)[:length - 1] for row in tok.ids(texts)], length,
                                 tok.pad))


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token id lists (each at most `width` long) -> `(ids [N, width] int32, lengths [N] int32)`,
  right-padded with `pad_id`."""
  ids = np.full((len(rows), width), pad_id, np.int32)
  lengths = np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    lengths[i] = len(row)
  return ids, lengths


def assemble_contexts(table_ids_nl, table_lengths_n, question_ids_bq, question_lengths_b,
                      rows_bk, pad_id: int, xp=jnp):
  """Generator inputs `(ids [B, K, L], mask [B, K, L])` int32: passage part of corpus row
  `rows_bk[b, k]` followed by question part `b`, passage truncated so the question fits.

  `table_ids_nl` `[N, L]` / `table_lengths_n` `[N]` from `passage_tables`; `question_ids_bq`
  `[B, Q]` / `question_lengths_b` `[B]` (` // question [eos]`, Q <= L). `xp` is `jnp` (inside jit,
  on the device) or `np` (host-side retrieval); both give the same result.
  """
  return assemble_gathered(table_ids_nl[rows_bk], table_lengths_n[rows_bk], question_ids_bq,
                           question_lengths_b, pad_id, xp)


def assemble_gathered(passage_ids_bkl, passage_lengths_bk, question_ids_bq, question_lengths_b,
                      pad_id: int, xp=jnp):
  """`assemble_contexts` from the retrieved rows' table entries already gathered (`[B, K, L]`
  ids, `[B, K]` lengths; the sharded search gathers them on the shard that holds each row)."""
  p_bkl = passage_ids_bkl
  length = p_bkl.shape[2]
  q = question_ids_bq.shape[1]
  qlen_b11 = question_lengths_b[:, None, None]
  plen_bk1 = xp.minimum(passage_lengths_bk[..., None], length - qlen_b11)
  j_l = xp.arange(length)[None, None, :]
  qpos_bkl = xp.clip(j_l - plen_bk1, 0, q - 1)
  q_bkl = xp.take_along_axis(xp.broadcast_to(question_ids_bq[:, None, :],
                                             (*p_bkl.shape[:2], q)), qpos_bkl, axis=2)
  in_passage = j_l < plen_bk1
  in_question = (j_l >= plen_bk1) & (j_l < plen_bk1 + qlen_b11)
  ids = xp.where(in_passage, p_bkl, xp.where(in_question, q_bkl, pad_id))
  return ids.astype(xp.int32), (in_passage | in_question).astype(xp.int32)
