"""RAG losses: parity with HuggingFace RagSequence/RagTokenForGeneration.get_nll, and the maths.

Parity: a tiny random RAG (DPR question encoder + BART generator) built offline; its generator
logits, doc_scores and labels go into our jitted losses; loss and d loss / d doc_scores are
compared with HF's loss and torch autograd.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragjax.objectives import rag_losses as losses

B, K, T, V, L = 3, 4, 7, 29, 6     # batch, passages, target length, vocab, context length
PAD, BOS, EOS = 1, 0, 2             # BART ids
RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def _jit(fn, **static):
  """`fn` jitted with its static keyword arguments closed over (eager dispatch is slow)."""
  return jax.jit(functools.partial(fn, **static))


def J(fn, *args, **static):
  return _jit(fn, **static)(*args)


def _rel(ours, ref):
  """max |ours - ref| / max |ref|: the relative error reported and asserted below."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.fixture(scope="module")
def hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  q_cfg = transformers.DPRConfig(vocab_size=31, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16,
                                 max_position_embeddings=32)
  g_cfg = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=16, decoder_ffn_dim=16,
                                  max_position_embeddings=32, pad_token_id=PAD, bos_token_id=BOS,
                                  eos_token_id=EOS, decoder_start_token_id=EOS,
                                  init_std=0.5)  # peaked logits: passages really differ
  cfg = transformers.RagConfig.from_question_encoder_generator_configs(q_cfg, g_cfg, n_docs=K)
  models = {"sequence": transformers.RagSequenceForGeneration(cfg).eval(),
            "token": transformers.RagTokenForGeneration(cfg).eval()}
  rng = np.random.default_rng(0)
  ctx = torch.tensor(rng.integers(3, V, (B * K, L)))
  ctx_mask = torch.ones_like(ctx)
  ctx_mask[1, 4:] = 0
  scores = (2.0 * rng.standard_normal((B, K))).astype(np.float32)

  def run(kind, labels, *, eps=0.0, reduce_loss=False, **kw):
    """HF loss, the generator logits [B, K, T, V] and d sum(loss) / d doc_scores."""
    model = models[kind]
    model.config.label_smoothing = eps  # HF reads epsilon from the config, not the forward
    ds = torch.tensor(scores, requires_grad=True)
    out = model(context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=ds,
                labels=torch.tensor(labels), reduce_loss=reduce_loss, **kw)
    out.loss.sum().backward()
    n, t, v = out.logits.shape
    assert n == B * K  # RAG-Token: do_marginalize=False (default) gives the raw logits
    return (out.loss.detach().numpy(), out.logits.detach().numpy().reshape(B, K, t, v),
            ds.grad.numpy())

  return run, scores


def _labels(rng, lengths, prefix=(BOS,)):
  """[B, T] decoder inputs `prefix + answer + </s>` padded with PAD (HF passes labels as-is)."""
  out = np.full((len(lengths), T), PAD, np.int64)
  for b, n in enumerate(lengths):
    row = list(prefix) + list(rng.integers(3, V, n)) + [EOS]
    out[b, :len(row)] = row
  return out


def _ours(kind, logits_bktv, scores_bk, labels_bt, reduce, **kw):
  fn = losses.rag_sequence_nll if kind == "sequence" else losses.rag_token_nll
  targets_bt, mask_bt = losses.shift_targets(jnp.asarray(labels_bt), PAD)
  loss = functools.partial(fn, targets_bt=targets_bt, target_mask_bt=mask_bt, reduce=reduce, **kw)
  def total(s_bk, lg_bktv):
    value = loss(lg_bktv, s_bk)
    return jnp.sum(value), value
  (_, value), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(scores_bk, logits_bktv)
  return np.asarray(value), np.asarray(grad)


