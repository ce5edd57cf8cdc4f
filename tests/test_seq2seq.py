"""Seq2Seq (BART, T5): parity with transformers, cached decoding, import errors, axis names,
and the BERT2BERT warm start."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.core import meta
from safetensors.numpy import load_file, save_file

from conftest import write_tiny_bert
from ragjax import sharding
from ragjax.decoding.beam import init_decode_cache
from ragjax.errors import WeightImportError
from ragjax.models import hf_import
from ragjax.models.bert import BertEncoder
from ragjax.models.seq2seq import Seq2Seq, Seq2SeqConfig, shift_right
from ragjax.models.seq2seq_import import (abstract_seq2seq_params, load_seq2seq_dir,
                                          seq2seq_config_from_hf, warm_start_from_bert)

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(net, path):
  net.eval()
  net.save_pretrained(path, safe_serialization=True)
  return path, net


def write_tiny_bart(path, seed=0, **kw):
  """A random tiny `BartForConditionalGeneration` (scaled embeddings, non-zero final bias)."""
  torch.manual_seed(seed)
  cfg = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
             decoder_ffn_dim=48, max_position_embeddings=40, init_std=0.2, scale_embedding=True)
  cfg.update(kw)
  net = transformers.BartForConditionalGeneration(transformers.BartConfig(**cfg))
  with torch.no_grad():
    net.final_logits_bias.normal_()
  return _save(net, path)


def write_tiny_t5(path, seed=0, gated=False, tied=True):
  """A random tiny T5: v1.0 (relu) or v1.1 (gated-gelu); untied heads get their own lm_head.
  Encoder and decoder depths differ; small buckets exercise the log-spaced ones."""
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
      num_heads=4, feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=tied,
      relative_attention_num_buckets=8, relative_attention_max_distance=16,
      decoder_start_token_id=0)
  net = transformers.T5ForConditionalGeneration(cfg)
  if not tied:  # transformers 5 ties T5 heads regardless of the config; untie them by hand
    net.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 32 ** -0.5)
  return _save(net, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("seq2seq")
  return {"bart": write_tiny_bart(root / "bart", seed=1),
          "t5": write_tiny_t5(root / "t5", seed=2),
          "t5_gated_untied": write_tiny_t5(root / "t5g", seed=3, gated=True, tied=False)}


def _batch(cfg, seed=0, s=9, t=7, b=3):
  """Encoder inputs with right padding in two rows, decoder inputs behind the start token."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, cfg.vocab_size, (b, s))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = cfg.pad_token_id
  dec = rng.randint(3, cfg.vocab_size, (b, t))
  dec[:, 0] = cfg.decoder_start_token_id
  return ids, mask, dec


@pytest.mark.parametrize("name", ["bart", "t5", "t5_gated_untied"])
def test_logits_match_transformers(models, name):
  path, net = models[name]
  cfg, params = load_seq2seq_dir(path)
  assert cfg.arch == ("bart" if name == "bart" else "t5")
  assert cfg.tie_word_embeddings == (name != "t5_gated_untied")
  assert ("lm_head" in params) == (name == "t5_gated_untied")
  ids, mask, dec = _batch(cfg)
  dec_mask = np.ones_like(dec)
  dec_mask[0, 5:] = 0  # right-padded targets
  with torch.no_grad():
    ref = net(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask))
  model = Seq2Seq(cfg)
  logits, encoded = jax.jit(lambda p: (
      model.apply({"params": p}, ids, mask, dec, dec_mask),
      model.apply({"params": p}, ids, mask, method=Seq2Seq.encode)))(params)
  logits, encoded = np.asarray(logits), np.asarray(encoded)
  assert logits.dtype == np.float32 and logits.shape == (3, 7, VOCAB)
  m = dec_mask.astype(bool)
  diff = np.abs(logits - ref.logits.numpy())[m].max()
  enc_diff = np.abs(encoded - ref.encoder_last_hidden_state.numpy())[mask.astype(bool)].max()
  print(f"{name}: max |logits diff| {diff:.2e}, encoder {enc_diff:.2e}")
  assert diff <= 1e-5 and enc_diff <= 1e-5


