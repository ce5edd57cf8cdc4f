"""Retriever losses (Atlas ADist / EMDR² / PDist / LOOP, DPR) against float64 numpy references.

Every expected value is computed here in numpy, straight from the formula, never with the code
under test; gradients are compared with the analytic d loss / d scores.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragjax.objectives import dpr
from ragjax.objectives import retriever_losses as rl

B, K, T = 3, 5, 4
RTOL = 2e-5


@functools.lru_cache(maxsize=None)
def _jit(fn, nargs, array_names, argnums, static_items):
  """`fn` (or its gradient w.r.t. argnums) jitted: the positional and array keyword arguments
  traced, the other keyword arguments (str, float, None) closed over."""
  def f(*xs):
    return fn(*xs[:nargs], **dict(zip(array_names, xs[nargs:])), **dict(static_items))
  return jax.jit(f if argnums is None else jax.grad(f, argnums=argnums))


def _call(fn, argnums, args, kw):
  arrays = {k: v for k, v in kw.items() if v is not None and not isinstance(v, (str, float, int))}
  static = tuple(sorted((k, v) for k, v in kw.items() if k not in arrays))
  names = tuple(sorted(arrays))
  return _jit(fn, len(args), names, argnums, static)(*args, *[arrays[k] for k in names])


def J(fn, *args, **kw):
  return _call(fn, None, args, kw)


def G(fn, argnums, *args, **kw):
  """d fn / d args[argnums], float64 numpy (a tuple of them for a tuple of argnums)."""
  g = _call(fn, argnums, args, kw)
  if isinstance(argnums, tuple):
    return tuple(np.asarray(x, np.float64) for x in g)
  return np.asarray(g, np.float64)


def JR(fn, reduces, *args, **static):
  """{reduce: fn(*args, reduce=reduce, **static)} from one jitted call (one compilation)."""
  outs = jax.jit(lambda *a: tuple(fn(*a, **static) if r is None else fn(*a, reduce=r, **static)
                                  for r in reduces))(*args)
  return dict(zip(reduces, outs))


def _close(ours, ref, rtol=RTOL):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * max(np.max(np.abs(ref)), 1e-3))


# ------------------------------------------------------------------------ numpy references

def np_softmax(x):
  """float64 softmax of a 1-D array; -inf entries get 0."""
  x = np.asarray(x, np.float64)
  e = np.exp(x - np.max(x))
  return e / e.sum()


def np_kl_ref(scores_bk, target_bk, tr, tt):
  """Per-example KL(p_t || p_r) over the unpadded slots, and p_r, p_t ([B, K], 0 where padded)."""
  scores_bk = np.asarray(scores_bk, np.float64)
  target_bk = np.asarray(target_bk, np.float64)
  kl_b, pr_bk, pt_bk = [], np.zeros_like(scores_bk), np.zeros_like(scores_bk)
  for b in range(scores_bk.shape[0]):
    valid = np.isfinite(scores_bk[b])
    if not valid.any():
      kl_b.append(0.0)
      continue
    pr = np_softmax(scores_bk[b, valid] / tr)
    pt = np_softmax(target_bk[b, valid] / tt)
    kl_b.append(sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, pr) if p > 0))
    pr_bk[b, valid], pt_bk[b, valid] = pr, pt
  return np.array(kl_b), pr_bk, pt_bk


def _case(seed, k=K, scale=1.5):
  rng = np.random.default_rng(seed)
  scores_bk = (scale * rng.standard_normal((B, k))).astype(np.float32)
  scores_bk[0, 3] = -np.inf                      # padded slots
  scores_bk[2, 0] = -np.inf
  target_bk = (2.0 * rng.standard_normal((B, k))).astype(np.float32)
  return scores_bk, target_bk


KL_LOSSES = [  # name, function, target logits the formula puts in the softmax (numpy)
    ("adist", rl.attention_distillation_loss, lambda t: t),
    ("pdist", rl.perplexity_distillation_loss, lambda t: t),
    ("loop", rl.leave_one_out_loss, lambda t: -t),
]
TEMPS = [(1.0, 1.0), (0.5, 2.0), (0.01, 0.01)]


# ------------------------------------------------------------------------ Atlas KL losses

@pytest.mark.parametrize("name,fn,target_logits", KL_LOSSES, ids=[c[0] for c in KL_LOSSES])
def test_kl_losses_value_and_reductions(name, fn, target_logits):
  cases = [(tr, tt) + _case(1, scale=0.1 if tr < 0.1 else 1.5) for tr, tt in TEMPS]
  tr, tt, s_bk, t_bk = cases[-1]
  temps = dict(retriever_temperature=tr, target_temperature=tt)

  @jax.jit
  def run(cases_args):
    per_temp = [fn(s, t, retriever_temperature=a, target_temperature=c, reduce="none")
                for (a, c, _, _), (s, t) in zip(cases, cases_args)]
    s, t = cases_args[-1]
    reduced = {r: fn(s, t, reduce=r, **temps) for r in ("sum", "mean", "elementwise_mean")}
    return per_temp, reduced, fn(s, t, **temps)          # the last one: default reduce
  per_temp, reduced, default = run([(c[2], c[3]) for c in cases])

  for (a, c, s, t), got_b in zip(cases, per_temp):
    kl_b, _, _ = np_kl_ref(s, target_logits(t), a, c)
    assert np.all(kl_b > 0)
    _close(got_b, kl_b, 1e-4 if a < 0.1 else RTOL)
  rtol = 1e-4 if tr < 0.1 else RTOL                      # kl_b: the last temperatures
  _close(reduced["sum"], kl_b.sum(), rtol)
  _close(reduced["mean"], kl_b.sum() / B, rtol)
  # Atlas's reduction, the default: torch.nn.KLDivLoss() (reduction="mean") averages the B*K
  # pointwise terms p_t (log p_t - log p_r)
  _close(reduced["elementwise_mean"], kl_b.sum() / (B * K), rtol)
  _close(default, kl_b.sum() / (B * K), rtol)
  assert default.dtype == jnp.float32 and default.shape == ()


@pytest.mark.parametrize("name,fn,target_logits,reduce,denom", [
    ("adist", *KL_LOSSES[0][1:], "mean", B),
    ("loop", *KL_LOSSES[2][1:], "mean", B),
    ("pdist", *KL_LOSSES[1][1:], "elementwise_mean", B * K),
    ("pdist", *KL_LOSSES[1][1:], "sum", 1),
], ids=["adist-mean", "loop-mean", "pdist-elementwise_mean", "pdist-sum"])
def test_kl_losses_gradients(name, fn, target_logits, reduce, denom):
  tr, tt = 0.5, 2.0
  scores_bk, target_bk = _case(2)
  _, pr_bk, pt_bk = np_kl_ref(scores_bk, target_logits(target_bk), tr, tt)
  static = dict(retriever_temperature=tr, target_temperature=tt, reduce=reduce)
  g_bk, g_target_bk = G(fn, (0, 1), scores_bk, target_bk, **static)
  _close(g_bk, (pr_bk - pt_bk) / tr / denom)
  assert np.all(np.isfinite(g_bk))
  assert g_bk[0, 3] == 0 and g_bk[2, 0] == 0                       # padded slots
  assert np.all(np.abs(g_bk[np.isfinite(scores_bk)]) > 0)
  assert np.all(g_target_bk == 0)                                  # stop_gradient on the target


def test_kl_padding_ignores_target_and_empty_rows():
  scores_bk, target_bk = _case(3)
  other_bk = target_bk.copy()
  other_bk[0, 3] = 50.0                          # a padded slot's target must not matter
  temps = dict(retriever_temperature=1.0, target_temperature=1.0, reduce="none")
  _close(J(rl.perplexity_distillation_loss, scores_bk, other_bk, **temps),
         J(rl.perplexity_distillation_loss, scores_bk, target_bk, **temps))
  scores_bk[1] = -np.inf                         # an all-padded example: 0 loss, 0 gradient
  kl_b, _, _ = np_kl_ref(scores_bk, target_bk, 1.0, 1.0)
  assert kl_b[1] == 0
  _close(J(rl.perplexity_distillation_loss, scores_bk, target_bk, **temps), kl_b)
  g_bk = G(rl.perplexity_distillation_loss, 0, scores_bk, target_bk,
           retriever_temperature=1.0, target_temperature=1.0, reduce="sum")
  assert np.all(np.isfinite(g_bk)) and np.all(g_bk[1] == 0)


def test_loop_sign_removal_that_hurts_most_gets_most_target():
  loo_bk = np.array([[-1.0, -5.0, -2.0]], np.float32)   # removing passage 1 hurts most
  temps = dict(retriever_temperature=1.0, target_temperature=1.0, reduce="sum")
  good = J(rl.leave_one_out_loss, np.array([[0.0, 3.0, 0.0]], np.float32), loo_bk, **temps)
  bad = J(rl.leave_one_out_loss, np.array([[3.0, 0.0, 0.0]], np.float32), loo_bk, **temps)
  assert good < bad
  # scores equal to the target logits: p_retr == p_tgt, KL 0
  assert abs(float(J(rl.leave_one_out_loss, -loo_bk, loo_bk, **temps))) < 1e-6


def test_atlas_default_temperature_and_sqrt_d_scaling():
  # Atlas: scores q·d / sqrt(D), temperature 0.01 on both sides; check one example by hand.
  rng = np.random.default_rng(4)
  d = 16
  q_d, p_kd = rng.standard_normal(d), rng.standard_normal((3, d))
  s_k = (p_kd @ q_d / math.sqrt(d)).astype(np.float32)
  gold_k = np.array([-0.50, -0.52, -0.60], np.float32)     # per-token mean log-likelihoods
  pt = np_softmax(gold_k.astype(np.float64) / 0.01)
  lq = np.log(np_softmax(s_k.astype(np.float64) / 0.01))
  expected = np.sum(pt * (np.log(pt) - lq)) / 3             # KLDivLoss mean over B*K = 1*3
  got = J(rl.perplexity_distillation_loss, s_k[None], gold_k[None], retriever_temperature=0.01,
          target_temperature=0.01)
  _close(got, expected, 1e-4)


# ------------------------------------------------------------------------ ADist aggregation

def np_atlas_aggregate(attn_nbhtkl, vnorm_nbhkl, pmask_bkl, tmask_bt, normalize):
  """Atlas src/fid.py in its own order: per layer mean_h(||v|| * attn) on the [B, T, K*L] key
  axis, reshape to [K, L], mask passages, sum layers, mask labels, sum T and L, normalise."""
  n, b, h, t, k, l = attn_nbhtkl.shape
  per_layer = []
  for layer in range(n):
    a_bhtx = attn_nbhtkl[layer].reshape(b, h, t, k * l).astype(np.float64)
    w_bhx = np.ones((b, h, k * l)) if vnorm_nbhkl is None else \
        vnorm_nbhkl[layer].reshape(b, h, k * l).astype(np.float64)
    per_layer.append((w_bhx[:, :, None, :] * a_bhtx).mean(axis=1))     # [B, T, K*L]
  scores = np.stack(per_layer).reshape(n, b, t, k, l)
  scores = np.where(pmask_bkl[None, :, None], scores, 0.0).sum(axis=0)    # [B, T, K, L]
  scores = np.where(tmask_bt[:, :, None, None], scores, 0.0)
  s_bk = scores.sum(axis=(1, 3))
  ntok_b1 = tmask_bt.sum(axis=1)[:, None]
  if normalize == "sum":
    out = s_bk / (256 * n * ntok_b1)
  else:
    with np.errstate(invalid="ignore", divide="ignore"):
      out = s_bk / (pmask_bkl.sum(axis=2) * n * ntok_b1)
  return np.where(pmask_bkl.sum(axis=2) > 0, out, -np.inf)


def _attn_case(seed=5, n=2, b=2, h=3, t=3, k=3, l=4):
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((n, b, h, t, k * l))
  attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  attn_nbhtkl = attn.reshape(n, b, h, t, k, l).astype(np.float32)
  vnorm_nbhkl = rng.uniform(0.5, 2.0, (n, b, h, k, l)).astype(np.float32)
  pmask_bkl = np.ones((b, k, l), bool)
  pmask_bkl[0, 1, 2:] = False                    # a short passage
  pmask_bkl[1, 2] = False                        # a padded passage slot
  tmask_bt = np.array([[1, 1, 0], [1, 1, 1]], bool)
  return attn_nbhtkl, vnorm_nbhkl, pmask_bkl, tmask_bt


@pytest.mark.parametrize("normalize", ["sum", "avg"])
@pytest.mark.parametrize("with_norms", [True, False])
def test_aggregate_cross_attention(normalize, with_norms):
  attn, vnorm, pmask, tmask = _attn_case()
  vnorm = vnorm if with_norms else None
  ref_bk = np_atlas_aggregate(attn, vnorm, pmask, tmask, normalize)
  got_bk = np.asarray(J(rl.aggregate_cross_attention, attn, pmask, tmask, value_norm_nbhkl=vnorm,
                        normalize=normalize))
  assert got_bk[1, 2] == -np.inf and ref_bk[1, 2] == -np.inf
  fin = np.isfinite(ref_bk)
  _close(got_bk[fin], ref_bk[fin])
  assert np.isfinite(got_bk[fin]).all()
  if normalize == "avg" or not with_norms:
    return
  # one layer given as [B, H, T, K, L]
  got1 = J(rl.aggregate_cross_attention, attn[0], pmask, tmask,
           value_norm_nbhkl=None if vnorm is None else vnorm[0], normalize=normalize)
  ref1 = np_atlas_aggregate(attn[:1], None if vnorm is None else vnorm[:1], pmask, tmask,
                            normalize)
  _close(np.asarray(got1)[fin], ref1[fin])


def test_attention_distillation_end_to_end():
  attn, vnorm, pmask, tmask = _attn_case()
  rng = np.random.default_rng(6)
  scores_bk = rng.standard_normal((2, 3)).astype(np.float32)
  scores_bk[1, 2] = -np.inf                      # the padded passage is padded for both sides
  target_bk = np_atlas_aggregate(attn, vnorm, pmask, tmask, "sum")
  kl_b, pr_bk, pt_bk = np_kl_ref(scores_bk, target_bk, 0.1, 1e-3)

  def loss(s_bk, attn_nbhtkl):
    a_bk = rl.aggregate_cross_attention(attn_nbhtkl, pmask, tmask, value_norm_nbhkl=vnorm)
    return rl.attention_distillation_loss(s_bk, a_bk, retriever_temperature=0.1,
                                          target_temperature=1e-3, reduce="mean")
  value, (g_s, g_attn) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(scores_bk, attn)
  _close(value, kl_b.mean(), 1e-4)
  _close(g_s, (pr_bk - pt_bk) / 0.1 / 2, 1e-4)
  assert np.all(np.asarray(g_attn) == 0)         # the reader gets no gradient


# ------------------------------------------------------------------------ EMDR²

def np_emdr_seq(scores_bk, lp_bk, tr):
  loss_b, grad_bk = [], np.zeros(scores_bk.shape)
  for b in range(scores_bk.shape[0]):
    valid = np.isfinite(scores_bk[b])
    pr = np_softmax(scores_bk[b, valid].astype(np.float64) / tr)
    joint = pr * np.exp(lp_bk[b, valid].astype(np.float64))
    loss_b.append(-math.log(joint.sum()))
    grad_bk[b, valid] = (pr - joint / joint.sum()) / tr
  return np.array(loss_b), grad_bk


def np_emdr_token(scores_bk, lp_bkt, mask_bt, tr):
  loss_b, grad_bk = np.zeros(scores_bk.shape[0]), np.zeros(scores_bk.shape)
  for b in range(scores_bk.shape[0]):
    valid = np.isfinite(scores_bk[b])
    pr = np_softmax(scores_bk[b, valid].astype(np.float64) / tr)
    for t in range(lp_bkt.shape[2]):
      if not mask_bt[b, t]:
        continue
      joint = pr * np.exp(lp_bkt[b, valid, t].astype(np.float64))
      loss_b[b] -= math.log(joint.sum())
      grad_bk[b, valid] += (pr - joint / joint.sum()) / tr
  return loss_b, grad_bk


def test_emdr_sequence():
  scores_bk, _ = _case(7)
  rng = np.random.default_rng(7)
  lp_bk = (-3.0 * rng.uniform(0.1, 2.0, (B, K))).astype(np.float32)
  tr = 0.5
  loss_b, grad_bk = np_emdr_seq(scores_bk, lp_bk, tr)
  out = JR(rl.emdr_loss, ("none", None, "sum"), scores_bk, lp_bk, retriever_temperature=tr)
  _close(out["none"], loss_b)
  _close(out[None], loss_b.mean())                                 # default "mean"
  _close(out["sum"], loss_b.sum())
  g_bk, g_lp_bk = G(rl.emdr_loss, (0, 1), scores_bk, lp_bk, retriever_temperature=tr)
  _close(g_bk, grad_bk / B)
  assert g_bk[0, 3] == 0 and np.all(np.abs(g_bk[np.isfinite(scores_bk)]) > 0)
  assert np.all(g_lp_bk == 0)


def test_emdr_token():
  scores_bk, _ = _case(8)
  rng = np.random.default_rng(8)
  lp_bkt = np.log(rng.uniform(0.01, 1.0, (B, K, T))).astype(np.float32)
  mask_bt = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
  lp_bkt[~np.broadcast_to(mask_bt[:, None], lp_bkt.shape)] = -40.0   # masked: must not matter
  tr = 0.5
  loss_b, grad_bk = np_emdr_token(scores_bk, lp_bkt, mask_bt, tr)
  st = dict(retriever_temperature=tr)
  out = JR(rl.emdr_token_loss, ("none", "sum", "mean", None), scores_bk, lp_bkt, mask_bt, **st)
  _close(out["none"], loss_b)
  _close(out["sum"], loss_b.sum())
  _close(out["mean"], loss_b.mean())
  # Atlas `logprob`: -sum(logsumprobs * mask) / sum(mask), the default
  _close(out[None], loss_b.sum() / mask_bt.sum())
  g_bk, g_lp_bkt = G(rl.emdr_token_loss, (0, 1), scores_bk, lp_bkt, mask_bt, **st)
  _close(g_bk, grad_bk / mask_bt.sum())
  assert g_bk[2, 0] == 0 and np.all(np.abs(g_bk[np.isfinite(scores_bk)]) > 0)
  assert np.all(g_lp_bkt == 0)


def test_emdr_token_equals_sequence_for_one_token():
  scores_bk, _ = _case(9)
  lp_bk = np.log(np.random.default_rng(9).uniform(0.01, 1.0, (B, K))).astype(np.float32)
  ones_bt = np.ones((B, 1), bool)
  tok = JR(rl.emdr_token_loss, ("none", "token_mean"), scores_bk, lp_bk[..., None], ones_bt,
           retriever_temperature=0.7)
  seq = JR(rl.emdr_loss, ("none", "mean"), scores_bk, lp_bk, retriever_temperature=0.7)
  np.testing.assert_allclose(np.asarray(tok["none"]), np.asarray(seq["none"]), rtol=1e-6)
  np.testing.assert_allclose(float(tok["token_mean"]), float(seq["mean"]), rtol=1e-6)
  assert np.all(np.asarray(seq["none"]) > 0)


def test_token_logprobs():
  rng = np.random.default_rng(10)
  logits_bktv = rng.standard_normal((2, 3, 4, 7)).astype(np.float32)
  targets_bt = np.array([[1, 6, 0, -100], [3, 3, 2, 5]], np.int32)
  for temp in (1.0, 0.3):
    x = logits_bktv.astype(np.float64) / temp
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    ref = np.zeros((2, 3, 4))
    for b in range(2):
      for t in range(4):
        y = targets_bt[b, t] if targets_bt[b, t] >= 0 else 0      # Atlas: -100 -> 0
        ref[b, :, t] = logp[b, :, t, y]
    _close(J(rl.token_logprobs, logits_bktv, targets_bt, temperature=temp), ref)


# ------------------------------------------------------------------------ DPR

def np_dpr(q_bd, p_bd, hn_bnd=None, mask_bn=None):
  q_bd, p_bd = q_bd.astype(np.float64), p_bd.astype(np.float64)
  b = q_bd.shape[0]
  cands, valid = list(p_bd), [True] * b
  if hn_bnd is not None:
    for i in range(b):
      for j in range(hn_bnd.shape[1]):
        cands.append(hn_bnd[i, j].astype(np.float64))
        valid.append(True if mask_bn is None else bool(mask_bn[i, j]))
  cands = np.stack(cands)
  loss, correct, grad_q = [], [], np.zeros_like(q_bd)
  for i in range(b):
    logits = np.array([q_bd[i] @ c if v else -np.inf for c, v in zip(cands, valid)])
    m = logits.max()
    lse = m + math.log(np.exp(logits - m).sum())
    loss.append(lse - logits[i])
    correct.append(float(int(np.argmax(logits)) == i))
    probs = np.exp(logits - lse)
    probs[i] -= 1.0
    grad_q[i] = probs @ cands
  return np.array(loss), np.array(correct), grad_q


def test_dpr_hand_2x2():
  q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  p = np.array([[1.0, 2.0], [0.0, 1.0]], np.float32)
  hn = np.array([[[3.0, 0.0]], [[0.0, 0.0]]], np.float32)
  mask = np.array([[False], [True]])

  @jax.jit
  def run(q, p, hn, mask):
    return (dpr.dpr_contrastive_loss(q, p, reduce="none"), dpr.dpr_contrastive_loss(q, p),
            dpr.dpr_contrastive_loss(q, p, hn, hard_negative_mask_bn=mask, reduce="none"),
            dpr.dpr_contrastive_loss(q, p, hn, reduce="none"))
  none, mean, masked, unmasked = run(q, p, hn, mask)
  # row 0: logits [1, 0], positive 1 -> log(1 + e^-1), correct; row 1: [2, 1], positive 1 ->
  # log(e^2 + e) - 1 = log(1 + e), wrong.
  np.testing.assert_allclose(np.asarray(none.loss), [0.31326168751822286, 1.3132616875182228],
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(none.accuracy), [1.0, 0.0])
  np.testing.assert_allclose(float(mean.loss), 0.8132616875182228, rtol=1e-6)
  assert float(mean.accuracy) == 0.5
  # one hard negative each: query 0's [3, 0] masked out, query 1's [0, 0] kept (logit 0 for
  # both queries): row 0 [1, 0, -inf, 0], row 1 [2, 1, -inf, 0].
  e = math.e
  np.testing.assert_allclose(np.asarray(masked.loss),
                             [math.log(e + 2) - 1, math.log(e * e + e + 1) - 1], rtol=1e-6)
  # unmasked, row 0 has a 3 and the hard negative wins
  np.testing.assert_allclose(float(unmasked.loss[0]), math.log(e + 2 + e ** 3) - 1, rtol=1e-6)
  assert float(unmasked.accuracy[0]) == 0.0


def test_dpr_in_batch_duplicate_positive_is_not_a_negative():
  """Queries 0 and 1 share their positive passage (id 7): each one's in-batch copy of it is
  removed; query 2's candidates are untouched. Hand-computed logits q·p."""
  q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  p = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32)   # rows 0, 1: the same vector
  out = jax.jit(lambda q, p, ids: dpr.dpr_contrastive_loss(q, p, positive_ids_b=ids,
                                                           reduce="none"))(
      q, p, np.array([7, 7, 3], np.int32))
  # row 0 logits [2, -inf, 0]; row 1 [-inf, 0, 1] (positive 0); row 2 [2, 2, 1] (positive 1)
  np.testing.assert_allclose(np.asarray(out.loss), [math.log(1 + math.exp(-2)),
                                                    math.log(1 + math.e),
                                                    math.log(2 * math.e ** 2 + math.e) - 1],
                             rtol=1e-6)