@pytest.mark.parametrize("kind", ["sequence", "token"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduce_loss", [False, True])
def test_matches_transformers(hf, kind, eps, reduce_loss):
  run, scores = hf
  labels = _labels(np.random.default_rng(1), [5, 2, 1])  # padding in rows 1 and 2
  ref_loss, logits, ref_grad = run(kind, labels, eps=eps, reduce_loss=reduce_loss)
  reduce = "sum" if reduce_loss else "none"
  loss, grad = _ours(kind, logits, scores, labels, reduce, label_smoothing=eps)
  assert loss.shape == ref_loss.shape and loss.dtype == np.float32
  assert _rel(loss, ref_loss) < RTOL, (loss, ref_loss)
  assert _rel(grad, ref_grad) < RTOL, (grad, ref_grad)
  if reduce_loss:  # "mean" is HF's batch sum / B
    mean, _ = _ours(kind, logits, scores, labels, "mean", label_smoothing=eps)
    assert _rel(mean, ref_loss / B) < RTOL


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rag_sequence_exclude_bos_score_matches_transformers(hf, eps):
  run, scores = hf
  labels = _labels(np.random.default_rng(2), [4, 3, 2], prefix=(EOS, BOS))  # targets start <s>
  ref_loss, logits, ref_grad = run("sequence", labels, eps=eps, exclude_bos_score=True)
  loss, grad = _ours("sequence", logits, scores, labels, "none", label_smoothing=eps,
                     exclude_bos_score=True, bos_id=BOS)
  assert _rel(loss, ref_loss) < RTOL and _rel(grad, ref_grad) < RTOL
  plain, _ = _ours("sequence", logits, scores, labels, "none", label_smoothing=eps)
  assert np.all(plain > loss)  # the <s> score was really left out


def test_rag_sequence_hf_drops_prior_for_one_token_targets(hf):
  """HF adds log p(z|x) at target slot 1; a 1-token target pads that slot and loses the prior."""
  run, scores = hf
  labels = _labels(np.random.default_rng(3), [4, 0, 2])
  labels[1, 2] = PAD  # row 1 is "<s> </s>" -> one scored token, slot 1 padded
  ref_loss, logits, ref_grad = run("sequence", labels)
  loss, grad = _ours("sequence", logits, scores, labels, "none", hf_prior_slot=True)
  assert _rel(loss, ref_loss) < RTOL and _rel(grad, ref_grad) < RTOL
  assert np.all(ref_grad[1] == 0)  # HF: no gradient reaches the retriever for that example
  fixed, fixed_grad = _ours("sequence", logits, scores, labels, "none")  # default: eq. 2
  np.testing.assert_allclose(fixed[[0, 2]], ref_loss[[0, 2]], rtol=RTOL)
  targets, mask = losses.shift_targets(jnp.asarray(labels), PAD)
  seq_bk = J(losses.sequence_logprob, logits, targets, mask)
  want = -jax.nn.logsumexp(seq_bk[1] + jax.nn.log_softmax(scores[1]))
  np.testing.assert_allclose(fixed[1], want, rtol=RTOL)
  assert np.abs(fixed_grad[1]).max() > 1e-3


# --------------------------------------------------------------------------- independent maths

# Two passages, two target tokens, three words. p(z|x) = (0.75, 0.25) from scores (log 3, 0).
TOY_P_Z1 = np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]])    # p(v | x, z1, t) for t = 0, 1
TOY_P_Z2 = np.array([[0.1, 0.8, 0.1], [0.25, 0.5, 0.25]])
TOY_Y = np.array([[0, 1]])


def _toy():
  logits = jnp.log(jnp.asarray(np.stack([TOY_P_Z1, TOY_P_Z2])[None], jnp.float32))  # [1,2,2,3]
  return logits, jnp.asarray([[np.log(3.0), 0.0]], jnp.float32), jnp.asarray(TOY_Y), \
      jnp.ones((1, 2), bool)


