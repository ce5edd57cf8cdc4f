"""Retriever training objectives: Atlas's four reader-to-retriever losses (DPR's contrastive
loss is in `ragjax.objectives.dpr`).

Papers:
  * Izacard et al. 2022, "Atlas: Few-shot Learning with Retrieval Augmented Language Models"
    (arXiv:2208.03299), §2.2 "Training objectives for the retriever": Attention Distillation
    (ADist), EMDR², Perplexity Distillation (PDist), Leave-one-out Perplexity Distillation (LOOP).
    Reference implementation: facebookresearch/atlas `src/atlas.py` (`Atlas.forward`,
    `kldivloss`, `logprob`, `perplexity_score`, `loop_score`, `eval_score`) and `src/fid.py`
    (`cross_attention_forward`, `FiD.aggregate_value`).

Atlas's distillation losses share one form. With the retriever's scores s_k = q·d_k over the K
passages of an example and a target t_k computed by the reader (under stop-gradient),
    p_retr(k) = softmax_k(s_k / retriever_temperature)     (Atlas `temperature_score`)
    p_tgt(k)  = softmax_k(t_k / target_temperature)        (Atlas `temperature_gold`)
    loss_b    = KL(p_tgt || p_retr) = sum_k p_tgt(k) (log p_tgt(k) - log p_retr(k))
and d loss_b / d s_k = (p_retr(k) - p_tgt(k)) / retriever_temperature. The objectives differ
only in the target t_k:
    ADist: the reader's cross-attention mass on passage k (`aggregate_cross_attention`)
    PDist: log p_LM(a | q, d_k), the answer log-likelihood given passage k alone
    LOOP:  -log p_LM(a | q, D \\ {d_k}), the answer NLL when passage k is left out
EMDR² is not a KL: loss_b = -log sum_k p_retr(k) p_LM(a | q, d_k) (`emdr_loss`, `emdr_token_loss`).

Conventions (as the RAG marginal losses in `rag_losses.py`):
  * `scores_bk` [B, K] are raw retrieval scores q·d, any float dtype, WITH gradient; all
    arithmetic is float32. -inf marks a padded slot: zero retriever AND target mass there, no
    gradient, whatever the target holds in that slot. An example whose slots are all padded (or
    whose target is -inf on every unpadded slot) contributes 0 loss and 0 gradient.
  * Targets (`attention_scores_bk`, `seq_logprob_bk`, `loo_logprob_bk`, `token_logprob_bkt`)
    are put under `jax.lax.stop_gradient` here: only the retriever learns from these losses.
  * K: the targets are computed over whatever K the target tensor has, and `scores_bk` must
    cover exactly those passages (same [B, K]). Atlas scores the retriever's
    `retriever_n_context` passages with the reader for the target (only the "std" ADist mode
    uses the reader's own `n_context` training passages, slicing the retriever side to match):
    when the retriever keeps K_r > K_reader passages, either compute the target over all K_r,
    or slice `scores_bk[:, :K_reader]`. Mismatched shapes raise ValueError.
  * Atlas divides q·d by sqrt(D) before the temperature (`retriever_score / np.sqrt(
    query_emb.size(-1))` in `Atlas.forward`); these losses take the scores as given, so pass
    `scores_bk / sqrt(D)` (or retriever_temperature * sqrt(D)) to reproduce Atlas.
    Atlas's default temperatures are 0.01 for both (`src/options.py`).
  * Temperatures, `reduce` and the other keyword flags are static Python values: close over
    them (functools.partial) rather than passing them as traced arguments.
  * reduce, KL losses: "none" -> [B] per-example KL; "sum" -> their sum; "mean" -> sum / B (the
    true batch-mean KL, torch's reduction="batchmean"); "elementwise_mean" -> sum / (B * K),
    what Atlas computes: `torch.nn.KLDivLoss()` (default reduction="mean") averages the B*K
    pointwise terms p_tgt (log p_tgt - log p_retr), so its loss and gradient are 1/K of the
    batch-mean KL. The default is "elementwise_mean" (Atlas's value).

It imports only jax, the standard library and `ragjax.objectives.reduce`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ragjax.objectives.reduce import REDUCTIONS, check_reduce, reduce_loss

_KL_REDUCTIONS = REDUCTIONS + ("elementwise_mean",)
_TOKEN_REDUCTIONS = REDUCTIONS + ("token_mean",)
_NORMALIZE = ("sum", "avg")
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------- helpers

def _check_temperature(name, value):
  """Static positivity check; a traced temperature is left unchecked."""
  if isinstance(value, bool) or (isinstance(value, (int, float)) and not value > 0):
    raise ValueError(f"{name} must be a positive float, got {value!r}")


def _scores(scores_bk):
  scores_bk = jnp.asarray(scores_bk)
  if scores_bk.ndim != 2:
    raise ValueError(f"scores_bk must be [B, K], got shape {scores_bk.shape}")
  return scores_bk.astype(jnp.float32)


def _check_same_bk(scores_bk, target, name):
  if target.ndim < 2 or target.shape[:2] != scores_bk.shape:
    raise ValueError(
        f"{name} shape {target.shape} does not match scores_bk {scores_bk.shape} on [B, K]: the "
        f"target is computed over the passages it holds and the retriever scores must cover "
        f"exactly those (slice scores_bk[:, :K] to the reader's K, or score all K_r passages "
        f"with the reader)")


def _retriever_log_prior(scores_bk, valid_bk, row_ok_b, retriever_temperature):
  """log p_retr [B, K] float32 over the valid slots (all K, score 0, in rows without one)."""
  s_bk = jnp.where(row_ok_b[:, None], scores_bk, 0.0) / retriever_temperature
  use_bk = valid_bk | ~row_ok_b[:, None]
  return jax.nn.log_softmax(jnp.where(use_bk, s_bk, -jnp.inf), axis=-1), use_bk


def _kl_loss(scores_bk, target_bk, target_name, retriever_temperature, target_temperature,
             reduce, null_baseline=False):
  """KL(softmax(target / T_t) || softmax(scores / T_r)) per example, reduced (module docstring);
  with `null_baseline`, `null_baselined` of that target instead."""
  check_reduce(reduce, _KL_REDUCTIONS)
  _check_temperature("retriever_temperature", retriever_temperature)
  _check_temperature("target_temperature", target_temperature)
  scores_bk = _scores(scores_bk)
  target_bk = jnp.asarray(target_bk)
  if target_bk.ndim != 2:
    raise ValueError(f"{target_name} must be [B, K], got shape {target_bk.shape}")
  _check_same_bk(scores_bk, target_bk, target_name)
  target_bk = jax.lax.stop_gradient(target_bk.astype(jnp.float32))

  valid_bk = scores_bk > -jnp.inf                                         # padded slot: -inf
  row_ok_b = jnp.any(valid_bk & (target_bk > -jnp.inf), axis=-1)
  logp_retr_bk, use_bk = _retriever_log_prior(scores_bk, valid_bk, row_ok_b,
                                              retriever_temperature)
  t_bk = jnp.where(row_ok_b[:, None], target_bk, 0.0) / target_temperature
  logp_tgt_bk = jax.nn.log_softmax(jnp.where(use_bk, t_bk, -jnp.inf), axis=-1)
  p_tgt_bk = jnp.exp(logp_tgt_bk)
  if null_baseline:
    null_bk = _shift_mean(lambda t: jax.nn.softmax(jnp.where(use_bk, t, -jnp.inf), axis=-1),
                          t_bk)
    loss_b = null_baselined(p_tgt_bk, null_bk, logp_retr_bk)
    return reduce_loss(jnp.where(row_ok_b, loss_b, 0.0), reduce, p_tgt_bk.size)
  pos_bk = p_tgt_bk > 0                    # 0 * log 0 = 0 (torch's xlogy); no inf - inf
  kl_bk = p_tgt_bk * (jnp.where(pos_bk, logp_tgt_bk, 0.0) - jnp.where(pos_bk, logp_retr_bk, 0.0))
  kl_b = jnp.where(row_ok_b, jnp.sum(kl_bk, axis=-1), 0.0)
  return reduce_loss(kl_b, reduce, kl_bk.size)


def _shift_mean(target_fn, evidence_bk):
  """(1/K) sum_j target_fn(roll(evidence_bk, j)) over the K cyclic shifts of the passages'
  evidence `[B, K]`: the target's expectation when the evidence is exchangeable across the K
  passages (the null that the reader's evidence does not depend on which passage it read),
  exact in expectation under that null for any K. Stop-gradient."""
  k = evidence_bk.shape[1]
  shifted = [target_fn(jnp.roll(evidence_bk, j, axis=1)) for j in range(k)]
  return jax.lax.stop_gradient(sum(shifted) / k)


def null_baselined(target_bk: jax.Array, null_bk: jax.Array, log_prior_bk: jax.Array) -> jax.Array:
  """The null-baselined retriever objective per example, `[B]` float32:
      loss_b = -sum_k (t_k - b_k) log p_retr(k),   d loss_b / d s_k = (b_k - t_k) / T_r
  where t `[B, K]` is the objective's target distribution (KL losses: softmax(target / T_t);
  EMDR²: the posterior p(k | q, a) ∝ p_retr(k) p_LM(a | q, d_k)), b `[B, K]` its mean when the
  reader's evidence is moved to the other passages (`_shift_mean`: the K cyclic shifts), and
  log p_retr `[B, K]` the retriever's log-softmax (with gradient). The KL's gradient is
  (p_retr - t) / T_r: this replaces p_retr by b.

  Why: before the reader reads, its evidence is noise and the target t fluctuates around the
  prior, but its mean is not the prior: E[softmax(s + e)] is flatter than softmax(s) for
  zero-mean noise e (Jensen; for a top-1 prior of 0.84 and noise of 0.22 nats per passage the
  top-1 target mass is 0.0043 lower on average, 10x below the per-example noise of 0.043, by a
  numpy simulation of 4M draws), a bias Adam's normalised steps do not shrink. Under the null
  (evidence exchangeable across the K passages) E[t] = E[b] exactly, so the expected update is
  0 whatever the noise (`tests/test_retriever_losses.py`); a reader that prefers the passage it
  read gets t != b. Measured on the bios collapse (`experiments/bios.py`): with pure-noise
  evidence it delays the collapse but does not prevent it (the move shared by every query is
  not a bias of the target; in-batch negatives fix that).
  Padded slots (log p_retr = -inf) get no mass; rows with a padded slot shift the padding too,
  so b is exact in expectation only for rows without padding. Not in Atlas (an addition).
  """
  use_bk = jnp.isfinite(log_prior_bk)
  diff_bk = jax.lax.stop_gradient(target_bk) - jax.lax.stop_gradient(null_bk)
  return jnp.sum(jnp.where(use_bk, -diff_bk * jnp.where(use_bk, log_prior_bk, 0.0), 0.0), -1)


# ---------------------------------------------------------------------------- Atlas: ADist

def aggregate_cross_attention(attn_nbhtkl: jax.Array, passage_mask_bkl: jax.Array,
                              target_mask_bt: jax.Array, *,
                              value_norm_nbhkl: jax.Array | None = None,
                              normalize: str = "sum",
                              token_constant: float = 256.0) -> jax.Array:
  """The ADist target: the reader's cross-attention on each passage, [B, K] float32.

  Atlas §2.2 "Attention Distillation (ADist)" (after Izacard & Grave 2021, "Distilling
  Knowledge from Reader to Retriever", arXiv:2012.04584, §3.2): the relevance of passage k is
  the cross-attention alpha (times the value norm ||v||) averaged over heads, layers and output
  tokens and summed over the passage's input tokens. As Atlas (`src/fid.py`:
  `cross_attention_forward` stores mean_h(||v_h|| * alpha_h) per layer; `FiD.aggregate_value`
  sums it over layers, scored target tokens and passage tokens):
    s_bk = sum_{n, t, l} target_mask_bt * passage_mask_bkl * mean_h(attn_nbhtkl * value_norm_nbhkl)
    "sum" (Atlas's "normssum" = ADist, mode "evalnormsum"):
           s_bk / (token_constant * N * T_b)     T_b = scored target tokens; Atlas's constant 256
    "avg" (Atlas's "normsavg"):  s_bk / (L_bk * N * T_b)     L_bk = unmasked tokens of passage k
  Without `value_norm_nbhkl` this is Atlas's "probs*" variant (attention probabilities only).
  The normaliser is one constant per example for "sum", so it only rescales the target like a
  temperature. Atlas's ADist runs the reader in eval mode over all retriever passages
  (`eval_score`); the "std" modes reuse the training pass. Not reproduced: Atlas's top-k,
  "first", "nosep" and "woquery" variants.

  Args:
    attn_nbhtkl: [N, B, H, T, K, L] cross-attention probabilities of N decoder layers, H heads,
      T target positions over the K passages' L tokens each (a FiD decoder attends over the
      concatenation of the K passages: reshape its [..., K*L] key axis to [..., K, L]), any float
      dtype. [B, H, T, K, L] (ndim 5) is taken as one layer.
    passage_mask_bkl: [B, K, L] bool/0-1, 1 on real passage tokens.
    target_mask_bt: [B, T] bool/0-1, 1 on scored target tokens (Atlas: labels != -100).
    value_norm_nbhkl: optional [N, B, H, K, L] (or [B, H, K, L] with a 5-D attn) L2 norms of the
      per-head value vectors of the key tokens.
    normalize: "sum" | "avg" (above); token_constant: the "sum" constant (Atlas: 256).
  Returns:
    [B, K] float32 scores to feed `attention_distillation_loss`. A passage with no unmasked
    token gets -inf (zero target mass; Atlas would give it 0, or NaN under "avg"); an example
    without a scored target token gets 0 on its real passages (Atlas: NaN).
  Raises:
    ValueError on mismatched shapes or an unknown `normalize`.
  """
  if normalize not in _NORMALIZE:
    raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
  attn = jnp.asarray(attn_nbhtkl)
  if attn.ndim == 5:
    attn = attn[None]
    if value_norm_nbhkl is not None:
      value_norm_nbhkl = jnp.asarray(value_norm_nbhkl)[None]
  if attn.ndim != 6:
    raise ValueError(f"attn must be [N, B, H, T, K, L] or [B, H, T, K, L], got shape "
                     f"{jnp.shape(attn_nbhtkl)}")
  n, b, h, t, k, l = attn.shape
  pmask_bkl = jnp.asarray(passage_mask_bkl)
  tmask_bt = jnp.asarray(target_mask_bt)
  if pmask_bkl.shape != (b, k, l):
    raise ValueError(f"passage_mask shape {pmask_bkl.shape} != (B, K, L) = {(b, k, l)} of attn "
                     f"{attn.shape}")
  if tmask_bt.shape != (b, t):
    raise ValueError(f"target_mask shape {tmask_bt.shape} != (B, T) = {(b, t)} of attn "
                     f"{attn.shape}")
  pmask_bkl = (pmask_bkl != 0).astype(jnp.float32)
  tmask_bt = (tmask_bt != 0).astype(jnp.float32)
  attn = attn.astype(jnp.float32)
  if value_norm_nbhkl is None:
    s_bk = jnp.einsum("nbhtkl,bt,bkl->bk", attn, tmask_bt, pmask_bkl, precision=_HIGHEST)
  else:
    vnorm = jnp.asarray(value_norm_nbhkl)
    if vnorm.shape != (n, b, h, k, l):
      raise ValueError(f"value_norm shape {vnorm.shape} != (N, B, H, K, L) = {(n, b, h, k, l)} "
                       f"of attn {attn.shape}")
    s_bk = jnp.einsum("nbhtkl,nbhkl,bt,bkl->bk", attn, vnorm.astype(jnp.float32), tmask_bt,
                      pmask_bkl, precision=_HIGHEST)
  s_bk = s_bk / h                                                          # mean over heads
  ntok_b1 = jnp.maximum(jnp.sum(tmask_bt, axis=-1, keepdims=True), 1.0)
  plen_bk = jnp.sum(pmask_bkl, axis=-1)
  if normalize == "sum":
    s_bk = s_bk / (token_constant * n * ntok_b1)
  else:
    s_bk = s_bk / (jnp.maximum(plen_bk, 1.0) * n * ntok_b1)
  return jnp.where(plen_bk > 0, s_bk, -jnp.inf)


def attention_distillation_loss(scores_bk: jax.Array, attention_scores_bk: jax.Array, *,
                                retriever_temperature: float, target_temperature: float,
                                reduce: str = "elementwise_mean",
                                null_baseline: bool = False) -> jax.Array:
  """ADist: KL(softmax(attn / T_t) || softmax(scores / T_r)), Atlas §2.2 "Attention Distillation".

  Atlas: `gold_score_mode="adist"` (= "evalnormsum"), `Atlas.kldivloss(retriever_score,
  gold_score)`; the target is the reader's aggregated cross-attention (see
  `aggregate_cross_attention`), under stop-gradient.

  Args:
    scores_bk: [B, K] retriever scores q·d (any float dtype; -inf = padded slot), with gradient.
    attention_scores_bk: [B, K] per-passage cross-attention scores (any float dtype).
    retriever_temperature, target_temperature: positive static floats (Atlas
      `temperature_score`, `temperature_gold`, both 0.01 by default).
    reduce: "elementwise_mean" (Atlas: / (B*K)) | "mean" (/ B) | "sum" | "none" ([B]).
    null_baseline: train against the target minus its expectation under exchangeable
      evidence instead of the KL (`null_baselined`; not in Atlas).
  Returns:
    float32 scalar, or [B] for reduce="none".
  Raises:
    ValueError on mismatched shapes (scores and target must cover the same K), an unknown
    reduce or a non-positive temperature.
  """
  return _kl_loss(scores_bk, attention_scores_bk, "attention_scores_bk", retriever_temperature,
                  target_temperature, reduce, null_baseline)


# ---------------------------------------------------------------------------- Atlas: PDist, LOOP

def perplexity_distillation_loss(scores_bk: jax.Array, seq_logprob_bk: jax.Array, *,
                                 retriever_temperature: float, target_temperature: float,
                                 reduce: str = "elementwise_mean",
                                 null_baseline: bool = False) -> jax.Array:
  """PDist: KL(softmax(log p_LM(a|q,d_k) / T_t) || softmax(scores / T_r)), Atlas §2.2.

  Atlas §2.2 "Perplexity Distillation (PDist)": p_tgt(k) ∝ exp(log p_LM(a | d_k, q) / T_t),
  the reader run on each passage alone. Atlas's code (`gold_score_mode="pdist"` = "ppmean",
  `Atlas.perplexity_score`) uses the per-token MEAN log-likelihood, -sum_t CE_t / (scored
  tokens): pass `seq_logprob_bk / num_tokens_b[:, None]` to reproduce it (with the summed
  log-likelihood the target is sharper by the answer length).

  Args:
    scores_bk: [B, K] retriever scores q·d (any float dtype; -inf = padded slot), with gradient.
    seq_logprob_bk: [B, K] answer log-likelihood given passage k (any float dtype).
    retriever_temperature, target_temperature, reduce, null_baseline: as
      `attention_distillation_loss`.
  Returns / Raises: as `attention_distillation_loss`.
  """
  return _kl_loss(scores_bk, seq_logprob_bk, "seq_logprob_bk", retriever_temperature,
                  target_temperature, reduce, null_baseline)


def leave_one_out_loss(scores_bk: jax.Array, loo_logprob_bk: jax.Array, *,
                       retriever_temperature: float, target_temperature: float,
                       reduce: str = "elementwise_mean",
                       null_baseline: bool = False) -> jax.Array:
  """LOOP: KL(softmax(-log p_LM(a|q,D\\{d_k}) / T_t) || softmax(scores / T_r)), Atlas §2.2.

  Atlas §2.2 "Leave-one-out Perplexity Distillation (LOOP)": p_tgt(k) ∝ exp(-log p_LM(a | D_K \\
  {d_k}, q) / T_t): the passages whose removal hurts the answer most get the most target mass.
  Atlas's code (`gold_score_mode="loop"`, `Atlas.loop_score`) passes the per-token MEAN
  cross-entropy with passage k masked out of the reader's cross-attention (a positive NLL)
  straight to `kldivloss`, i.e. softmax(+NLL_loo / T_t): the same sign as here with
  `loo_logprob_bk = -NLL_loo`. Pass the per-token mean log-likelihood to reproduce Atlas.

  Args:
    scores_bk: [B, K] retriever scores q·d (any float dtype; -inf = padded slot), with gradient.
    loo_logprob_bk: [B, K] log p(a | q, D \\ {d_k}) (any float dtype; finite on real slots).
    retriever_temperature, target_temperature, reduce, null_baseline: as
      `attention_distillation_loss`.
  Returns / Raises: as `attention_distillation_loss`.
  """
  neg_loo_bk = -jnp.asarray(loo_logprob_bk).astype(jnp.float32)   # target logit = -log p
  return _kl_loss(scores_bk, neg_loo_bk, "loo_logprob_bk", retriever_temperature,
                  target_temperature, reduce, null_baseline)


def pad_negatives(target_bk: jax.Array, width: int) -> jax.Array:
  """A reader-side target `[B, K, ...]` (e.g. per-token `[B, K, T]`) extended to
  `[B, width, ...]` float32 with -inf: no target mass on in-batch negatives (scores `[B, width]`,
  `ragjax.models.rag.in_batch_scores`)."""
  b, k = target_bk.shape[:2]
  pad = jnp.full((b, width - k) + tuple(target_bk.shape[2:]), -jnp.inf, jnp.float32)
  return jnp.concatenate([jnp.asarray(target_bk).astype(jnp.float32), pad], axis=1)


# ---------------------------------------------------------------------------- Atlas: EMDR²

def token_logprobs(logits_bktv: jax.Array, targets_bt: jax.Array, *,
                   temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[y_t] per passage and position: [B, K, T] float32.

  The reader term of Atlas's EMDR² code (`Atlas.emdr_score` + `Atlas.logprob`), which divides
  the reader's logits by `temperature_gold` before the log-softmax (temperature=1 gives the
  plain log p_LM(y_t | q, d_k, y_<t) of Atlas §2.2 / Sachan et al. 2021). Target ids out of
  [0, V) (e.g. -100) are read as id 0, as Atlas does; mask them in `emdr_token_loss`.

  Args:
    logits_bktv: [B, K, T, V] reader logits with passage k alone in context, any float dtype.
    targets_bt: [B, T] int target ids.
    temperature: positive static float.
  Raises:
    ValueError on mismatched shapes or a non-positive temperature.
  """
  _check_temperature("temperature", temperature)
  logits_bktv, targets_bt = jnp.asarray(logits_bktv), jnp.asarray(targets_bt)
  if logits_bktv.ndim != 4 or targets_bt.shape != (logits_bktv.shape[0], logits_bktv.shape[2]):
    raise ValueError(f"expected logits [B, K, T, V] and targets [B, T], got {logits_bktv.shape} "
                     f"and {targets_bt.shape}")
  v = logits_bktv.shape[-1]
  logp_bktv = jax.nn.log_softmax(logits_bktv.astype(jnp.float32) / temperature, axis=-1)
  safe_bt = jnp.where((targets_bt >= 0) & (targets_bt < v), targets_bt, 0)
  return jnp.take_along_axis(logp_bktv, safe_bt[:, None, :, None], axis=-1)[..., 0]