def test_dpr_against_numpy():
  rng = np.random.default_rng(11)
  b, n, d = 4, 2, 6
  q = rng.standard_normal((b, d)).astype(np.float32)
  p = (q + 0.8 * rng.standard_normal((b, d))).astype(np.float32)
  hn = rng.standard_normal((b, n, d)).astype(np.float32)
  mask = np.ones((b, n), bool)
  mask[1, 0] = mask[3, 1] = False
  loss, correct, grad_q = np_dpr(q, p, hn, mask)
  assert 0 < correct.mean() < 1 or correct.mean() == 1
  def dpr_fn(q_bd, p_bd, hn_bnd, mask_bn, **kw):
    return dpr.dpr_contrastive_loss(q_bd, p_bd, hn_bnd, hard_negative_mask_bn=mask_bn, **kw)
  outs = JR(dpr_fn, ("none", "sum", None), q, p, hn, mask)
  _close(outs["none"].loss, loss)
  np.testing.assert_array_equal(np.asarray(outs["none"].accuracy), correct)
  _close(outs["sum"].loss, loss.sum())
  assert float(outs["sum"].accuracy) == correct.sum()
  _close(outs[None].loss, loss.mean())                             # default "mean"
  _close(outs[None].accuracy, correct.mean())
  loss0, _, _ = np_dpr(q, p)                                   # in-batch negatives only
  _close(J(dpr.dpr_contrastive_loss, q, p, reduce="none").loss, loss0)

  def f(q_bd, hn_bnd):
    return dpr.dpr_contrastive_loss(q_bd, p, hn_bnd, hard_negative_mask_bn=mask).loss
  g_q, g_hn = jax.jit(jax.grad(f, argnums=(0, 1)))(q, hn)
  _close(g_q, grad_q / b)
  assert np.all(np.asarray(g_hn)[1, 0] == 0) and np.all(np.asarray(g_hn)[3, 1] == 0)
  assert np.all(np.abs(np.asarray(g_hn)[0, 0]) > 0)


