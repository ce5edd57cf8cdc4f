"""Fusion-in-Decoder reader: logits, cross-attention and generation against transformers' T5 /
BART fed the concatenated per-passage encoder outputs; the FiD loss and its Atlas retriever
objectives against numpy references built from the transformers reader; the reader/retriever
K split of both readers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from conftest import write_tiny_bert
from rag_helpers import load_rag
from ragjax.decoding import beam
from ragjax.models import fid
from ragjax.models.rag import RagModel, rag_loss
from ragjax.models.seq2seq import Seq2Seq
from ragjax.objectives import rag_losses
from test_seq2seq import VOCAB, write_tiny_bart, write_tiny_t5

pytestmark = pytest.mark.usefixtures("one_torch_thread")
B, K, L, T = 2, 3, 6, 5


@pytest.fixture(scope="module")
def readers(tmp_path_factory):
  root = tmp_path_factory.mktemp("fid")
  q_dir, _ = write_tiny_bert(root / "q", seed=4)
  out = {}
  for name, writer in (("t5", write_tiny_t5), ("bart", write_tiny_bart)):
    path, net = writer(root / name, seed=5)
    model, params = load_rag(q_dir, path)
    net.set_attn_implementation("eager")  # sdpa returns no attention probabilities
    out[name] = (model, params, net)
  return out


def _contexts(cfg, seed=0):
  """`[B, K, L]` contexts with right padding (one context of 2 tokens), targets `[B, T]`."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, (B, K, L))
  mask = np.ones_like(ids)
  mask[0, 1, 4:] = 0
  mask[1, 2, 2:] = 0
  ids[mask == 0] = cfg.pad_token_id
  labels = rng.randint(3, VOCAB, (B, T))
  labels[:, 0] = cfg.decoder_start_token_id
  labels[1, 4] = cfg.pad_token_id                      # a shorter answer
  return ids, mask, labels


def _hf_fused(net, ids, mask):
  """transformers' encoder on each context apart, concatenated: `[B, K*L, E]`, mask `[B, K*L]`."""
  with torch.no_grad():
    enc = net.get_encoder()(input_ids=torch.tensor(ids.reshape(B * K, L)),
                            attention_mask=torch.tensor(mask.reshape(B * K, L))).last_hidden_state
  return enc.reshape(B, K * L, -1), torch.tensor(mask.reshape(B, K * L))


def _hf_value_norms(net, name, enc):
  """||v_h|| of every decoder layer's cross-attention over the fused states: `[N, B, H, K*L]`."""
  if name == "t5":
    projs = [blk.layer[1].EncDecAttention.v for blk in net.decoder.block]
    heads = net.config.num_heads
  else:
    projs = [layer.encoder_attn.v_proj for layer in net.model.decoder.layers]
    heads = net.config.decoder_attention_heads
  with torch.no_grad():
    out = [p(enc).reshape(B, K * L, heads, -1).norm(dim=-1).permute(0, 2, 1) for p in projs]
  return np.stack([o.numpy() for o in out])


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_fid_logits_and_cross_attention_match_transformers(readers, name):
  model, params, net = readers[name]
  cfg = model.generator_cfg
  ids, mask, labels = _contexts(cfg)
  enc, fmask = _hf_fused(net, ids, mask)
  with torch.no_grad():
    ref = net(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=fmask,
              decoder_input_ids=torch.tensor(labels), output_attentions=True)
  logits, sown = jax.jit(lambda p: model.apply({"params": p}, ids, mask, labels,
                                               method=fid.fid_logits,
                                               mutable=["intermediates"]))(params)
  diff = np.abs(np.asarray(logits) - ref.logits.numpy()).max()
  attn, vnorm = fid.cross_attention_of(sown["intermediates"], K, L)
  n_layers = len(ref.cross_attentions)
  assert attn.shape == (n_layers, B, 4, T, K, L) and vnorm.shape == (n_layers, B, 4, K, L)
  ref_attn = np.stack([a.numpy() for a in ref.cross_attentions]).reshape(attn.shape)
  attn_diff = np.abs(np.asarray(attn) - ref_attn).max()
  ref_v = _hf_value_norms(net, name, enc).reshape(vnorm.shape)
  v_diff = np.abs(np.asarray(vnorm) - ref_v).max()
  print(f"{name}: FiD logits {diff:.1e}, cross-attention {attn_diff:.1e}, value norms {v_diff:.1e}")
  assert diff <= 1e-5 and attn_diff <= 1e-5 and v_diff <= 1e-5
  assert np.all(np.asarray(attn)[:, 0, :, :, 1, 4:] == 0)  # padded keys get no attention


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fid_generation_matches_transformers(readers, num_beams):
  model, params, net = readers["t5"]
  cfg = model.generator_cfg
  ids, mask, _ = _contexts(cfg, seed=1)
  enc, fmask = _hf_fused(net, ids, mask)
  with torch.no_grad():
    ref = net.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc),
                       attention_mask=fmask, max_new_tokens=6, num_beams=num_beams,
                       do_sample=False, min_length=0, eos_token_id=cfg.eos_token_id,
                       use_cache=False)  # its cache sizes by the encoder's depth (2 != 3)
  gen = Seq2Seq(cfg)
  if num_beams == 1:
    ours = beam.greedy_search(gen, params["generator"], ids, mask, 6)
  else:
    ours = beam.beam_search(gen, params["generator"], ids, mask, num_beams, 6).sequences
  ours = np.asarray(ours)
  ref = ref.numpy()
  assert np.array_equal(ours[:, :ref.shape[1]], ref)
  assert np.all(ours[:, ref.shape[1]:] == cfg.pad_token_id)


