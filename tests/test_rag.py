"""RAG model end to end against transformers' RagTokenForGeneration / RagSequenceForGeneration.

A tiny random RAG (DPR question encoder with a projection + BART generator) is built offline;
its question encoder and generator are saved as safetensors and loaded into our `RagModel`. Both
sides get the same context_input_ids, context_attention_mask and doc_scores: losses, d loss /
d doc_scores and parameter gradients, doc scores from the question encoder, RAG-Token beam
search and RAG-Sequence thorough decoding are compared; fast decoding and the unquirked thorough
decoding are checked against brute force.
"""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import rag_helpers
from ragjax.decoding import rag as rag_decoding
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.models import rag
from ragjax.retrieval import topk

from conftest import TINY_VOCAB

B, K, L, LQ, MAX_NEW = 3, 3, 10, 7, 8
PAD, BOS, EOS = 1, 0, 2
RTOL = 1e-5
LOGIT_SCALE, EOS_BIAS = 10.0, 1.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel(ours, ref):
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """HF RAG-Token and RAG-Sequence models with the same weights, our model and params, inputs."""
  torch.manual_seed(0)
  q_cfg = transformers.DPRConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=24,
                                 max_position_embeddings=32, projection_dim=8)
  # A generating BART whose output depends on the passage: small token embeddings (the tied
  # head must not echo the input, as in tests/test_decoding.py) but encoder positions shrunk
  # alike (so encoder states still depend on the tokens), stronger cross-attention values,
  # sharper logits (last LayerNorm scaled) and an EOS bias, so that hypotheses differ across
  # passages and beams and end at various steps, and posteriors differ from priors (well
  # conditioned d loss / d doc_scores).
  g_cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=48, decoder_ffn_dim=48,
                                  max_position_embeddings=40, init_std=0.1)
  cfg = transformers.RagConfig.from_question_encoder_generator_configs(q_cfg, g_cfg, n_docs=K)
  hf_tok = transformers.RagTokenForGeneration(cfg).eval()
  gen = hf_tok.rag.generator
  with torch.no_grad():
    gen.model.shared.weight.mul_(0.1)
    gen.model.encoder.embed_positions.weight.mul_(0.1)
    for layer in gen.model.decoder.layers:
      layer.encoder_attn.v_proj.weight.mul_(3.0)
      layer.encoder_attn.out_proj.weight.mul_(3.0)
    gen.model.decoder.layers[-1].final_layer_norm.weight.mul_(LOGIT_SCALE)
    gen.model.decoder.layers[-1].final_layer_norm.bias.mul_(LOGIT_SCALE)
    gen.final_logits_bias[0, EOS] = EOS_BIAS
  hf_seq = transformers.RagSequenceForGeneration(cfg).eval()
  hf_seq.rag.load_state_dict(hf_tok.rag.state_dict())
  qdir, gdir = tmp_path_factory.mktemp("question_encoder"), tmp_path_factory.mktemp("generator")
  hf_tok.rag.question_encoder.save_pretrained(qdir, safe_serialization=True)
  hf_tok.rag.generator.save_pretrained(gdir, safe_serialization=True)
  model, params = rag_helpers.load_rag(qdir, gdir)

  rng = np.random.default_rng(0)
  ctx = rng.integers(3, 64, (B, K, L)).astype(np.int32)
  ctx_mask = np.ones_like(ctx)
  ctx_mask[0, 1, 6:] = 0
  ctx_mask[2, 0, 4:] = 0
  ctx[ctx_mask == 0] = PAD  # right padding, as the retriever's tokenizer does
  ctx[1, 2] = ctx[1, 0]  # one passage retrieved twice: its hypotheses are duplicates
  qids = rng.integers(3, 40, (B, LQ)).astype(np.int32)
  qmask = np.ones_like(qids)
  qmask[1, 5:] = 0
  qids[qmask == 0] = 0
  embeds = rng.standard_normal((B, K, 8)).astype(np.float32)
  scores = (1.5 * rng.standard_normal((B, K))).astype(np.float32)
  # HF convention: labels start with the decoder start token; position 1 of the targets is a
  # real token in every row (see losses.rag_sequence_nll's hf_prior_slot).
  labels = np.array([[EOS, BOS, 7, 9, 11, EOS, PAD],
                     [EOS, BOS, 30, 31, 5, 6, EOS],
                     [EOS, BOS, 40, EOS, PAD, PAD, PAD]], np.int32)
  return types.SimpleNamespace(hf_tok=hf_tok, hf_seq=hf_seq, model=model, params=params, ctx=ctx,
                               ctx_mask=ctx_mask, qids=qids, qmask=qmask, embeds=embeds,
                               scores=scores, labels=labels)