def test_bare_bart_model_directory(models, tmp_path):
  path, net = models["bart"]
  bare = transformers.BartModel(net.config)
  bare.load_state_dict(net.model.state_dict())
  cfg, params = load_seq2seq_dir(_save(bare, tmp_path / "bare")[0])
  _, full = load_seq2seq_dir(path)
  np.testing.assert_array_equal(params["final_logits_bias"], 0.0)
  flat, flat_full = (jax.tree_util.tree_leaves_with_path(p) for p in (params, full))
  for (k, a), (_, b) in zip(flat, flat_full):
    if "final_logits_bias" not in jax.tree_util.keystr(k):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["bart", "t5", "t5_gated_untied"])
def test_cached_incremental_decoding_equals_full_forward(models, name):
  cfg, params = load_seq2seq_dir(models[name][0])
  model = Seq2Seq(cfg)
  ids, mask, dec = _batch(cfg, seed=1)

  @jax.jit
  def prefill(params):
    full = model.apply({"params": params}, ids, mask, dec)
    encoded = model.apply({"params": params}, ids, mask, method=Seq2Seq.encode)
    return full, init_decode_cache(model, params, encoded, jnp.asarray(mask), max_length=10)

  full, cache = prefill(params)

  @jax.jit
  def step(cache, tok):
    logits, v = model.apply({"params": params, "cache": cache}, tok[:, None], None, None,
                            decode=True, method=Seq2Seq.decode, mutable=["cache"])
    return logits[:, 0], v["cache"]

  steps = []
  for t in range(dec.shape[1]):
    logits, cache = step(cache, jnp.asarray(dec[:, t]))
    steps.append(np.asarray(logits))
  assert int(cache["decoder"]["cache_index"]) == dec.shape[1]
  diff = np.abs(np.stack(steps, 1) - np.asarray(full)).max()
  print(f"{name}: max |incremental - full| {diff:.2e}")
  assert diff <= 1e-5


def test_import_errors_name_every_bad_tensor(models, tmp_path):
  path, _ = models["bart"]
  tensors = load_file(str(path / "model.safetensors"))
  del tensors["model.decoder.layers.1.fc2.weight"]
  del tensors["model.encoder.layernorm_embedding.bias"]
  tensors["model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
  bad = tmp_path / "bad"
  bad.mkdir()
  save_file(tensors, str(bad / "model.safetensors"))
  (bad / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(WeightImportError) as e:
    load_seq2seq_dir(bad)
  msg = str(e.value)
  assert "missing tensor: model.decoder.layers.1.fc2.weight" in msg
  assert "missing tensor: model.encoder.layernorm_embedding.bias" in msg
  assert "mis-shaped tensor: model.encoder.layers.0.self_attn.q_proj.weight: shape (32, 31)" in msg
  # T5: an untied config without its lm_head, and an unknown architecture.
  t5_path, _ = models["t5"]
  hf = json.loads((t5_path / "config.json").read_text())
  untied = tmp_path / "t5_untied"
  untied.mkdir()
  (untied / "model.safetensors").write_bytes((t5_path / "model.safetensors").read_bytes())
  (untied / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False,
                                                  "scale_decoder_outputs": False}))
  with pytest.raises(WeightImportError, match="missing tensor: lm_head.weight"):
    load_seq2seq_dir(untied)
  with pytest.raises(WeightImportError, match="model_type 'pegasus'"):
    seq2seq_config_from_hf({**hf, "model_type": "pegasus"})


@pytest.mark.parametrize("kw", [dict(arch="bart"), dict(arch="bart", tie_word_embeddings=False),
                                dict(arch="t5", head_dim=8), dict(arch="t5", gated_mlp=True,
                                                                 tie_word_embeddings=False)])
def test_every_parameter_has_logical_axes(kw):
  cfg = Seq2SeqConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=2,
                      num_heads=4, d_ff=48, max_position_embeddings=16, **kw)
  leaves = jax.tree_util.tree_leaves_with_path(
      abstract_seq2seq_params(cfg, boxed=True), is_leaf=lambda x: isinstance(x, meta.Partitioned))
  assert len(leaves) > 10
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, meta.Partitioned), f"{name} has no axis names"
    assert len(leaf.names) == leaf.value.ndim, name
    assert set(leaf.names) - {None} <= set(sharding.LOGICAL_AXES), name
    if leaf.value.ndim >= 2 and "relative_attention_bias" not in name \
        and "embed_positions" not in name:
      assert None not in leaf.names, f"{name}: {leaf.names}"