def test_hand_computed_toy():
  logits, scores, y, mask = _toy()
  # RAG-Sequence: 0.75 * (0.5 * 0.6) + 0.25 * (0.1 * 0.5) = 0.225 + 0.0125 = 0.2375
  seq = J(losses.rag_sequence_nll, logits, scores, y, mask, reduce="none")
  np.testing.assert_allclose(seq, [-np.log(0.2375)], rtol=1e-6)
  # RAG-Token: (0.75 * 0.5 + 0.25 * 0.1) * (0.75 * 0.6 + 0.25 * 0.5) = 0.4 * 0.575 = 0.23
  tok = J(losses.rag_token_nll, logits, scores, y, mask, reduce="none")
  np.testing.assert_allclose(tok, [-np.log(0.23)], rtol=1e-6)
  # RAG-Token smoothing: marginals t0 = (0.4, 0.3875, 0.2125), t1 = (0.2125, 0.575, 0.2125)
  smooth = -(np.log([0.4, 0.3875, 0.2125]).sum() + np.log([0.2125, 0.575, 0.2125]).sum())
  tok_ls = J(losses.rag_token_nll, logits, scores, y, mask, reduce="none", label_smoothing=0.3)
  np.testing.assert_allclose(tok_ls, [0.7 * -np.log(0.23) + 0.3 / 3 * smooth], rtol=1e-6)
  # RAG-Sequence smoothing (HF): -logsumexp_z( sum_t sum_v log p(v|z) + V log p(z) )
  s_z = [np.log(TOY_P_Z1).sum() + 3 * np.log(0.75), np.log(TOY_P_Z2).sum() + 3 * np.log(0.25)]
  seq_ls = J(losses.rag_sequence_nll, logits, scores, y, mask, reduce="none", label_smoothing=0.3)
  want = 0.7 * -np.log(0.2375) + 0.3 / 3 * -np.log(np.exp(s_z).sum())
  np.testing.assert_allclose(seq_ls, [want], rtol=1e-6)
  # top-1 passage is z1: -log(0.5 * 0.6); closed book on z2's logits: -log(0.1 * 0.5)
  np.testing.assert_allclose(J(losses.top1_nll, logits, scores, y, mask), -np.log(0.3), rtol=1e-6)
  np.testing.assert_allclose(J(losses.seq2seq_nll, logits[:, 1], y, mask), -np.log(0.05),
                             rtol=1e-6)