def _t(x):
  return torch.tensor(np.asarray(x))


def _flat(x):
  return _t(np.asarray(x).reshape(B * K, -1))


def test_doc_scores_from_question_encoder_match_transformers(setup):
  s = setup
  with torch.no_grad():
    q = s.hf_tok.rag.question_encoder(_t(s.qids).long(), attention_mask=_t(s.qmask))[0]
    ref = torch.bmm(q.unsqueeze(1), _t(s.embeds).transpose(1, 2)).squeeze(1).numpy()
  batch = dict(query_input_ids=s.qids, query_attention_mask=s.qmask, passage_embeddings=s.embeds)
  ours = jax.jit(functools.partial(rag.batch_doc_scores, s.model))(s.params, batch)
  assert ours.shape == (B, K) and ours.dtype == jnp.float32
  assert _rel(ours, ref) < RTOL, _rel(ours, ref)


def _hf_loss(hf, s, doc_scores, eps):
  hf.config.label_smoothing = eps
  try:
    return hf(context_input_ids=_flat(s.ctx).long(), context_attention_mask=_flat(s.ctx_mask),
              doc_scores=doc_scores, labels=_t(s.labels).long()).loss
  finally:
    hf.config.label_smoothing = 0.0


def _loss_and_grad(model, loss_name, eps, wrt):
  """Jitted (per-example loss [B], aux, d sum(loss) / d batch[wrt] or d / d params if None)."""
  def total(params, floats, rest):
    loss_b, aux = rag.rag_loss(model, params, {**floats, **rest}, loss_name, eps, reduce="none")
    return jnp.sum(loss_b), (loss_b, aux)

  def run(params, batch):
    floats = {wrt: batch[wrt]} if wrt else {}
    rest = {k: v for k, v in batch.items() if k not in floats}
    grads, (loss_b, aux) = jax.grad(total, argnums=1 if wrt else 0, has_aux=True)(
        params, floats, rest)
    return loss_b, aux, grads[wrt] if wrt else grads
  return jax.jit(run)


@pytest.mark.parametrize("kind,eps", [("sequence", 0.0), ("token", 0.1)])
def test_losses_and_doc_score_gradients_match_transformers(setup, kind, eps):
  """Same doc_scores (requires_grad) and labels: per-example loss and d loss / d doc_scores."""
  s = setup
  hf = s.hf_seq if kind == "sequence" else s.hf_tok
  scores_t = _t(s.scores).requires_grad_(True)
  ref = _hf_loss(hf, s, scores_t, eps)
  ref.sum().backward()
  batch = dict(context_input_ids=s.ctx, context_attention_mask=s.ctx_mask, labels=s.labels,
               doc_scores=s.scores)
  loss_b, aux, d_scores = _loss_and_grad(s.model, f"rag_{kind}", eps, "doc_scores")(s.params,
                                                                                    batch)
  assert loss_b.shape == (B,)
  assert _rel(loss_b, ref.detach().numpy()) < RTOL, _rel(loss_b, ref.detach().numpy())
  assert _rel(d_scores, scores_t.grad.numpy()) < RTOL, _rel(d_scores, scores_t.grad.numpy())
  assert np.abs(scores_t.grad.numpy()).max() > 1e-2  # posteriors differ from priors
  assert np.isfinite([float(v) for v in aux.values()]).all()
  assert 0.0 < float(aux["retrieval_entropy"]) < np.log(K)
  assert 0.0 < float(aux["posterior_entropy"]) < np.log(K)


