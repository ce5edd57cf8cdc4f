"""HF export (`ragjax.serving.hf_export`): the exported directories load in transformers (and
sentence-transformers) offline and compute what ragjax computes, max |diff| <= 1e-5 in float32.

Every parameter is perturbed before export, so a check cannot pass by copying the imported file
back out; the BERT2BERT generator is checked against transformers' own EncoderDecoderModel of
BertGeneration, a different implementation of the same function."""
import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import write_tiny_bert
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.errors import ExportError
from ragjax.models import hf_import
from ragjax.models.bert import BertEncoder
from ragjax.models.seq2seq import Seq2Seq
from ragjax.models.seq2seq_import import load_seq2seq_dir, warm_start_from_bert
from ragjax.serving import hf_export
from test_seq2seq import _batch, write_tiny_bart, write_tiny_t5

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = ["who was born in paris ?", "alice studied physics at the university of tokyo .",
         "bob works for the city of london in march 1990 ."]


def _perturbed(params, seed=0, scale=0.05):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x, np.float32)
                      + scale * rng.standard_normal(np.shape(x)).astype(np.float32), params)


def test_bert_exports_as_bert_model_and_sentence_transformer(tmp_path):
  src, _ = write_tiny_bert(tmp_path / "src", seed=3)
  cfg, params = hf_import.load_bert_dir(src, pooling="mean", normalize=True)
  params = _perturbed(params)
  tok = WordPieceTokenizer.from_dir(src, max_length=64)
  out = hf_export.write_bert_dir(tmp_path / "out", cfg, params, tok, max_length=64)
  batch = tok.encode(TEXTS)
  pooled, hidden = BertEncoder(cfg).apply({"params": params}, batch.input_ids,
                                          batch.attention_mask, return_hidden=True)
  net = transformers.BertModel.from_pretrained(out).eval()
  with torch.no_grad():
    ref = net(input_ids=torch.tensor(batch.input_ids),
              attention_mask=torch.tensor(batch.attention_mask)).last_hidden_state.numpy()
  m = batch.attention_mask.astype(bool)
  assert np.abs(np.asarray(hidden)[m] - ref[m]).max() <= 1e-5
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok(TEXTS[1])["input_ids"] == tok.tokenize([TEXTS[1]])[0]
  from sentence_transformers import SentenceTransformer
  st = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
  assert np.abs(st - np.asarray(pooled)).max() <= 1e-5
  np.testing.assert_allclose(np.linalg.norm(st, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind,proj", [("dpr_question", 16), ("dpr_context", 0)])
def test_dpr_encoders_export(tmp_path, kind, proj):
  src, _ = write_tiny_bert(tmp_path / "src", seed=4, model=kind, projection_dim=proj)
  cfg, params = hf_import.load_bert_dir(src, pooling="cls")
  params = _perturbed(params, seed=1)
  tok = WordPieceTokenizer.from_dir(src, max_length=64)
  out = hf_export.write_bert_dir(tmp_path / "out", cfg, params, tok, kind=kind)
  batch = tok.encode(TEXTS)
  ours = np.asarray(BertEncoder(cfg).apply({"params": params}, batch.input_ids,
                                           batch.attention_mask))
  cls = {"dpr_question": transformers.DPRQuestionEncoder,
         "dpr_context": transformers.DPRContextEncoder}[kind]
  with torch.no_grad():
    ref = cls.from_pretrained(out).eval()(
        input_ids=torch.tensor(batch.input_ids),
        attention_mask=torch.tensor(batch.attention_mask)).pooler_output.numpy()
  assert ref.shape == ours.shape and np.abs(ours - ref).max() <= 1e-5
  if proj:  # a projected encoder is not a BertModel
    with pytest.raises(ExportError, match="projection"):
      hf_export.write_bert_dir(tmp_path / "bad", cfg, params, tok, kind="bert")


def _generator(name, tmp_path):
  if name == "bert2bert":
    bert_dir, _ = write_tiny_bert(tmp_path / "bert", seed=5, max_positions=40)
    bcfg, bparams = hf_import.load_bert_dir(bert_dir)
    return warm_start_from_bert(bcfg, bparams, seed=0, pad_token_id=0, bos_token_id=2,
                                eos_token_id=3)
  if name == "bart":
    path, _ = write_tiny_bart(tmp_path / "bart", seed=6)
  else:
    path, _ = write_tiny_t5(tmp_path / "t5", seed=7, gated=name == "t5_gated_untied",
                            tied=name == "t5")
  return load_seq2seq_dir(path)


@pytest.mark.parametrize("name", ["bart", "t5", "t5_gated_untied", "bert2bert"])
def test_generator_exports_match_transformers(tmp_path, name):
  cfg, params = _generator(name, tmp_path)
  params = _perturbed(params, seed=2)
  out = hf_export.write_seq2seq_dir(tmp_path / "out", cfg, params)
  cls = (transformers.EncoderDecoderModel if name == "bert2bert" else
         transformers.BartForConditionalGeneration if name == "bart" else
         transformers.T5ForConditionalGeneration)
  net = cls.from_pretrained(out).eval()
  ids, mask, dec = _batch(cfg)
  dec_mask = np.ones_like(dec)
  dec_mask[0, 5:] = 0
  with torch.no_grad():
    ref = net(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              decoder_input_ids=torch.tensor(dec),
              decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
  ours = np.asarray(jax.jit(lambda p: Seq2Seq(cfg).apply({"params": p}, ids, mask, dec,
                                                          dec_mask))(params))
  diff = np.abs(ours - ref)[dec_mask.astype(bool)].max()
  print(f"{name}: max |logits diff| {diff:.2e}")
  assert ours.shape == ref.shape and diff <= 1e-5


def test_export_refuses_a_model_no_hf_class_computes(tmp_path):
  import dataclasses
  cfg, params = _generator("bart", tmp_path)
  with pytest.raises(ExportError, match="eps"):
    hf_export.seq2seq_hf_config(dataclasses.replace(cfg, layer_norm_eps=1e-12))
  names = hf_export.seq2seq_name_map(cfg, "model.")
  names.pop(("shared", "embedding"))
  with pytest.raises(ExportError, match="shared/embedding"):
    hf_export.export_tensors(params, names, what="bart")