def test_exclude_gold_mask():
  cand = np.array([[5, 7, -1, 9], [3, 3, 4, -1], [0, 1, 2, 3]], np.int32)
  gold = np.array([[7, -1], [4, 3], [-1, -1]], np.int32)
  got = np.asarray(J(dpr.exclude_gold_mask, cand, gold))
  np.testing.assert_array_equal(got, [[True, False, False, True],
                                      [False, False, False, False],
                                      [True, True, True, True]])
  assert got.dtype == np.bool_


# ------------------------------------------------------------------------ errors, K, imports

def test_retriever_k_must_match_target_k():
  scores_bk, target_bk = _case(12, k=6)
  reader_target_bk = target_bk[:, :4]
  temps = dict(retriever_temperature=1.0, target_temperature=1.0)
  for fn in (rl.attention_distillation_loss, rl.perplexity_distillation_loss,
             rl.leave_one_out_loss):
    with pytest.raises(ValueError, match="does not match scores_bk"):
      fn(scores_bk, reader_target_bk, **temps)
  kl_b, _, _ = np_kl_ref(scores_bk[:, :4], reader_target_bk, 1.0, 1.0)
  _close(J(rl.perplexity_distillation_loss, scores_bk[:, :4], reader_target_bk, reduce="none",
           **temps), kl_b)
  with pytest.raises(ValueError, match="does not match scores_bk"):
    rl.emdr_loss(scores_bk, reader_target_bk, retriever_temperature=1.0)
  with pytest.raises(ValueError, match="does not match scores_bk"):
    rl.emdr_token_loss(scores_bk, np.zeros((B, 4, 2)), np.ones((B, 2)), retriever_temperature=1.)


