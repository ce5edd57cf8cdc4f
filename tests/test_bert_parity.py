"""Parity of the Flax BERT encoder with HuggingFace transformers and sentence-transformers."""
import gzip
import json

import numpy as np
import pytest
import torch

from conftest import write_tiny_bert
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.errors import WeightImportError
from ragjax.models import hf_import
from ragjax.models.bert import BertEncoder
from ragjax.models.retriever import load_retriever

TEXTS = ["who was born in paris ?", "alice studied physics at the university of tokyo .",
         "the capital of france", "bob works for the city of london in march 1990 ."]


def _batch(path, texts, max_length=64):
  tok = WordPieceTokenizer.from_dir(path, max_length=max_length)
  return tok.encode(texts)


def _ours(path, batch, **overrides):
  cfg, params = hf_import.load_bert_dir(path, **overrides)
  return np.asarray(BertEncoder(cfg).apply({"params": params}, batch.input_ids,
                                           batch.attention_mask, batch.token_type_ids,
                                           return_hidden=True)[1]), cfg, params


def test_tiny_bert_hidden_states_match_transformers(tmp_path):
  path, net = write_tiny_bert(tmp_path / "bert", seed=1)
  batch = _batch(path, TEXTS)
  assert batch.attention_mask.sum(1).min() < batch.shape[1], "test needs some padding"
  ours, _, _ = _ours(path, batch)
  with torch.no_grad():
    ref = net(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
              token_type_ids=torch.tensor(batch.token_type_ids, dtype=torch.long)
              ).last_hidden_state.numpy()
  m = batch.attention_mask.astype(bool)  # padded positions are not defined to agree
  np.testing.assert_allclose(ours[m], ref[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model,proj", [("dpr_question", 0), ("dpr_context", 0),
                                        ("dpr_question", 16), ("dpr_context", 24)])
def test_tiny_dpr_encoders_match_transformers(tmp_path, model, proj):
  path, net = write_tiny_bert(tmp_path / model, seed=2, model=model, projection_dim=proj)
  batch = _batch(path, TEXTS)
  cfg, params = hf_import.load_bert_dir(path, pooling="cls")
  assert cfg.output_dim == (proj or 32)
  ours = np.asarray(BertEncoder(cfg).apply({"params": params}, batch.input_ids,
                                           batch.attention_mask))
  with torch.no_grad():
    ref = net(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long)
              ).pooler_output.numpy()
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_dpr_two_tower_retriever_directory(tmp_path):
  q_dir, q_net = write_tiny_bert(tmp_path / "r" / "query_encoder", seed=3, model="dpr_question")
  p_dir, p_net = write_tiny_bert(tmp_path / "r" / "passage_encoder", seed=4, model="dpr_context")
  r = load_retriever(str(tmp_path / "r"), max_length=32)
  q = r.encode_queries(["who was born in paris ?"], batch_size=4)
  p = r.encode_passages(["alice"], ["alice was born in paris ."], batch_size=4)
  tok = WordPieceTokenizer.from_dir(q_dir, max_length=32)
  qb, pb = tok.encode(["who was born in paris ?"]), tok.encode(["alice [SEP] alice was born in paris ."])
  with torch.no_grad():
    q_ref = q_net(input_ids=torch.tensor(qb.input_ids, dtype=torch.long),
                  attention_mask=torch.tensor(qb.attention_mask)).pooler_output.numpy()
    p_ref = p_net(input_ids=torch.tensor(pb.input_ids, dtype=torch.long),
                  attention_mask=torch.tensor(pb.attention_mask)).pooler_output.numpy()
  np.testing.assert_allclose(q, q_ref, atol=1e-5)
  np.testing.assert_allclose(p, p_ref, atol=1e-5)
  assert not np.allclose(q_ref, p_ref), "towers must be distinct"


def test_import_reports_missing_and_misshaped_tensors(tmp_path):
  path, _ = write_tiny_bert(tmp_path / "bert")
  tensors = hf_import.load_safetensors(path)
  cfg = hf_import.bert_config_from_hf(hf_import.read_config(path))
  broken = dict(tensors)
  del broken["encoder.layer.1.attention.self.key.weight"]
  broken["encoder.layer.0.intermediate.dense.weight"] = np.zeros((5, 32), np.float32)
  with pytest.raises(WeightImportError) as e:
    hf_import.import_bert(broken, cfg, where="ckpt-x")
  msg = str(e.value)
  assert "ckpt-x" in msg
  assert "missing tensor: encoder.layer.1.attention.self.key.weight" in msg
  assert "encoder.layer.0.intermediate.dense.weight: shape (5, 32), expected (37, 32)" in msg
  with pytest.raises(WeightImportError, match="no tensor named"):
    hf_import.import_bert({"foo": np.zeros(3)}, cfg)


def test_import_errors_name_the_file(tmp_path):
  with pytest.raises(WeightImportError, match="config.json"):
    load_retriever(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(WeightImportError, match=r"config.json:1: invalid JSON"):
    hf_import.read_config(tmp_path)
  with pytest.raises(WeightImportError, match="expected 'minilm' or a checkpoint directory"):
    load_retriever("no-such-retriever")


def test_minilm_sha256_is_verified(monkeypatch):
  assert hf_import.sha256_file(hf_import.minilm_dir() / "model.safetensors") == \
      "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
  monkeypatch.setattr(hf_import, "MINILM_SHA256", "0" * 64)
  with pytest.raises(WeightImportError, match="does not match the expected"):
    hf_import.minilm_dir()


def _squad(shared_data, n_questions):
  with gzip.open(shared_data / "squad_v1.1" / "squad1.1_dev_corpus.jsonl.gz", "rt") as f:
    paragraphs = [json.loads(line)["text"] for line in f]
  with gzip.open(shared_data / "squad_v1.1" / "squad1.1_dev_questions.jsonl.gz", "rt") as f:
    questions = [json.loads(line)["question"] for _, line in zip(range(n_questions), f)]
  return paragraphs, questions


@pytest.mark.parametrize("every", [
    pytest.param(1, marks=pytest.mark.slow, id="all"),   # ~200 s on 2 cores: benchmark tier
    pytest.param(16, id="sample")])
def test_minilm_matches_sentence_transformers_on_squad(shared_data, every):
  """SQuAD dev paragraphs and questions, float32, max |diff| <= 1e-5: all 2,067 paragraphs and
  1,000 questions (slow tier), or every 16th of each plus the 16 longest paragraphs (whose
  256-token truncation is the case most likely to differ) in CI."""
  from sentence_transformers import SentenceTransformer
  paragraphs, questions = _squad(shared_data, 1000)
  assert len(paragraphs) == 2067
  if every > 1:
    longest = sorted(range(len(paragraphs)), key=lambda i: -len(paragraphs[i]))[:16]
    keep = sorted(set(range(0, len(paragraphs), every)) | set(longest))
    paragraphs, questions = [paragraphs[i] for i in keep], questions[::every]
  retriever = load_retriever("minilm")
  st = SentenceTransformer(str(hf_import.minilm_dir()), device="cpu")
  assert st.max_seq_length == retriever.tokenizer.max_length == 256
  texts = paragraphs + questions
  ours = retriever.encode_queries(texts, batch_size=64)
  ref = st.encode(texts, batch_size=64, convert_to_numpy=True)
  assert ours.shape == ref.shape == (len(texts), 384)
  assert np.abs(ours - ref).max() <= 1e-5