def test_no_general_order_between_token_and_sequence_but_jensen_bounds_both():
  """Neither NLL bounds the other (toy: seq < token; complementary passages: token < seq), but
  by Jensen both are <= E_{z~p(z|x)} NLL(y|x,z), and NLL_seq >= min_z NLL(y|x,z)."""
  logits, scores, y, mask = _toy()
  seq, tok = losses.rag_sequence_nll, losses.rag_token_nll
  assert J(seq, logits, scores, y, mask) < J(tok, logits, scores, y, mask)  # 0.2375 > 0.23
  # z1 explains only token 0, z2 only token 1: sequence marginal ~0, token marginal 0.25
  comp = jnp.log(jnp.asarray([[[[.98, .01, .01], [.01, .01, .98]],
                               [[.01, .01, .98], [.01, .98, .01]]]], jnp.float32))
  even = jnp.zeros((1, 2))
  assert J(tok, comp, even, y, mask) < J(seq, comp, even, y, mask)

  r = np.random.default_rng(0)
  logits = (3.0 * r.standard_normal((64, 5, 6, 11))).astype(np.float32)
  scores = (2.0 * r.standard_normal((64, 5))).astype(np.float32)
  y = r.integers(0, 11, (64, 6))
  mask = np.arange(6)[None] < r.integers(1, 7, (64, 1))
  seq = J(losses.rag_sequence_nll, logits, scores, y, mask, reduce="none")
  tok = J(losses.rag_token_nll, logits, scores, y, mask, reduce="none")
  nll_bk = -J(losses.sequence_logprob, logits, y, mask)
  prior_bk = np.exp(scores - scores.max(1, keepdims=True))
  expected = np.sum(prior_bk / prior_bk.sum(1, keepdims=True) * nll_bk, axis=-1)
  assert np.all(seq <= expected + 1e-4) and np.all(tok <= expected + 1e-4)
  assert np.all(seq >= nll_bk.min(axis=-1) - 1e-4)
  assert np.any(seq < tok) and np.any(tok < seq)
  one = mask.sum(1) == 1  # one scored token: the two models coincide
  np.testing.assert_allclose(seq[one], tok[one], rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_one_passage_and_identical_passages_reduce_to_seq2seq(eps):
  r = np.random.default_rng(1)
  logits_btv = r.standard_normal((4, 5, 13)).astype(np.float32)
  y = r.integers(0, 13, (4, 5))
  mask = np.arange(5)[None] < np.asarray([[5], [3], [1], [4]])
  want = J(losses.seq2seq_nll, logits_btv, y, mask, label_smoothing=eps, reduce="none")
  for k, scores in ((1, jnp.zeros((4, 1))), (3, r.standard_normal((4, 3)).astype(np.float32))):
    stacked = np.repeat(logits_btv[:, None], k, axis=1)
    for fn in (losses.rag_sequence_nll, losses.rag_token_nll, losses.top1_nll):
      got = J(fn, stacked, scores, y, mask, label_smoothing=eps, reduce="none")
      if fn is losses.rag_sequence_nll and k > 1 and eps:
        # HF's RAG-Sequence smoothing term is -logsumexp_z(S + V log p(z|x)), not -S: with equal
        # passages it is offset by -logsumexp_z(V log p(z|x)) >= 0 (0 only for K = 1).
        plain = J(losses.seq2seq_nll, logits_btv, y, mask, reduce="none")
        smooth = (want - (1 - eps) * plain) * 13 / eps
        offset = jax.nn.logsumexp(13 * jax.nn.log_softmax(scores), axis=-1)
        np.testing.assert_allclose(got, (1 - eps) * plain + eps / 13 * (smooth - offset),
                                   rtol=1e-5)
        assert np.all(got > want)
        continue
      np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{fn.__name__} K={k}")


def test_gradient_moves_prior_toward_the_passage_that_explains_the_answer():
  logits, _, y, mask = _toy()  # z1 gives the answer 0.3, z2 gives it 0.05
  scores = jnp.zeros((1, 2))
  for fn in (losses.rag_sequence_nll, losses.rag_token_nll):
    g = jax.jit(jax.grad(lambda s: fn(logits, s, y, mask)))(scores)
    assert g[0, 0] < 0 < g[0, 1], (fn.__name__, g)
    new = scores - 1.0 * g
    assert jax.nn.softmax(new)[0, 0] > 0.5
    assert J(fn, logits, new, y, mask) < J(fn, logits, scores, y, mask)
  # RAG-Sequence: d nll / d scores = p(z|x) - p(z|x,y)   (p(z|x,y) = (0.3, 0.05) / 0.35)
  g = jax.jit(jax.grad(lambda s: losses.rag_sequence_nll(logits, s, y, mask, reduce="sum")))(
      scores)
  np.testing.assert_allclose(g, [[0.5 - 0.3 / 0.35, 0.5 - 0.05 / 0.35]], rtol=1e-5)
  stats = J(losses.marginal_answer_logprob, logits, scores, y, mask)
  np.testing.assert_allclose(g, jnp.exp(stats.log_prior_bk) - jnp.exp(stats.log_posterior_bk),
                             rtol=1e-5)
  # the top-1 baseline cannot train the retriever
  assert np.all(jax.jit(jax.grad(lambda s: losses.top1_nll(logits, s, y, mask)))(scores) == 0)


def test_minus_inf_score_drops_a_passage():
  logits, scores, y, mask = _toy()
  extra = jnp.concatenate([logits, 5.0 + jnp.zeros_like(logits[:, :1])], axis=1)  # [1, 3, 2, 3]
  masked = jnp.concatenate([scores, jnp.full((1, 1), -jnp.inf)], axis=1)
  for fn in (losses.rag_sequence_nll, losses.rag_token_nll):
    for eps in (0.0, 0.1):
      np.testing.assert_allclose(J(fn, extra, masked, y, mask, label_smoothing=eps),
                                 J(fn, logits, scores, y, mask, label_smoothing=eps), rtol=1e-6)
    g = jax.jit(jax.grad(lambda s: fn(extra, s, y, mask)))(masked)
    assert np.all(np.isfinite(g)) and g[0, 2] == 0
  g = jax.jit(jax.grad(lambda s: jnp.sum(losses.retrieval_entropy(s))))(masked)
  assert np.all(np.isfinite(g))


def test_marginal_answer_logprob_and_entropies():
  r = np.random.default_rng(2)
  logits = r.standard_normal((3, 4, 5, 7)).astype(np.float32)
  scores = r.standard_normal((3, 4)).astype(np.float32)
  y = r.integers(0, 7, (3, 5))
  mask = np.arange(5)[None] < np.asarray([[5], [2], [4]])
  s = jax.jit(losses.marginal_answer_logprob)(logits, scores, y, mask)
  np.testing.assert_allclose(s.rag_sequence_logprob_b,
                             -J(losses.rag_sequence_nll, logits, scores, y, mask, reduce="none"),
                             rtol=1e-6)
  np.testing.assert_allclose(s.rag_token_logprob_b,
                             -J(losses.rag_token_nll, logits, scores, y, mask, reduce="none"),
                             rtol=1e-6)
  np.testing.assert_allclose(jnp.exp(s.log_posterior_bk).sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(s.prior_entropy_b, J(losses.retrieval_entropy, scores), rtol=1e-6)
  np.testing.assert_array_equal(s.num_tokens_b, [5, 2, 4])
  assert s.seq_logprob_bk.shape == (3, 4) and s.posterior_entropy_b.shape == (3,)
  np.testing.assert_allclose(J(losses.retrieval_entropy, jnp.zeros((2, 4))), np.log(4), rtol=1e-6)
  np.testing.assert_allclose(J(losses.retrieval_entropy, jnp.asarray([[50.0, 0.0]])), 0, atol=1e-6)


def test_retrieval_log_prior_from_embeddings_or_scores():
  r = np.random.default_rng(3)
  q_bd = r.standard_normal((2, 8)).astype(np.float32)
  p_bkd = r.standard_normal((2, 5, 8)).astype(np.float32)
  logp_bk = losses.retrieval_log_prior(q_bd, p_bkd)
  scores_bk = np.einsum("bd,bkd->bk", np.asarray(q_bd, np.float64), np.asarray(p_bkd, np.float64))
  np.testing.assert_allclose(logp_bk, scores_bk - np.log(np.exp(scores_bk).sum(1, keepdims=True)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.retrieval_log_prior(doc_scores_bk=scores_bk), logp_bk,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="not both"):
    losses.retrieval_log_prior(q_bd, p_bkd, doc_scores_bk=scores_bk)
  with pytest.raises(ValueError, match=r"\[B, K, D\]"):
    losses.retrieval_log_prior(q_bd, p_bkd[:, :, :4])


def test_shift_targets_is_hf_shift():
  labels = jnp.asarray([[0, 5, 6, 2], [0, 7, 2, 1]])
  targets, mask = losses.shift_targets(labels, pad_id=1)
  np.testing.assert_array_equal(targets, [[5, 6, 2, 1], [7, 2, 1, 1]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])


def test_bf16_logits_are_computed_in_float32_and_jit_once():
  r = np.random.default_rng(4)
  logits = jnp.asarray(r.standard_normal((2, 3, 4, 9)), jnp.bfloat16)
  scores = r.standard_normal((2, 3)).astype(np.float32)
  y = r.integers(-100, 9, (2, 4))  # out-of-range ids are fine where masked
  mask = y >= 0
  fn = jax.jit(functools.partial(losses.rag_token_nll, label_smoothing=0.1))
  got = fn(logits, scores, y, mask)
  assert got.dtype == jnp.float32
  want = J(losses.rag_token_nll, logits.astype(jnp.float32), scores, np.where(mask, y, 0), mask,
           label_smoothing=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  fn(logits + 1, scores, y, mask)
  assert fn._cache_size() == 1


def test_get_loss_fn_and_errors():
  logits, scores, y, mask = _toy()
  for name in losses.LOSSES:
    lg = logits[:, :1] if name == "closed_book" else logits
    assert np.isfinite(J(losses.get_loss_fn(name), lg, scores, y, mask, label_smoothing=0.1))
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get_loss_fn("rag")
  with pytest.raises(ValueError, match="reduce"):
    J(losses.rag_token_nll, logits, scores, y, mask, reduce="avg")
  with pytest.raises(ValueError, match="doc_scores shape"):
    J(losses.rag_sequence_nll, logits, scores[:, :1], y, mask)
  with pytest.raises(ValueError, match="targets shape"):
    J(losses.rag_sequence_nll, logits, scores, y[:, :1], mask)
  with pytest.raises(ValueError, match="bos_id"):
    J(losses.rag_sequence_nll, logits, scores, y, mask, exclude_bos_score=True)