def _rag_batch(model, ids, mask, labels, seed=0):
  rng = np.random.RandomState(seed)
  k = ids.shape[1]
  return {"query_input_ids": rng.randint(5, 40, (B, 7)), "query_attention_mask": np.ones((B, 7),
                                                                                      np.int32),
          "passage_embeddings": rng.randn(B, k, model.query_cfg.output_dim).astype(np.float32),
          "context_input_ids": ids, "context_attention_mask": mask, "labels": labels}


def _hf_token_logprob(net, enc, fmask, labels, temperature=1.0):
  """log softmax(logits / temperature)[y_t] `[B, T]` of the reference reader on fused states
  (targets = labels shifted; 0 on unscored positions) and the scored-token mask `[B, T]`."""
  targets = np.concatenate([labels[:, 1:], np.zeros((len(labels), 1), labels.dtype)], axis=1)
  tmask = np.concatenate([labels[:, 1:] != 0, np.zeros((len(labels), 1), bool)], axis=1)
  with torch.no_grad():
    logits = net(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=fmask,
                 decoder_input_ids=torch.tensor(labels)).logits
  logp = torch.log_softmax(logits.double() / temperature, -1).numpy()
  tok = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return np.where(tmask, tok, 0.0), tmask


def _hf_seq_logprob(net, enc, fmask, labels):
  """sum_t log p(y_t | ...) of the reference reader on fused states, and the token counts."""
  tok, tmask = _hf_token_logprob(net, enc, fmask, labels)
  return tok.sum(-1), tmask.sum(-1)


def _kl(scores_bk, target_bk, t_r, t_t):
  """Atlas's KL(softmax(target / t_t) || softmax(scores / t_r)), elementwise mean over B*K."""
  lp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      x.max(-1, keepdims=True)
  pt = np.exp(lp(target_bk / t_t))
  return float(np.sum(pt * (lp(target_bk / t_t) - lp(scores_bk / t_r))) / target_bk.size)