def test_live_retriever_gradients_match_transformers(setup):
  """Doc scores computed inside the jitted loss from the LIVE query encoder and passages
  re-encoded by the passage tower (here a copy of the question encoder): jax.grad reaches the
  query encoder, the passage encoder and the generator (non-zero), and equals torch autograd of
  HF's loss on the same graph (doc_scores = bmm(q(x), d(z)))."""
  import copy
  s = setup
  hf = s.hf_tok
  passage_encoder = copy.deepcopy(hf.rag.question_encoder)
  p_ids, p_mask = s.ctx[..., :6] % 40, s.ctx_mask[..., :6]
  hf.zero_grad()
  q = hf.rag.question_encoder(_t(s.qids).long(), attention_mask=_t(s.qmask))[0]
  d = passage_encoder(_flat(p_ids).long(), attention_mask=_flat(p_mask))[0].view(B, K, -1)
  ref = _hf_loss(hf, s, torch.bmm(q.unsqueeze(1), d.transpose(1, 2)).squeeze(1), 0.0)
  ref.sum().backward()

  q_params = s.params["bi_encoder"]["query_encoder"]
  params = rag_helpers.assemble_params(q_params, s.params["generator"], q_params)
  shapes = jax.eval_shape(lambda: rag.init_params(s.model, jax.random.key(0)))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  batch = dict(context_input_ids=s.ctx, context_attention_mask=s.ctx_mask, labels=s.labels,
               query_input_ids=s.qids, query_attention_mask=s.qmask, passage_input_ids=p_ids,
               passage_attention_mask=p_mask)
  loss_b, _, grads = _loss_and_grad(s.model, "rag_token", 0.0, None)(params, batch)
  assert _rel(loss_b, ref.detach().numpy()) < RTOL, _rel(loss_b, ref.detach().numpy())
  pairs = []  # (ours, HF parameter, is a torch Linear weight [out, in])
  for tower, net in (("query_encoder", hf.rag.question_encoder), ("passage_encoder",
                                                                   passage_encoder)):
    g, bert = grads["bi_encoder"][tower], net.question_encoder.bert_model
    pairs += [(g["embeddings"]["word_embeddings"]["embedding"],
               bert.embeddings.word_embeddings.weight, False),
              (g["layer_1"]["output"]["kernel"], bert.encoder.layer[1].output.dense.weight, True),
              (g["encode_proj"]["kernel"], net.question_encoder.encode_proj.weight, True)]
  gen, hf_gen = grads["generator"], hf.rag.generator.model
  pairs += [(gen["shared"]["embedding"], hf_gen.shared.weight, False),
            (gen["encoder"]["layer_0"]["mlp"]["wi"]["kernel"], hf_gen.encoder.layers[0].fc1.weight,
             True),
            (gen["decoder"]["layer_1"]["cross_attn"]["out"]["bias"],
             hf_gen.decoder.layers[1].encoder_attn.out_proj.bias, False)]
  for ours, param, linear in pairs:
    want = param.grad.numpy().T if linear else param.grad.numpy().copy()
    ours = np.array(ours)
    if param.shape[0] in (40, 64) and not linear:  # torch Embedding(padding_idx) freezes the
      pad = 0 if param.shape[0] == 40 else PAD     # pad row (DPR: 0, BART: 1); ours trains it
      want[pad], ours[pad] = 0.0, 0.0
    assert np.abs(want).max() > 0 and np.abs(ours).max() > 0
    assert _rel(ours, want) < RTOL, _rel(ours, want)
  hf.zero_grad()


def _pad_to(seq, length):
  out = np.full((seq.shape[0], length), PAD, np.int64)
  out[:, :seq.shape[1]] = seq
  return out


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_generate_matches_transformers(setup, num_beams):
  s = setup
  with torch.no_grad():  # (HF's RAG-Token generate ignores max_new_tokens: give max_length)
    ref = s.hf_tok.generate(context_input_ids=_flat(s.ctx).long(),
                            context_attention_mask=_flat(s.ctx_mask), doc_scores=_t(s.scores),
                            num_beams=num_beams, max_length=1 + MAX_NEW, do_sample=False,
                            return_dict_in_generate=True, output_scores=True)
  out = rag_decoding.rag_token_generate(s.model, s.params, s.ctx, s.ctx_mask, s.scores,
                                        num_beams=num_beams, max_new_tokens=MAX_NEW)
  ours = np.asarray(out.sequences)
  assert ours.shape == (B, 1 + MAX_NEW) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, _pad_to(ref.sequences.numpy(), 1 + MAX_NEW))
  assert len({tuple(r) for r in ours}) == B  # not a degenerate model: rows differ
  ends = [(row[1:] == EOS).argmax() for row in ours]
  assert len(set(ends)) > 1, ours  # hypotheses end at different steps
  if num_beams > 1:
    np.testing.assert_allclose(out.scores, ref.sequences_scores.numpy(), rtol=RTOL, atol=1e-6)