def test_errors():
  s, t = _case(13)
  temps = dict(retriever_temperature=1.0, target_temperature=1.0)
  with pytest.raises(ValueError, match="does not match"):
    rl.perplexity_distillation_loss(s, t[:2], **temps)
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    rl.perplexity_distillation_loss(s, t[..., None], **temps)
  with pytest.raises(ValueError, match=r"scores_bk must be \[B, K\]"):
    rl.leave_one_out_loss(s[0], t[0], **temps)
  with pytest.raises(ValueError, match="reduce"):
    rl.attention_distillation_loss(s, t, reduce="batchmean", **temps)
  with pytest.raises(ValueError, match="reduce"):
    rl.emdr_loss(s, t, retriever_temperature=1.0, reduce="token_mean")
  with pytest.raises(ValueError, match="retriever_temperature"):
    rl.perplexity_distillation_loss(s, t, retriever_temperature=0.0, target_temperature=1.0)
  with pytest.raises(ValueError, match="target_temperature"):
    rl.perplexity_distillation_loss(s, t, retriever_temperature=1.0, target_temperature=-1.0)
  with pytest.raises(ValueError, match="target_mask"):
    rl.emdr_token_loss(s, np.zeros((B, K, 2)), np.ones((B, 3)), retriever_temperature=1.0)
  with pytest.raises(ValueError, match="no null baseline"):
    rl.emdr_token_loss(s, np.zeros((B, K, 2)), np.ones((B, 2)), retriever_temperature=1.0,
                       null_baseline=True)
  with pytest.raises(ValueError):
    rl.token_logprobs(np.zeros((2, 3, 4, 5)), np.zeros((2, 5), np.int32))
  attn, vnorm, pmask, tmask = _attn_case()
  with pytest.raises(ValueError, match="passage_mask"):
    rl.aggregate_cross_attention(attn, pmask[:, :2], tmask)
  with pytest.raises(ValueError, match="target_mask"):
    rl.aggregate_cross_attention(attn, pmask, tmask[:, :2])
  with pytest.raises(ValueError, match="value_norm"):
    rl.aggregate_cross_attention(attn, pmask, tmask, value_norm_nbhkl=vnorm[:1])
  with pytest.raises(ValueError, match="normalize"):
    rl.aggregate_cross_attention(attn, pmask, tmask, normalize="mean")
  q = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="positive"):
    dpr.dpr_contrastive_loss(q, np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="hard_negative_bnd"):
    dpr.dpr_contrastive_loss(q, q, np.zeros((3, 1, 3), np.float32))
  with pytest.raises(ValueError, match="without hard_negative_bnd"):
    dpr.dpr_contrastive_loss(q, q, hard_negative_mask_bn=np.ones((2, 1), bool))
  with pytest.raises(ValueError, match="hard_negative_mask_bn"):
    dpr.dpr_contrastive_loss(q, q, np.zeros((2, 2, 3)), hard_negative_mask_bn=np.ones((2, 1)))
  with pytest.raises(ValueError, match="integer"):
    dpr.exclude_gold_mask(np.zeros((2, 3)), np.zeros((2, 1), np.int32))
  with pytest.raises(ValueError, match="gold_ids"):
    dpr.exclude_gold_mask(np.zeros((2, 3), np.int32), np.zeros((3, 1), np.int32))