def test_fid_loss_nll_and_adist_against_transformers(readers):
  model, params, net = readers["t5"]
  cfg = model.generator_cfg
  ids, mask, labels = _contexts(cfg, seed=2)
  batch = _rag_batch(model, ids, mask, labels)
  enc, fmask = _hf_fused(net, ids, mask)
  seq_lp, ntok = _hf_seq_logprob(net, enc, fmask, labels)
  loss_none, aux = jax.jit(lambda p: fid.fid_loss(model, p, batch))(params)
  assert abs(float(loss_none) + seq_lp.mean()) <= 1e-4
  assert abs(float(aux["nll_per_token"]) + seq_lp.sum() / ntok.sum()) <= 1e-5
  # ADist: the target from transformers' cross-attention and value norms (numpy aggregation).
  with torch.no_grad():
    ref = net(encoder_outputs=BaseModelOutput(last_hidden_state=enc), attention_mask=fmask,
              decoder_input_ids=torch.tensor(labels), output_attentions=True)
  attn = np.stack([a.numpy() for a in ref.cross_attentions])          # [N, B, H, T, K*L]
  vn = _hf_value_norms(net, "t5", enc)                                # [N, B, H, K*L]
  tmask = np.concatenate([labels[:, 1:] != 0, np.zeros((B, 1), bool)], 1)
  per_key = (attn * vn[:, :, :, None, :] * tmask[None, :, None, :, None]).sum((0, 3)).mean(1)
  target = (per_key * fmask.numpy()).reshape(B, K, L).sum(-1) / (256 * attn.shape[0]
                                                                 * tmask.sum(-1))[:, None]
  scores = np.asarray(model.apply({"params": params}, batch["query_input_ids"],
                                  batch["query_attention_mask"], batch["passage_embeddings"],
                                  method=RagModel.retrieve_scores))
  kw = dict(retriever_temperature=0.5, target_temperature=0.01)
  (loss_ad, aux_ad), g_ad = jax.jit(jax.value_and_grad(
      lambda p: fid.fid_loss(model, p, batch, retriever_loss="adist", **kw), has_aux=True))(params)
  want = _kl(scores, target, 0.5, 0.01)
  assert abs(float(aux_ad["retriever_loss"]) - want) <= 1e-5 * max(1.0, abs(want))
  assert abs(float(loss_ad) - float(loss_none) - want) <= 1e-4
  # The distilled target's entropy (logged every step: a flat ADist target collapses the
  # retriever, README) and how often its top passage is the retriever's.
  lt = target / 0.01 - (target / 0.01).max(1, keepdims=True)
  lt = lt - np.log(np.exp(lt).sum(1, keepdims=True))
  np.testing.assert_allclose(float(aux_ad["target_entropy"]),
                             np.mean(-(np.exp(lt) * lt).sum(1)), rtol=1e-4, atol=1e-6)
  assert float(aux_ad["target_top1_is_retriever_top1"]) == pytest.approx(
      np.mean(target.argmax(1) == scores.argmax(1)))
  # In-batch negatives: every other example's passages join the retriever's softmax with no
  # target mass (rows: distinct passages, except example 1 repeats example 0's first passage,
  # which is then not its negative); Atlas's mean stays over the B*K scored passages.
  ids_bk = np.arange(B * K, dtype=np.int32).reshape(B, K)
  ids_bk[1, 0] = ids_bk[0, 0]
  inb = {**batch, "doc_ids": ids_bk}
  q = np.asarray(model.apply({"params": params}, batch["query_input_ids"],
                             batch["query_attention_mask"], method=RagModel.encode_query),
                 np.float64)
  emb = batch["passage_embeddings"].astype(np.float64)
  kl_ext = 0.0
  for b in range(B):
    cols = [emb[b, k] for k in range(K)] + [emb[o, k] for o in range(B) if o != b
                                            for k in range(K) if ids_bk[o, k] not in ids_bk[b]]
    s_ext = np.array([q[b] @ c * model.doc_score_scale for c in cols]) / 0.5
    lp_ext = s_ext - np.log(np.exp(s_ext - s_ext.max()).sum()) - s_ext.max()
    pt = np.exp(target[b] / 0.01 - np.log(np.exp(target[b] / 0.01 - (target[b] / 0.01).max())
                                          .sum()) - (target[b] / 0.01).max())
    kl_ext += np.sum(pt * (np.log(pt) - lp_ext[:K]))
  _, aux_inb = jax.jit(lambda p: fid.fid_loss(model, p, inb, retriever_loss="adist",
                                              in_batch_negatives=True, **kw))(params)
  np.testing.assert_allclose(float(aux_inb["retriever_loss"]), kl_ext / (B * K), rtol=1e-4)
  assert float(aux_inb["retriever_loss"]) > want
  # Gradients: the target is under stop-gradient, so the generator's gradient is the NLL's
  # alone; the query encoder gets one only through the retriever objective.
  g_none = jax.jit(jax.grad(lambda p: fid.fid_loss(model, p, batch)[0]))(params)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  assert np.allclose(flat(g_ad["generator"]), flat(g_none["generator"]), atol=1e-6)
  assert np.abs(flat(g_none["bi_encoder"]["query_encoder"])).max() == 0
  assert np.abs(flat(g_ad["bi_encoder"]["query_encoder"])).max() > 0