def emdr_loss(scores_bk: jax.Array, seq_logprob_bk: jax.Array, *,
              retriever_temperature: float, reduce: str = "mean",
              null_baseline: bool = False) -> jax.Array:
  """EMDR², sequence level: -log sum_k p_retr(k) p_LM(a | q, d_k), the reader term frozen.

  Atlas §2.2 "End-to-end training of Multi-Document Reader and Retriever (EMDR²)" (Sachan et
  al. 2021, "End-to-End Training of Multi-Document Reader and Retriever for Open-Domain
  Question Answering", arXiv:2106.05346): with p_retr = softmax(scores / T_r),
    loss_b = -logsumexp_k( log p_retr(k) + stop_gradient(seq_logprob_bk) )
  and d loss_b / d s_k = (p_retr(k) - p(k | q, a)) / T_r, p(k | q, a) ∝ p_retr(k) p_LM(a|q,d_k).
  Atlas's own code implements the token-level form (`emdr_token_loss`); the two agree for a
  one-token answer. There is no target temperature: the reader's log-likelihood enters as is.

  Args:
    scores_bk: [B, K] retriever scores q·d (any float dtype; -inf = padded slot), with gradient.
    seq_logprob_bk: [B, K] log p_LM(a | q, d_k), the reader run on passage k alone (any float).
    retriever_temperature: positive static float (Atlas `temperature_score`).
    reduce: "mean" (/ B) | "sum" | "none" ([B]).
    null_baseline: `null_baselined` with target the posterior p(k | q, a) and null its mean
      over the K cyclic shifts of seq_logprob_bk (not in Atlas or Sachan et al.).
  Returns:
    float32 scalar, or [B] for reduce="none".
  Raises:
    ValueError on mismatched shapes, an unknown reduce or a non-positive temperature.
  """
  check_reduce(reduce, REDUCTIONS)
  _check_temperature("retriever_temperature", retriever_temperature)
  scores_bk = _scores(scores_bk)
  lp_bk = jnp.asarray(seq_logprob_bk)
  if lp_bk.ndim != 2:
    raise ValueError(f"seq_logprob_bk must be [B, K], got shape {lp_bk.shape}")
  _check_same_bk(scores_bk, lp_bk, "seq_logprob_bk")
  lp_bk = jax.lax.stop_gradient(lp_bk.astype(jnp.float32))
  valid_bk = scores_bk > -jnp.inf
  row_ok_b = jnp.any(valid_bk, axis=-1)
  logp_retr_bk, use_bk = _retriever_log_prior(scores_bk, valid_bk, row_ok_b,
                                              retriever_temperature)
  lp_bk = jnp.where(use_bk, lp_bk, 0.0)
  joint_bk = jnp.where(use_bk, logp_retr_bk + lp_bk, -jnp.inf)
  if null_baseline:
    prior_bk = jax.lax.stop_gradient(logp_retr_bk)
    post = lambda e_bk: jax.nn.softmax(jnp.where(use_bk, prior_bk + e_bk, -jnp.inf), axis=-1)
    loss_b = null_baselined(post(lp_bk), _shift_mean(post, lp_bk), logp_retr_bk)
    return reduce_loss(jnp.where(row_ok_b, loss_b, 0.0), reduce)
  loss_b = jnp.where(row_ok_b, -jax.nn.logsumexp(joint_bk, axis=-1), 0.0)
  return reduce_loss(loss_b, reduce)