def test_bf16_inputs_compute_in_float32():
  s, t = _case(14)
  temps = dict(retriever_temperature=1.0, target_temperature=1.0, reduce="none")
  out = J(rl.perplexity_distillation_loss, jnp.asarray(s, jnp.bfloat16),
          jnp.asarray(t, jnp.bfloat16), **temps)
  assert out.dtype == jnp.float32
  s16 = np.asarray(jnp.asarray(s, jnp.bfloat16), np.float64)
  t16 = np.asarray(jnp.asarray(t, jnp.bfloat16), np.float64)
  _close(out, np_kl_ref(s16, t16, 1.0, 1.0)[0])


# ------------------------------------------------------------------------ null baseline

def np_shift_mean(fn, e_k):
  """(1/K) sum_j fn(roll(e, j)): numpy float64, one example, all slots valid."""
  return sum(fn(np.roll(e_k, j)) for j in range(len(e_k))) / len(e_k)


def test_null_baseline_gradient_is_null_mean_minus_target():
  """d loss / d s = (b - t) / T_r with t the target (KL: softmax(target / T_t); EMDR²: the
  posterior) and b its mean over the K cyclic shifts of the evidence; hand-built in numpy."""
  rng = np.random.default_rng(11)
  scores_bk = (1.5 * rng.standard_normal((B, K))).astype(np.float32)
  ev_bk = (2.0 * rng.standard_normal((B, K))).astype(np.float32)
  tr, tt = 0.5, 2.0
  for fn, kw, target in [
      (rl.perplexity_distillation_loss, dict(target_temperature=tt),
       lambda s, e: np_softmax(e / tt)),
      (rl.emdr_loss, {}, lambda s, e: np_softmax(np.log(np_softmax(s / tr)) + e))]:
    g_bk = G(fn, 0, scores_bk, ev_bk, retriever_temperature=tr, reduce="sum",
             null_baseline=True, **kw)
    ref = np.stack([(np_shift_mean(lambda e: target(s, e), e) - target(s, e)) / tr
                    for s, e in zip(scores_bk.astype(np.float64), ev_bk.astype(np.float64))])
    _close(g_bk, ref)
    loss = J(fn, scores_bk, ev_bk, retriever_temperature=tr, reduce="none", null_baseline=True,
             **kw)
    ref_loss = [-np.sum((target(s, e) - np_shift_mean(lambda e: target(s, e), e))
                        * np.log(np_softmax(s / tr)))
                for s, e in zip(scores_bk.astype(np.float64), ev_bk.astype(np.float64))]
    _close(loss, ref_loss)
    assert np.all(G(fn, 1, scores_bk, ev_bk, retriever_temperature=tr, null_baseline=True,
                    **kw) == 0)                             # the evidence gets no gradient