def test_rag_sequence_thorough_matches_transformers(setup):
  """hf_compat=True reproduces HF's rescoring and its unmasked per-passage search; the two best
  hypotheses, best first, equal HF's `num_return_sequences=2` output."""
  s = setup
  with torch.no_grad():
    ref = s.hf_seq.generate(context_input_ids=_flat(s.ctx).long(),
                            context_attention_mask=_flat(s.ctx_mask), doc_scores=_t(s.scores),
                            num_beams=2, max_new_tokens=MAX_NEW, do_deduplication=True,
                            num_return_sequences=2)
  out = rag_decoding.rag_sequence_generate(
      s.model, s.params, s.ctx, s.ctx_mask, s.scores, mode="thorough", num_beams=2,
      max_new_tokens=MAX_NEW, num_return_sequences=2, hf_compat=True)
  assert out.sequences.shape == (B, 2, 1 + MAX_NEW) and out.candidates.shape == (B, K * 2, 1 +
                                                                                  MAX_NEW)
  np.testing.assert_array_equal(np.asarray(out.sequences).reshape(B * 2, -1),
                                _pad_to(ref.numpy(), 1 + MAX_NEW))
  # The winner is not simply the first passage's best beam in every example.
  best = np.asarray(jnp.argmax(out.candidate_scores, axis=1))
  assert (best != 0).any(), best


def _brute_force_logprob(hf_gen, ctx_kl, mask_kl, cand_t):
  """log p_theta(y | x, z_k) for every passage k by a plain torch forward pass: `[K]`."""
  dec = _t(np.tile(cand_t[None], (K, 1))).long()
  with torch.no_grad():
    logits = hf_gen(input_ids=_t(ctx_kl).long(), attention_mask=_t(mask_kl),
                    decoder_input_ids=dec).logits
  logp = torch.log_softmax(logits.double(), -1).numpy()
  tgt = np.concatenate([cand_t[1:], [PAD]])
  tok = logp[:, np.arange(len(tgt)), tgt]
  return (tok * (tgt != PAD)).sum(-1)