def emdr_token_loss(scores_bk: jax.Array, token_logprob_bkt: jax.Array,
                    target_mask_bt: jax.Array, *, retriever_temperature: float,
                    reduce: str = "token_mean", null_baseline: bool = False) -> jax.Array:
  """EMDR², token level (Atlas's code): -sum_t log sum_k p_retr(k) p_LM(y_t | q, d_k, y_<t).

  Atlas `gold_score_mode="emdr"`, `Atlas.logprob`: per example
    loss_b = -sum_t mask_bt * logsumexp_k( log p_retr(k) + stop_gradient(token_logprob_bkt) )
  with p_retr = softmax(scores / T_r), i.e. the RAG-Token marginal (Lewis et al. 2020 §2.1)
  with a frozen reader, as the per-passage reader runs of `Atlas.emdr_score` give it. Atlas
  averages over all scored tokens of the batch (reduce="token_mean", the default). Atlas
  divides the reader's logits by `temperature_gold` before its log-softmax: build
  `token_logprob_bkt` with `token_logprobs(..., temperature=...)` to reproduce that.
  For T = 1 (mask all 1) this equals `emdr_loss` on seq_logprob_bk = token_logprob_bkt[..., 0].

  Args:
    scores_bk: [B, K] retriever scores q·d (any float dtype; -inf = padded slot), with gradient.
    token_logprob_bkt: [B, K, T] log p_LM(y_t | q, d_k, y_<t) (any float dtype).
    target_mask_bt: [B, T] bool/0-1, 1 on scored tokens.
    retriever_temperature: positive static float (Atlas `temperature_score`).
    reduce: "token_mean" (sum / scored tokens in the batch; Atlas) | "mean" (/ B) | "sum" |
      "none" ([B], token-summed).
    null_baseline: must be False: the token-level form has no null baseline (its per-token
      posteriors have no exchangeable-evidence mean; `emdr_loss` has one). Taken so that every
      caller passes its config through one check.
  Returns:
    float32 scalar, or [B] for reduce="none".
  Raises:
    ValueError on mismatched shapes, an unknown reduce, a non-positive temperature or
    null_baseline=True.
  """
  if null_baseline:
    raise ValueError("retriever_loss='emdr2_token' has no null baseline (use 'emdr2', the "
                     "sequence-level form, with retriever_null_baseline)")
  check_reduce(reduce, _TOKEN_REDUCTIONS)
  _check_temperature("retriever_temperature", retriever_temperature)
  scores_bk = _scores(scores_bk)
  lp_bkt = jnp.asarray(token_logprob_bkt)
  mask_bt = jnp.asarray(target_mask_bt)
  if lp_bkt.ndim != 3:
    raise ValueError(f"token_logprob_bkt must be [B, K, T], got shape {lp_bkt.shape}")
  _check_same_bk(scores_bk, lp_bkt, "token_logprob_bkt")
  if mask_bt.shape != (lp_bkt.shape[0], lp_bkt.shape[2]):
    raise ValueError(f"target_mask shape {mask_bt.shape} != (B, T) = "
                     f"{(lp_bkt.shape[0], lp_bkt.shape[2])} of token_logprob_bkt {lp_bkt.shape}")
  lp_bkt = jax.lax.stop_gradient(lp_bkt.astype(jnp.float32))
  mask_bt = mask_bt != 0
  valid_bk = scores_bk > -jnp.inf
  row_ok_b = jnp.any(valid_bk, axis=-1)
  logp_retr_bk, use_bk = _retriever_log_prior(scores_bk, valid_bk, row_ok_b,
                                              retriever_temperature)
  joint_bkt = jnp.where(use_bk[:, :, None],
                        logp_retr_bk[:, :, None] + jnp.where(use_bk[:, :, None], lp_bkt, 0.0),
                        -jnp.inf)
  marg_bt = jax.nn.logsumexp(joint_bkt, axis=1)
  loss_b = -jnp.sum(jnp.where(mask_bt & row_ok_b[:, None], marg_bt, 0.0), axis=-1)
  ntok = jnp.maximum(jnp.sum(mask_bt & row_ok_b[:, None]), 1)
  return reduce_loss(loss_b, reduce, ntok.astype(jnp.float32))