@pytest.mark.parametrize("name", ["pdist", "emdr2", "emdr2_token", "loop"])
def test_fid_reader_side_targets_match_transformers(readers, name):
  """pdist / emdr2 / emdr2_token: the reader on each passage alone; loop: the reader with
  passage k masked."""
  model, params, net = readers["t5"]
  cfg = model.generator_cfg
  ids, mask, labels = _contexts(cfg, seed=3)
  batch = _rag_batch(model, ids, mask, labels, seed=1)
  enc, fmask = _hf_fused(net, ids, mask)
  logp, tok_bkt = np.zeros((B, K)), [None] * K
  for k in range(K):
    keep = np.zeros((B, K, L), np.int64)
    keep[:, k] = 1
    sub = fmask * torch.tensor(keep.reshape(B, K * L) if name != "loop"
                               else 1 - keep.reshape(B, K * L))
    tok, tmask = _hf_token_logprob(net, enc, sub, labels)
    logp[:, k], ntok = tok.sum(-1), tmask.sum(-1)
    # emdr2_token: Atlas's code divides the reader's logits by temperature_gold (0.5 here)
    tok_bkt[k], _ = _hf_token_logprob(net, enc, sub, labels, temperature=0.5)
  scores = np.asarray(model.apply({"params": params}, batch["query_input_ids"],
                                  batch["query_attention_mask"], batch["passage_embeddings"],
                                  method=RagModel.retrieve_scores))
  if name == "pdist":
    want = _kl(scores, logp / ntok[:, None], 2.0, 0.5)
  elif name == "loop":
    want = _kl(scores, -logp / ntok[:, None], 2.0, 0.5)
  elif name == "emdr2_token":  # Atlas's code: -sum_t log sum_k p_retr(k) p(y_t|x,z_k,y_<t),
    # averaged over the batch's scored tokens, p(y_t|...) at the target temperature
    lp_r = scores / 2.0 - np.log(np.exp(scores / 2.0).sum(-1, keepdims=True))
    marg_bt = np.log(np.sum(np.exp(lp_r[:, :, None] + np.stack(tok_bkt, 1)), axis=1))
    want = float(-np.sum(np.where(tmask, marg_bt, 0.0)) / tmask.sum())
  else:  # EMDR2 (Sachan et al. 2021): -log sum_k p_retr(k) p(y|x,z_k) under stop-gradient
    lp_r = scores / 2.0 - np.log(np.exp(scores / 2.0).sum(-1, keepdims=True))
    j = lp_r + logp
    want = float(-np.mean(np.log(np.exp(j - j.max(-1, keepdims=True)).sum(-1)) + j.max(-1)))
  _, aux = jax.jit(lambda p: fid.fid_loss(model, p, batch, retriever_loss=name,
                                          retriever_temperature=2.0,
                                          target_temperature=0.5))(params)
  got = float(aux["retriever_loss"])
  assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)