def test_rag_sequence_thorough_and_fast_against_brute_force(setup):
  """Without forced tokens: thorough picks argmax_y sum_z p(z|x) p(y|x,z) over the candidate set
  (scores checked by brute force); fast uses the same candidates, scores y with only the passages
  whose beams produced it (so fast <= thorough, equal when every passage produced y)."""
  s = setup
  kw = dict(num_beams=2, max_new_tokens=MAX_NEW, forced_eos_token_id=None, num_return_sequences=2)
  thorough = rag_decoding.rag_sequence_generate(s.model, s.params, s.ctx, s.ctx_mask, s.scores,
                                                mode="thorough", **kw)
  fast = rag_decoding.rag_sequence_generate(s.model, s.params, s.ctx, s.ctx_mask, s.scores,
                                            mode="fast", **kw)
  np.testing.assert_array_equal(thorough.candidates, fast.candidates)
  gen = s.hf_seq.rag.generator
  prior = np.asarray(jax.nn.log_softmax(s.scores.astype(np.float64), axis=-1))
  merged = 0  # hypotheses produced by several passages (example 1 retrieves a passage twice)
  for b in range(B):
    cands = np.asarray(thorough.candidates[b])
    th, fa = np.asarray(thorough.candidate_scores[b]), np.asarray(fast.candidate_scores[b])
    unique = {}
    for c, row in enumerate(cands):
      unique.setdefault(tuple(row), []).append(c)
    brute = {}
    for seq, where in unique.items():
      joint_k = prior[b] + _brute_force_logprob(gen, s.ctx[b], s.ctx_mask[b], np.array(seq))
      brute[seq] = np.logaddexp.reduce(joint_k)
      first, rest = where[0], where[1:]
      assert np.isclose(th[first], brute[seq], atol=1e-4), (th[first], brute[seq])
      assert np.isneginf(th[rest]).all() and np.isneginf(fa[rest]).all()  # deduplicated
      docs = sorted({c // 2 for c in where})
      merged += len(docs) > 1
      assert np.isclose(fa[first], np.logaddexp.reduce(joint_k[docs]), atol=1e-4)
      assert fa[first] <= th[first] + 1e-5
    ranked = sorted(brute.values(), reverse=True)
    np.testing.assert_allclose(np.asarray(thorough.scores[b]), ranked[:2], atol=1e-4)
    assert tuple(np.asarray(thorough.sequences[b, 0])) == max(brute, key=brute.get)
    assert np.allclose(np.asarray(fast.scores[b]), np.sort(fa)[::-1][:2])
    assert len(set(map(tuple, np.asarray(thorough.sequences[b])))) == 2  # deduplicated
  assert merged > 0


def test_device_top_k_is_exact():
  rng = np.random.default_rng(1)
  corpus = rng.standard_normal((257, 8)).astype(np.float32)
  queries = rng.standard_normal((5, 8)).astype(np.float32)
  top = jax.jit(topk.device_top_k, static_argnames=("k", "chunk"))(queries, corpus, k=4, chunk=64)
  ref = np.argsort(-(queries @ corpus.T), axis=1)[:, :4]
  np.testing.assert_array_equal(top.doc_ids, ref)
  np.testing.assert_allclose(top.scores, np.take_along_axis(queries @ corpus.T, ref, 1),
                             rtol=1e-5)
  np.testing.assert_array_equal(top.embeddings, corpus[ref])
  with pytest.raises(ValueError, match="k=300"):
    topk.device_top_k(queries, corpus, k=300)


DOCS = [{"title": ['"Paris"', "Lon  don"], "text": ["the city of light", "the cat  sat"]},
        {"title": ["Tokyo", '"quoted" title"'],
         "text": ["a very long passage about the capital that will not fit in the length", "x"]}]
QUESTIONS = ["who is in the hat?", "where  is it"]


def _hf_postprocess(tokenizer, prefix, max_length):
  """HF `RagRetriever.postprocess_docs`, called without building an index."""
  from transformers.models.rag.retrieval_rag import RagRetriever
  fake = types.SimpleNamespace(config=transformers.RagConfig(max_combined_length=max_length),
                               generator_tokenizer=tokenizer)
  return RagRetriever.postprocess_docs(fake, DOCS, QUESTIONS, prefix, 2, return_tensors="np")


def _ours(tokenizer, prefix, max_length, **kw):
  ids, mask = rag_helpers.build_context_inputs([d["title"] for d in DOCS], [d["text"] for d in DOCS],
                                       QUESTIONS, tokenizer, max_length, prefix=prefix, **kw)
  assert ids.shape == mask.shape == (2, 2, max_length) and ids.dtype == np.int32
  return ids.reshape(4, max_length), mask.reshape(4, max_length)


@pytest.mark.parametrize("prefix", [None, "question: "])
def test_context_inputs_match_hf_postprocess_docs_bart_bpe(prefix):
  """A byte-level BPE (BART) tokenizer built offline; our input is its `tokenizers` backend."""
  import tokenizers
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  for ch in sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()):
    vocab[ch] = len(vocab)
  merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("Ġ", "c")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<mask>"] = len(vocab)
  hf_tok = transformers.BartTokenizer(vocab=vocab, merges=merges)
  backend = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
  backend.no_padding()
  backend.no_truncation()
  for max_length in (24, 64):
    ref_ids, ref_mask = _hf_postprocess(hf_tok, prefix, max_length)
    ids, mask = _ours(backend, prefix, max_length, pad_id=PAD)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
  assert (ref_mask[:, -1] == 0).any() and (ref_mask[:, -1] == 1).any()  # both cases covered
  with pytest.raises(ValueError, match="padding or truncation"):
    hf_tok(["x"], max_length=8, padding="max_length", truncation=True)  # sets them on backend
    _ours(hf_tok.backend_tokenizer, prefix, 8, pad_id=PAD)


def test_context_inputs_match_hf_postprocess_docs_wordpiece(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
  hf_tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(TINY_VOCAB)})
  ours_tok = WordPieceTokenizer.from_dir(tmp_path, max_length=64)
  ref_ids, ref_mask = _hf_postprocess(hf_tok, None, 16)
  ids, mask = _ours(ours_tok, None, 16)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  strings = rag_helpers.context_strings([d["title"] for d in DOCS], [d["text"] for d in DOCS], QUESTIONS)
  assert strings[0] == ["Paris / the city of light // who is in the hat?",
                        "Lon don / the cat sat // who is in the hat?"]
  assert strings[1][1] == 'quoted" title / x // where is it'
