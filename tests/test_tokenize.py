"""Tokenization: explicit truncation/padding, static buckets, DPR passage format."""
import numpy as np
import pytest
import transformers

from ragjax.data.tokenize import WordPieceTokenizer, bucket_length
from ragjax.models import hf_import


@pytest.fixture(scope="module")
def minilm_tok():
  return WordPieceTokenizer.from_dir(hf_import.minilm_dir(), max_length=256)


def test_bucket_length():
  assert bucket_length(1, (16, 32, 64), 64) == 16
  assert bucket_length(17, (16, 32, 64), 64) == 32
  assert bucket_length(64, (16, 32, 64), 64) == 64
  assert bucket_length(65, (16, 32, 64), 48) == 48  # capped at max_length


def test_fixed_padding_of_tokenizer_json_is_disabled(minilm_tok):
  # MiniLM's tokenizer.json pads everything to 128; we pad to the smallest bucket instead.
  b = minilm_tok.encode(["a short question?"])
  assert b.shape == (1, 16)
  assert b.attention_mask.sum() == 6  # [CLS] a short question ? [SEP]


def test_ids_match_transformers_bert_tokenizer(minilm_tok):
  ref_tok = transformers.BertTokenizer(vocab=str(hf_import.minilm_dir() / "vocab.txt"),
                                       do_lower_case=True)
  texts = ["Which NFL team represented the AFC at Super Bowl 50?", "Ünïcödé naïve café",
           "word " * 400]
  b = minilm_tok.encode(texts)
  ref = ref_tok(texts, max_length=256, truncation=True, padding="max_length")
  np.testing.assert_array_equal(b.input_ids, np.asarray(ref["input_ids"]))
  np.testing.assert_array_equal(b.attention_mask, np.asarray(ref["attention_mask"]))


def test_truncation_keeps_final_sep(minilm_tok):
  b = minilm_tok.encode(["word " * 1000], max_length=40)
  assert b.shape == (1, 40)
  assert b.input_ids[0, 0] == 101 and b.input_ids[0, -1] == 102


def test_vocab_txt_only_directory(tiny_bert_dir):
  tok = WordPieceTokenizer.from_dir(tiny_bert_dir, max_length=32)
  b = tok.encode_passages(["Paris"], ["The capital of France."])
  words = tok.decode(b.input_ids[0][b.attention_mask[0] == 1])
  assert words == "paris the capital of france."
  ids = list(b.input_ids[0][b.attention_mask[0] == 1])
  assert ids.count(3) == 2, "[CLS] title [SEP] text [SEP]"


def test_fixed_length_request_and_errors(tiny_bert_dir, tmp_path):
  tok = WordPieceTokenizer.from_dir(tiny_bert_dir, max_length=32)
  assert tok.encode(["paris"], length=24).shape == (1, 24)
  with pytest.raises(ValueError, match="does not fit"):
    tok.encode(["paris " * 20], length=8)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
    WordPieceTokenizer.from_dir(tmp_path)