def test_sharded_forward_equals_single_device(models):
  cfg, params = load_seq2seq_dir(models["t5_gated_untied"][0])
  ids, mask, dec = _batch(cfg, b=4)
  model = Seq2Seq(cfg)
  fwd = lambda p, *a: model.apply({"params": p}, *a)
  ref = np.asarray(jax.jit(fwd)(params, ids, mask, dec))
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  rules = sharding.DEFAULT_AXIS_RULES
  shardings = sharding.logical_param_shardings(abstract_seq2seq_params(cfg, boxed=True), mesh,
                                               rules)
  placed = jax.device_put(params, shardings)
  assert not placed["lm_head"]["kernel"].sharding.is_fully_replicated
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(fwd)(placed, ids, mask, dec)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_shift_right():
  cfg = Seq2SeqConfig(pad_token_id=1, decoder_start_token_id=2)
  out = shift_right(jnp.array([[5, 6, -100, -100]]), cfg)
  np.testing.assert_array_equal(out, [[2, 5, 6, 1]])


def test_warm_start_from_bert(tmp_path):
  bert_dir, _ = write_tiny_bert(tmp_path / "bert", seed=5, max_positions=40)
  bert_cfg, bert_params = hf_import.load_bert_dir(bert_dir)
  cfg, params = warm_start_from_bert(bert_cfg, bert_params, seed=0, pad_token_id=0,
                                     bos_token_id=2, eos_token_id=3)
  assert (cfg.arch, cfg.position_offset, cfg.tie_word_embeddings) == ("bart", 0, True)
  assert "lm_head" not in params
  np.testing.assert_array_equal(params["final_logits_bias"], 0.0)
  rng = np.random.RandomState(0)
  ids = rng.randint(5, bert_cfg.vocab_size, (3, 11))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  ids[mask == 0] = 0
  model = Seq2Seq(cfg)
  ours = jax.jit(lambda p: model.apply({"params": p}, ids, mask, method=Seq2Seq.encode))(params)
  _, bert_hidden = jax.jit(lambda p: BertEncoder(bert_cfg).apply(
      {"params": p}, ids, mask, return_hidden=True))(bert_params)
  diff = np.abs(np.asarray(ours) - np.asarray(bert_hidden)).max()
  print(f"warm start: max |encoder - BERT| {diff:.2e}")
  assert diff <= 1e-5
  # Decoder self-attention / FFN are BERT's; cross-attention is fresh and seeded.
  dec = params["decoder"]["layer_1"]
  np.testing.assert_array_equal(dec["mlp"]["wi"]["kernel"],
                                bert_params["layer_1"]["intermediate"]["kernel"])
  again = warm_start_from_bert(bert_cfg, bert_params, seed=0)[1]
  other = warm_start_from_bert(bert_cfg, bert_params, seed=1)[1]
  q = lambda p: p["decoder"]["layer_0"]["cross_attn"]["query"]["kernel"]
  np.testing.assert_array_equal(q(params), q(again))
  assert not np.allclose(q(params), q(other)) and np.std(q(params)) > 0
  dec_ids = np.concatenate([np.full((3, 1), cfg.decoder_start_token_id), ids[:, :5]], axis=1)
  logits = np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, mask, dec_ids))(params))
  assert logits.shape == (3, 6, bert_cfg.vocab_size) and np.isfinite(logits).all()
  # The optional self-attention start of the cross-attention copies BERT layer i's attention.
  _, copied = warm_start_from_bert(bert_cfg, bert_params, cross_attention="self_attention")
  for i in range(bert_cfg.num_hidden_layers):
    cross, att = copied["decoder"][f"layer_{i}"]["cross_attn"], bert_params[f"layer_{i}"]["attention"]
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value"), ("out", "output")):
      np.testing.assert_array_equal(cross[ours]["kernel"], att[theirs]["kernel"])
  with pytest.raises(ValueError, match="cross_attention"):
    warm_start_from_bert(bert_cfg, bert_params, cross_attention="bert")
