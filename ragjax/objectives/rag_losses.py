"""RAG training losses: marginal likelihoods over the top-K retrieved passages, and baselines.

Paper: Lewis et al. 2020, "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks"
(arXiv:2005.11401). With the retriever prior restricted to the top K passages,

  retriever (§2.2, DPR):  p_eta(z|x) = softmax_z( d(z)ᵀ q(x) )                  over the top K
  RAG-Sequence (§2.1):    p(y|x) = sum_z p_eta(z|x) prod_i p_theta(y_i | x, z, y_<i)
  RAG-Token (§2.1):       p(y|x) = prod_i sum_z p_eta(z|x) p_theta(y_i | x, z, y_<i)

(called eq. 1, 2 and 3 in this module's docstrings, in that order). The losses
reproduce HuggingFace transformers' `RagSequenceForGeneration.get_nll` and
`RagTokenForGeneration.get_nll` (models/rag/modeling_rag.py, transformers 5.x) value for value,
including label smoothing and reduction; `tests/test_losses.py` checks losses and d loss / d
doc_scores against torch autograd.

Conventions shared by every loss here:
  * `logits_bktv` [B, K, T, V] are the generator's logits for passage k, any float dtype; all
    arithmetic is float32. HF's `[B*K, T, V]` generator output is `.reshape(B, K, T, V)`
    (batch-major: row b*K + k is passage k of example b).
  * `doc_scores_bk` [B, K] are raw retrieval scores q(x)·d(z); the losses apply log_softmax over
    K themselves (as HF does). A score of -inf gives that passage zero prior mass (a padded slot).
  * `targets_bt` [B, T] int: targets_bt[:, t] is the token that logits[:, :, t] predicts.
    `target_mask_bt` [B, T] (bool or 0/1) is 1 on scored tokens. HF RAG feeds its `labels` as
    the decoder input and scores `labels[:, 1:]` padded with one pad column; `shift_targets`
    builds exactly that pair (mask = target != pad, as HF's `_mask_pads`).
  * Per example the NLL is SUMMED over tokens (HF), not averaged.
  * label smoothing `eps` (HF's `epsilon` = `config.label_smoothing`): per example
        loss_b = (1 - eps) * nll_b + (eps / V) * smooth_b,
    where smooth_b = -(sum over scored positions and the vocabulary of the log-probs), with the
    passages marginalised in the same way as the NLL (see each loss). Per token (K = 1, or the
    RAG-Token marginal) this is cross-entropy against (1 - eps)·onehot + eps/V (as with
    `optax.smooth_labels`), summed over tokens; RAG-Sequence's differs (see there).
  * reduce: "none" -> [B]; "sum" -> scalar sum over the batch (HF `reduce_loss=True`);
    "mean" -> the sum divided by B (per-example mean of the token-summed NLL).
  * `label_smoothing`, `reduce` and the other keyword flags are static Python values: close
    over them (functools.partial) rather than passing them as traced arguments.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ragjax.config import LOSSES
from ragjax.objectives.reduce import check_reduce, reduce_loss



# ------------------------------------------------------------------------------------- helpers

def shift_targets(labels_bt: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """HF RAG's targets for `labels` used as decoder input: `labels[:, 1:]` + one pad column.

  HF (`get_nll` of both RAG classes) passes `labels` unchanged as `decoder_input_ids`, so
  `labels[:, 0]` must already be the decoder start token (BART: `</s>`=2 or, as in HF's
  fine-tuning script, `<s>`=0; T5: pad), and scores position t against labels[:, t + 1].

  Args:
    labels_bt: [B, T] int token ids (the decoder input).
    pad_id: the generator's pad id.
  Returns:
    (targets_bt [B, T] same dtype, mask_bt [B, T] bool = targets_bt != pad_id). Note that, as
    in HF, a pad id inside an answer is masked too.
  """
  labels_bt = jnp.asarray(labels_bt)
  if labels_bt.ndim != 2:
    raise ValueError(f"labels_bt must be [B, T], got shape {labels_bt.shape}")
  pad_b1 = jnp.full((labels_bt.shape[0], 1), pad_id, labels_bt.dtype)
  targets_bt = jnp.concatenate([labels_bt[:, 1:], pad_b1], axis=1)
  return targets_bt, targets_bt != pad_id


def retrieval_log_prior(query_bd: jax.Array | None = None, passages_bkd: jax.Array | None = None,
                        *, doc_scores_bk: jax.Array | None = None) -> jax.Array:
  """log p_eta(z|x) over the top K passages (eq. 1, restricted to the top K): [B, K] float32.

  logp_bk = log_softmax_k( q(x)·d(z_k) ). Give either `query_bd` [B, D] and `passages_bkd`
  [B, K, D] (inner products computed in float32), or precomputed `doc_scores_bk` [B, K].
  A score of -inf gives log-prior -inf (zero mass) to that slot.
  Raises: ValueError when both or neither input form is given, or on mismatched shapes.
  """
  if doc_scores_bk is not None:
    if query_bd is not None or passages_bkd is not None:
      raise ValueError("give either (query_bd, passages_bkd) or doc_scores_bk, not both")
    scores_bk = jnp.asarray(doc_scores_bk, jnp.float32)
    if scores_bk.ndim != 2:
      raise ValueError(f"doc_scores_bk must be [B, K], got shape {scores_bk.shape}")
  else:
    if query_bd is None or passages_bkd is None:
      raise ValueError("give (query_bd [B, D], passages_bkd [B, K, D]) or doc_scores_bk [B, K]")
    q_bd, p_bkd = jnp.asarray(query_bd), jnp.asarray(passages_bkd)
    if q_bd.ndim != 2 or p_bkd.ndim != 3 or p_bkd.shape[0] != q_bd.shape[0] \
        or p_bkd.shape[2] != q_bd.shape[1]:
      raise ValueError(f"expected query [B, D] and passages [B, K, D], got {q_bd.shape} and "
                       f"{p_bkd.shape}")
    scores_bk = jnp.einsum("bd,bkd->bk", q_bd.astype(jnp.float32), p_bkd.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
  return jax.nn.log_softmax(scores_bk, axis=-1)


def retrieval_entropy(doc_scores_bk: jax.Array) -> jax.Array:
  """Entropy of the top-K retrieval prior, H = -sum_k p log p with p = p_eta(z|x): [B] float32.

  0 when one passage has all the mass, log K for uniform scores; -inf scores contribute 0.
  """
  return _entropy(retrieval_log_prior(doc_scores_bk=doc_scores_bk))


def _entropy(logp_bk: jax.Array) -> jax.Array:
  p_bk = jnp.exp(logp_bk)
  safe_logp_bk = jnp.where(p_bk > 0, logp_bk, 0.0)  # 0 * -inf would poison value and gradient
  return -jnp.sum(p_bk * safe_logp_bk, axis=-1)


def _check(logits_bktv, doc_scores_bk, targets_bt, target_mask_bt, reduce):
  check_reduce(reduce)
  if logits_bktv.ndim != 4:
    raise ValueError(f"logits must be [B, K, T, V], got shape {logits_bktv.shape}")
  b, k, t, _ = logits_bktv.shape
  if doc_scores_bk is not None and doc_scores_bk.shape != (b, k):
    raise ValueError(f"doc_scores shape {doc_scores_bk.shape} != (B, K) = {(b, k)} of logits "
                     f"{logits_bktv.shape}")
  for name, x in (("targets", targets_bt), ("target_mask", target_mask_bt)):
    if x.shape != (b, t):
      raise ValueError(f"{name} shape {x.shape} != (B, T) = {(b, t)} of logits "
                       f"{logits_bktv.shape}")


def _smoothing_on(label_smoothing) -> bool:
  """Static check: skip the [B, K, T, V] smoothing reductions when eps is a literal 0."""
  return not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0)


def _token_logprobs(logits_bktv, targets_bt, with_vocab_sum):
  """log p_theta(y_t | x, z_k, y_<t) [B, K, T] and, if asked, sum_v log p_theta(v|...) [B, K, T].

  Both float32. Target ids are clamped to 0 where out of range (e.g. -100), so masked
  positions may hold any id.
  """
  logp_bktv = jax.nn.log_softmax(logits_bktv.astype(jnp.float32), axis=-1)
  v = logp_bktv.shape[-1]
  safe_bt = jnp.where((targets_bt >= 0) & (targets_bt < v), targets_bt, 0)
  tok_bkt = jnp.take_along_axis(logp_bktv, safe_bt[:, None, :, None], axis=-1)[..., 0]
  vsum_bkt = jnp.sum(logp_bktv, axis=-1) if with_vocab_sum else None
  return logp_bktv, tok_bkt, vsum_bkt


# ---------------------------------------------------------------------------- per-passage terms

def sequence_logprob(logits_bktv: jax.Array, targets_bt: jax.Array,
                     target_mask_bt: jax.Array) -> jax.Array:
  """log p_theta(y | x, z_k) = sum_t mask_t log p_theta(y_t | x, z_k, y_<t): [B, K] float32.

  The per-passage sequence log-likelihood inside eq. 2. Shapes as in the module docstring.
  Raises: ValueError on mismatched shapes.
  """
  targets_bt, mask_bt = jnp.asarray(targets_bt), jnp.asarray(target_mask_bt)
  _check(logits_bktv, None, targets_bt, mask_bt, "none")
  _, tok_bkt, _ = _token_logprobs(logits_bktv, targets_bt, False)
  return jnp.sum(jnp.where(mask_bt[:, None, :] != 0, tok_bkt, 0.0), axis=-1)


# ------------------------------------------------------------------------------------- losses

def rag_sequence_nll(logits_bktv: jax.Array, doc_scores_bk: jax.Array, targets_bt: jax.Array,
                     target_mask_bt: jax.Array, *, label_smoothing: float = 0.0,
                     reduce: str = "mean", exclude_bos_score: bool = False,
                     bos_id: int | None = None, hf_prior_slot: bool = False) -> jax.Array:
  """RAG-Sequence loss, eq. 2: -log sum_z p_eta(z|x) prod_i p_theta(y_i | x, z, y_<i).

  Per example (float32; `logp_bk` = log_softmax(doc_scores_bk)):
    ll_bk     = sum_t mask_bt * log p_theta(y_t|x,z_k,y_<t) + logp_bk          [B, K]
    nll_b     = -logsumexp_k ll_bk                                             [B]
    smooth_bk = sum_t mask_bt * sum_v log p_theta(v|x,z_k,y_<t) + V * logp_bk  [B, K]
    smooth_b  = -logsumexp_k smooth_bk                                         [B]
    loss_b    = (1 - eps) * nll_b + (eps / V) * smooth_b
  which is HF's `RagSequenceForGeneration.get_nll`. HF adds the doc log-prior to the log-probs of
  target position 1 (the second scored token, so that `exclude_bos_score` cannot drop it)
  before the pad mask and the sum over tokens; it therefore appears once in ll and V times in
  the smoothing sum. Note HF's smoothing term is a logsumexp over passages of V-token sums, not
  a mixture of distributions: it is dominated by the single best passage.

  Args:
    logits_bktv: [B, K, T, V] generator logits, any float dtype.
    doc_scores_bk: [B, K] raw retrieval scores (not yet log-normalised).
    targets_bt: [B, T] int; mask_bt: [B, T] bool/0-1 (see `shift_targets` for HF's pair).
    label_smoothing: eps, a static Python float (HF `config.label_smoothing`).
    reduce: "mean" | "sum" | "none" (HF `reduce_loss=True` is "sum", False is "none").
    exclude_bos_score: HF's flag (used by HF when re-scoring generated hypotheses): if every
      example's targets_bt[:, 0] == bos_id (one flag for the whole batch, as HF's `.all()`),
      position 0 is left out of ll_bk; it stays in the smoothing sum, as in HF. Needs bos_id.
    hf_prior_slot: reproduce HF exactly when position 1 is padded or T < 2: HF then loses the
      doc prior (it is masked with the pad, or there is no slot 1), so the "marginal" is an
      unweighted logsumexp of the passage likelihoods. False (default) always adds the prior,
      the correct eq. 2; the two agree whenever position 1 is a scored token.
  Returns:
    [B] float32 for reduce="none", else a float32 scalar.
  Raises:
    ValueError on mismatched shapes, an unknown `reduce`, or exclude_bos_score without bos_id.
  """
  targets_bt, mask_bt = jnp.asarray(targets_bt), jnp.asarray(target_mask_bt) != 0
  doc_scores_bk = jnp.asarray(doc_scores_bk)
  _check(logits_bktv, doc_scores_bk, targets_bt, mask_bt, reduce)
  if exclude_bos_score and bos_id is None:
    raise ValueError("exclude_bos_score=True needs bos_id")
  smooth = _smoothing_on(label_smoothing)
  logp_bk = retrieval_log_prior(doc_scores_bk=doc_scores_bk)
  _, tok_bkt, vsum_bkt = _token_logprobs(logits_bktv, targets_bt, smooth)
  b, k, t, v = logits_bktv.shape

  score_bt = mask_bt
  if exclude_bos_score:
    use_bos = jnp.all(targets_bt[:, 0] == bos_id)
    score_bt = score_bt.at[:, 0].set(score_bt[:, 0] & ~use_bos)
  if hf_prior_slot:
    prior_on_b = mask_bt[:, 1] if t >= 2 else jnp.zeros((b,), bool)
  else:
    prior_on_b = jnp.ones((b,), bool)
  prior_bk = jnp.where(prior_on_b[:, None], logp_bk, 0.0)

  ll_bk = jnp.sum(jnp.where(score_bt[:, None, :], tok_bkt, 0.0), axis=-1) + prior_bk
  loss_b = -jax.nn.logsumexp(ll_bk, axis=-1)
  if smooth:
    smooth_bk = jnp.sum(jnp.where(mask_bt[:, None, :], vsum_bkt, 0.0), axis=-1) + v * prior_bk
    smooth_b = -jax.nn.logsumexp(smooth_bk, axis=-1)
    loss_b = (1.0 - label_smoothing) * loss_b + (label_smoothing / v) * smooth_b
  return reduce_loss(loss_b, reduce)


def rag_token_nll(logits_bktv: jax.Array, doc_scores_bk: jax.Array, targets_bt: jax.Array,
                  target_mask_bt: jax.Array, *, label_smoothing: float = 0.0,
                  reduce: str = "mean") -> jax.Array:
  """RAG-Token loss, eq. 3: -sum_i log sum_z p_eta(z|x) p_theta(y_i | x, z, y_<i).

  Per example (float32; `logp_bk` = log_softmax(doc_scores_bk)), as HF's
  `RagTokenForGeneration.marginalize` + `get_nll`:
    m_btv    = logsumexp_k( log p_theta(v|x,z_k,y_<t) + logp_bk )   [B, T, V] marginal log-probs
    nll_b    = -sum_t mask_bt * m_bt[y_t]                            [B]
    smooth_b = -sum_t mask_bt * sum_v m_btv                          [B]
    loss_b   = (1 - eps) * nll_b + (eps / V) * smooth_b
  The doc log-prior is added at every position before the logsumexp over passages. The full
  [B, T, V] marginal is only formed when eps != 0.

  Args / Returns / Raises: as `rag_sequence_nll` (no exclude_bos_score: HF has none here).
  """
  targets_bt, mask_bt = jnp.asarray(targets_bt), jnp.asarray(target_mask_bt) != 0
  doc_scores_bk = jnp.asarray(doc_scores_bk)
  _check(logits_bktv, doc_scores_bk, targets_bt, mask_bt, reduce)
  smooth = _smoothing_on(label_smoothing)
  logp_bk = retrieval_log_prior(doc_scores_bk=doc_scores_bk)
  logp_bktv, tok_bkt, _ = _token_logprobs(logits_bktv, targets_bt, False)
  v = logits_bktv.shape[-1]

  marg_bt = jax.nn.logsumexp(tok_bkt + logp_bk[:, :, None], axis=1)
  loss_b = -jnp.sum(jnp.where(mask_bt, marg_bt, 0.0), axis=-1)
  if smooth:
    marg_btv = jax.nn.logsumexp(logp_bktv + logp_bk[:, :, None, None], axis=1)
    smooth_b = -jnp.sum(jnp.where(mask_bt, jnp.sum(marg_btv, axis=-1), 0.0), axis=-1)
    loss_b = (1.0 - label_smoothing) * loss_b + (label_smoothing / v) * smooth_b
  return reduce_loss(loss_b, reduce)


def seq2seq_nll(logits_btv: jax.Array, targets_bt: jax.Array, target_mask_bt: jax.Array, *,
                label_smoothing: float = 0.0, reduce: str = "mean") -> jax.Array:
  """Closed-book baseline: plain generator NLL, no retrieval. [B] or scalar float32.

  loss_b = -(1 - eps) * sum_t mask_bt log p(y_t|x,y_<t) - (eps / V) * sum_t mask_bt sum_v
  log p(v|x,y_<t): both RAG losses above with K = 1 (so with the same smoothing and
  reduction conventions as HF RAG; HF BART's own loss instead averages over tokens).

  Args: logits_btv [B, T, V] any float dtype; targets_bt, mask_bt, label_smoothing and reduce as
  `rag_sequence_nll`. Raises: ValueError on mismatched shapes or an unknown `reduce`.
  """
  logits_btv = jnp.asarray(logits_btv)
  if logits_btv.ndim != 3:
    raise ValueError(f"logits_btv must be [B, T, V], got shape {logits_btv.shape}")
  scores_b1 = jnp.zeros(logits_btv.shape[:1] + (1,), jnp.float32)  # K = 1: log prior 0
  return rag_token_nll(logits_btv[:, None], scores_b1, targets_bt, target_mask_bt,
                       label_smoothing=label_smoothing, reduce=reduce)


def top1_nll(logits_bktv: jax.Array, doc_scores_bk: jax.Array, targets_bt: jax.Array,
             target_mask_bt: jax.Array, *, label_smoothing: float = 0.0,
             reduce: str = "mean") -> jax.Array:
  """No-marginalisation baseline: `seq2seq_nll` on the highest-scoring passage only.

  k*_b = argmax_k doc_scores_bk (first on ties); loss on logits_bktv[b, k*_b]. The gradient with
  respect to doc_scores is zero: this loss cannot train the retriever.
  Args / Returns / Raises: as `rag_token_nll`.
  """
  doc_scores_bk = jnp.asarray(doc_scores_bk)
  _check(logits_bktv, doc_scores_bk, jnp.asarray(targets_bt), jnp.asarray(target_mask_bt),
         reduce)
  best_b = jnp.argmax(doc_scores_bk, axis=-1)
  logits_btv = jnp.take_along_axis(logits_bktv, best_b[:, None, None, None], axis=1)[:, 0]
  return seq2seq_nll(logits_btv, targets_bt, target_mask_bt, label_smoothing=label_smoothing,
                     reduce=reduce)


def get_loss_fn(name: str) -> Callable[..., jax.Array]:
  """The loss for a config name, all with the `rag_token_nll` signature.

  "rag_sequence" | "rag_token" | "top1" | "closed_book". For "closed_book" the logits are
  [B, 1, T, V] (or [B, T, V]) and doc_scores is ignored (may be None).
  Raises: ValueError for an unknown name.
  """
  if name == "rag_sequence":
    return rag_sequence_nll
  if name == "rag_token":
    return rag_token_nll
  if name == "top1":
    return top1_nll
  if name == "closed_book":
    def closed_book(logits, doc_scores_bk, targets_bt, target_mask_bt, **kw):
      del doc_scores_bk
      if logits.ndim == 4:
        if logits.shape[1] != 1:
          raise ValueError(f"closed_book expects one passage slot, got logits {logits.shape}")
        logits = logits[:, 0]
      return seq2seq_nll(logits, targets_bt, target_mask_bt, **kw)
    return closed_book
  raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


# ----------------------------------------------------------------------------------- logging

class RagStats(NamedTuple):
  """Per-example quantities for logging (all float32; log-probabilities in nats)."""
  log_prior_bk: jax.Array          # [B, K] log p_eta(z|x)
  seq_logprob_bk: jax.Array        # [B, K] log p_theta(y|x,z)
  log_posterior_bk: jax.Array      # [B, K] log p(z|x,y) = log p_eta(z|x) p_theta(y|x,z) / p(y|x)
  rag_sequence_logprob_b: jax.Array  # [B] log p(y|x), eq. 2
  rag_token_logprob_b: jax.Array   # [B] log p(y|x), eq. 3
  prior_entropy_b: jax.Array       # [B] -sum_z p(z|x) log p(z|x)
  posterior_entropy_b: jax.Array   # [B] -sum_z p(z|x,y) log p(z|x,y)
  num_tokens_b: jax.Array          # [B] scored target tokens


def posterior_prior_kl(stats: "RagStats") -> jax.Array:
  """KL(p(z|x,y) || p_eta(z|x)) per example, `[B]` float32 nats: the information the answer adds
  about which passage was read (0 when the generator scores every passage alike; slots with
  zero posterior mass contribute 0)."""
  post_bk = jnp.exp(stats.log_posterior_bk)
  diff_bk = jnp.where(post_bk > 0, stats.log_posterior_bk - stats.log_prior_bk, 0.0)
  return jnp.sum(post_bk * diff_bk, axis=-1)


def marginal_answer_logprob(logits_bktv: jax.Array, doc_scores_bk: jax.Array,
                            targets_bt: jax.Array, target_mask_bt: jax.Array) -> RagStats:
  """Answer log-likelihoods under eq. 2 and 3, the passage posterior, and the entropies.

  rag_sequence_logprob_b == -rag_sequence_nll(..., reduce="none") and rag_token_logprob_b ==
  -rag_token_nll(..., reduce="none") (no smoothing). The posterior p(z|x,y) is Bayes' rule on
  eq. 2; for RAG-Sequence, d nll / d doc_scores = p(z|x) - p(z|x,y) (the retriever is pushed
  toward passages that explain the answer). Shapes in `RagStats`.
  Raises: ValueError on mismatched shapes.
  """
  targets_bt, mask_bt = jnp.asarray(targets_bt), jnp.asarray(target_mask_bt) != 0
  doc_scores_bk = jnp.asarray(doc_scores_bk)
  _check(logits_bktv, doc_scores_bk, targets_bt, mask_bt, "none")
  logp_bk = retrieval_log_prior(doc_scores_bk=doc_scores_bk)
  _, tok_bkt, _ = _token_logprobs(logits_bktv, targets_bt, False)
  seq_bk = jnp.sum(jnp.where(mask_bt[:, None, :], tok_bkt, 0.0), axis=-1)
  joint_bk = seq_bk + logp_bk
  seq_b = jax.nn.logsumexp(joint_bk, axis=-1)
  post_bk = joint_bk - seq_b[:, None]
  tok_b = jnp.sum(jnp.where(mask_bt, jax.nn.logsumexp(tok_bkt + logp_bk[:, :, None], axis=1),
                            0.0), axis=-1)
  return RagStats(log_prior_bk=logp_bk, seq_logprob_bk=seq_bk, log_posterior_bk=post_bk,
                  rag_sequence_logprob_b=seq_b, rag_token_logprob_b=tok_b,
                  prior_entropy_b=_entropy(logp_bk), posterior_entropy_b=_entropy(post_bk),
                  num_tokens_b=jnp.sum(mask_bt, axis=-1).astype(jnp.float32))