def test_reader_k_reads_the_first_passages_and_trains_the_retriever_on_all(readers):
  model, params, net = readers["t5"]
  cfg = model.generator_cfg
  ids, mask, labels = _contexts(cfg, seed=4)
  batch = _rag_batch(model, ids, mask, labels, seed=2)
  first2 = dict(batch, context_input_ids=ids[:, :2], context_attention_mask=mask[:, :2],
                passage_embeddings=batch["passage_embeddings"][:, :2])
  kw = dict(retriever_loss="pdist", retriever_temperature=1.0, target_temperature=1.0)
  # RAG reader: the marginal over the first 2 of K_r = 3; PDist over all 3.
  loss, aux = rag_loss(model, params, batch, "rag_sequence", reader_k=2, **kw)
  ref2, _ = rag_loss(model, params, first2, "rag_sequence")
  assert abs(float(loss) - float(aux["retriever_loss"]) - float(ref2)) <= 1e-5
  logits = model.apply({"params": params}, ids, mask, labels, method=RagModel.generator_logits)
  targets, tmask = rag_losses.shift_targets(jnp.asarray(labels), cfg.pad_token_id)
  seq = np.asarray(rag_losses.sequence_logprob(logits, targets, tmask))
  scores = np.asarray(model.apply({"params": params}, batch["query_input_ids"],
                                  batch["query_attention_mask"], batch["passage_embeddings"],
                                  method=RagModel.retrieve_scores))
  want = _kl(scores, seq / np.asarray(tmask).sum(-1)[:, None], 1.0, 1.0)
  assert abs(float(aux["retriever_loss"]) - want) <= 1e-5
  # FiD reader: the NLL reads the first 2; the retriever objective covers 3.
  f_loss, f_aux = fid.fid_loss(model, params, batch, reader_k=2, **kw)
  f_ref, _ = fid.fid_loss(model, params, first2)
  assert abs(float(f_loss) - float(f_aux["retriever_loss"]) - float(f_ref)) <= 1e-5
  with pytest.raises(ValueError, match="reader_k=4"):
    fid.fid_loss(model, params, batch, reader_k=4)
  with pytest.raises(ValueError, match="only serve a retriever_loss"):
    rag_loss(model, params, batch, "rag_token", reader_k=2)


@pytest.mark.parametrize("overrides,words", [
    ({"model.reader": "fusion"}, "model.reader 'fusion'"),
    ({"model.retriever_loss": "adist"}, "needs model.reader='fid'"),
    ({"model.reader": "fid", "model.loss": "closed_book"}, "closed_book"),
    ({"model.retriever_k": 1, "model.retriever_loss": "pdist"}, "retriever_k=1 < model.k=2"),
    ({"model.retriever_k": 4}, "needs a model.retriever_loss"),
    ({"model.retriever_k": 4, "model.retriever_loss": "pdist", "model.rerank_candidates": 3},
     "rerank_candidates=3: expected K=4 < it"),
])
def test_reader_and_k_config_errors_name_the_key(overrides, words):
  from ragjax import config as config_lib
  from ragjax.errors import ConfigError
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])
  with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
    config_lib.validate(cfg, data=False)


def test_fid_training_with_adist_trains_the_query_encoder_and_evaluates(tmp_path):
  """`ragjax train` with the FiD reader, ADist and K_r = 3 > K = 2: the step batch carries 3
  passages, the query encoder gets ADist's gradient, eval decodes by FiD and reports the 2
  passages the reader read."""
  from ragjax.cli import main
  w = tmp_path / "w"
  assert main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(w),
               "--config.train.total_steps=3", "--config.train.tensorboard=false",
               "--config.train.eval_every=3", "--config.model.reader=fid",
               "--config.model.retriever_loss=adist", "--config.model.retriever_k=3",
               "--config.model.retriever_temperature=0.1",
               "--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
               "--config.mesh.num_devices=1"]) == 0
  import json
  rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "retriever_loss" in r]
  assert len(train) == 3 and all(np.isfinite(r["loss"]) for r in train)
  assert all(r["retriever_loss"] >= 0 for r in train)          # a KL
  assert train[-1]["grad_norm_query_encoder"] > 0
  report = json.loads((w / "eval" / "step_3.json").read_text())
  assert 0.0 <= report["exact_match"] <= 1.0
  assert all(len(e["passages"]) == 2 for e in report["examples"])
