"""WordPiece tokenization through HuggingFace `tokenizers`, padded to static length buckets.

Jitted encoders compile once per distinct input shape, so every batch is padded to the smallest
bucket in `buckets` that holds its longest sequence (at most `len(buckets)` compiles per batch
size). Padding and truncation of the underlying tokenizer are switched off when it is loaded
(all-MiniLM-L6-v2's `tokenizer.json` ships with fixed padding and truncation at 128) and done
here, explicitly.

Passages are encoded DPR-style as the single sequence `[CLS] title [SEP] text [SEP]` with all
token types 0 (Karpukhin et al. 2020, sec. 3: "we use the title as well ... [SEP] token").
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import numpy as np
import tokenizers

from ragjax.errors import NotFoundError

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class TokenBatch:
  """A padded batch: `input_ids`, `attention_mask`, `token_type_ids`, each `[B, L]` int32."""
  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray

  @property
  def shape(self):
    return self.input_ids.shape

  def as_tuple(self):
    return self.input_ids, self.attention_mask, self.token_type_ids


def bucket_length(n: int, buckets: Sequence[int], max_length: int) -> int:
  """The smallest bucket >= n, capped at `max_length` (which is always a valid length)."""
  for b in sorted(buckets):
    if b >= n and b <= max_length:
      return b
  return max_length


MAX_CHARS_PER_TOKEN = 100  # BERT's WordPiece reads words of at most 100 characters as one token


class WordPieceTokenizer:
  """A BERT WordPiece tokenizer with explicit truncation and bucketed padding.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (padding/truncation are disabled here).
    max_length: longest sequence, special tokens included; longer inputs are truncated.
    buckets: allowed padded lengths (values above `max_length` are ignored).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int = 256,
               buckets: Sequence[int] = DEFAULT_BUCKETS):
    self._tok = tokenizer
    self._tok.no_padding()
    self._tok.no_truncation()
    self.max_length = int(max_length)
    self.buckets = tuple(sorted(b for b in buckets if b <= self.max_length)) + (self.max_length,)
    self.pad_id = self._token_id("[PAD]")
    self.sep_token = "[SEP]"

  @classmethod
  def from_dir(cls, path, max_length: int = 256, buckets: Sequence[int] = DEFAULT_BUCKETS):
    """Load from a checkpoint directory holding `tokenizer.json` or `vocab.txt`.

    With only `vocab.txt`, lower-casing follows `tokenizer_config.json`'s `do_lower_case`
    (default True, as in BERT-uncased).

    Raises:
      NotFoundError (a FileNotFoundError): neither file exists in `path`.
    """
    path = pathlib.Path(path)
    if (path / "tokenizer.json").is_file():
      tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").is_file():
      lower = True
      cfg_file = path / "tokenizer_config.json"
      if cfg_file.is_file():
        lower = bool(json.loads(cfg_file.read_text()).get("do_lower_case", True))
      tok = tokenizers.BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lower)
      tok = tok._tokenizer  # the underlying tokenizers.Tokenizer
    else:
      raise NotFoundError(f"{path}: no tokenizer.json or vocab.txt to build a WordPiece "
                              "tokenizer from")
    return cls(tok, max_length=max_length, buckets=buckets)

  def _token_id(self, token: str) -> int:
    tid = self._tok.token_to_id(token)
    if tid is None:
      raise ValueError(f"tokenizer has no {token!r} token")
    return tid

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def tokenize(self, texts: Sequence[str], max_length: int | None = None,
               stats: dict | None = None) -> list[list[int]]:
    """Token ids per text, special tokens included, truncated to `max_length` keeping the first
    `max_length - 1` tokens and the final `[SEP]`.

    A text is cut to `max_length * MAX_CHARS_PER_TOKEN` characters before it is tokenized, so a
    single record's memory is bounded (a 10 MiB line would otherwise be tokenized whole: about
    2.5 GB). `stats`, when given, gets `"truncated"` += the texts cut either way.
    """
    max_length = self.max_length if max_length is None else int(max_length)
    limit = max_length * MAX_CHARS_PER_TOKEN
    cut = [t if len(t) <= limit else t[:limit] for t in texts]
    out, truncated = [], 0
    for text, enc in zip(texts, self._tok.encode_batch(cut)):
      ids = enc.ids
      if len(ids) > max_length or len(text) > limit:
        truncated += 1
        ids = ids[:max_length - 1] + ids[-1:] if len(ids) > max_length else ids
      out.append(ids)
    if stats is not None:
      stats["truncated"] = stats.get("truncated", 0) + truncated
    return out

  def pad(self, ids: Sequence[Sequence[int]], max_length: int | None = None,
          length: int | None = None) -> TokenBatch:
    """Pad token id lists (from `tokenize`) to a `TokenBatch` `[B, L]`: L is `length` when
    given, else the smallest bucket holding the longest list."""
    max_length = self.max_length if max_length is None else int(max_length)
    longest = max((len(x) for x in ids), default=1)
    if length is None:
      length = bucket_length(longest, self.buckets, max_length)
    elif longest > length:
      raise ValueError(f"a sequence of {longest} tokens does not fit the requested length {length}")
    input_ids = np.full((len(ids), length), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(ids), length), dtype=np.int32)
    for i, row in enumerate(ids):
      input_ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
    return TokenBatch(input_ids, mask, np.zeros_like(input_ids))

  def encode(self, texts: Sequence[str], max_length: int | None = None,
             length: int | None = None) -> TokenBatch:
    """Tokenize and pad `texts` to a `TokenBatch` `[B, L]` (`tokenize`, then `pad`)."""
    return self.pad(self.tokenize(texts, max_length), max_length, length)

  def passage_text(self, title: str, text: str) -> str:
    """DPR passage input: `title [SEP] text` (just `text` when the title is empty)."""
    return f"{title} {self.sep_token} {text}" if title else text

  def encode_passages(self, titles: Sequence[str], texts: Sequence[str], **kw) -> TokenBatch:
    """Tokenize passages as `[CLS] title [SEP] text [SEP]`."""
    return self.encode([self.passage_text(t, x) for t, x in zip(titles, texts)], **kw)

  def lengths(self, texts: Sequence[str]) -> np.ndarray:
    """Token counts (special tokens included, before truncation) `[B]` int32."""
    return np.array([len(e.ids) for e in self._tok.encode_batch(list(texts))], dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