def test_null_baseline_removes_the_flattening_bias_of_noise():
  """The measured collapse: on evidence that is pure noise (exchangeable across passages), the
  EMDR² gradient has a nonzero mean that lowers the top passage's score (E[softmax(s + e)] is
  flatter than softmax(s)); the null-baselined gradient's mean is 0 within its standard error."""
  n, k = 20000, 2
  scores = np.tile(np.array([[np.log(0.84), np.log(0.16)]], np.float32), (n, 1))
  noise = np.random.default_rng(0).normal(0.0, 0.3, (n, k)).astype(np.float32)
  plain = G(rl.emdr_loss, 0, scores, noise, retriever_temperature=1.0, reduce="sum")
  base = G(rl.emdr_loss, 0, scores, noise, retriever_temperature=1.0, reduce="sum",
           null_baseline=True)
  se = lambda g: g[:, 0].std() / np.sqrt(n)
  # descending the plain gradient lowers s_top: mean d loss / d s_top > 0, many errors out
  assert plain[:, 0].mean() > 8 * se(plain), (plain[:, 0].mean(), se(plain))
  assert abs(base[:, 0].mean()) < 3 * se(base), (base[:, 0].mean(), se(base))
  # and a reader that prefers the passage it read still moves the retriever towards it
  informative = noise + np.array([[0.0, 2.0]], np.float32)
  g = G(rl.emdr_loss, 0, scores, informative, retriever_temperature=1.0, reduce="sum",
        null_baseline=True)
  assert g[:, 1].mean() < -0.1 and g[:, 0].mean() > 0.1
