"""DPR's contrastive bi-encoder loss with in-batch and hard negatives (Karpukhin et al. 2020,
"Dense Passage Retrieval for Open-Domain Question Answering", arXiv:2004.04906, §3.2 eq. 2), and
the mask that keeps gold passages out of the mined hard negatives.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ragjax.objectives.reduce import REDUCTIONS, check_reduce, reduce_loss

_HIGHEST = jax.lax.Precision.HIGHEST


class DprLoss(NamedTuple):
  """`dpr_contrastive_loss` output (float32), reduced alike: [B] per query, a sum, or a mean."""
  loss: jax.Array        # NLL of the positive among all B + B*N candidates
  accuracy: jax.Array    # 1 where the positive scores top (argmax; ties go to the lower index)


def dpr_contrastive_loss(query_bd: jax.Array, positive_bd: jax.Array,
                         hard_negative_bnd: jax.Array | None = None, *,
                         hard_negative_mask_bn: jax.Array | None = None,
                         positive_ids_b: jax.Array | None = None,
                         reduce: str = "mean") -> DprLoss:
  """DPR's in-batch + hard-negative NLL, Karpukhin et al. 2020 §3.2 eq. 2.

    L(q_b, p_b^+, p_1^-, .., p_n^-) = -log e^{q_b·p_b^+} / (e^{q_b·p_b^+} + sum_j e^{q_b·p_j^-})
  where the negatives p_j^- of query b are the other B-1 queries' positives ("in-batch
  negatives", §3.2) and all B*N hard negatives of the batch (its own and the others', as DPR's
  `BiEncoderNllLoss` on the [B, B + B*N] score matrix). Candidates c = [positives (B);
  hard negatives (B*N, example-major)], logits_bc = q_b·cand_c in float32, and
    loss_b = logsumexp_c logits_bc - logits_bb.
  A False in `hard_negative_mask_bn` removes that candidate for every query (score -inf); see
  `exclude_gold_mask`. With `positive_ids_b`, another query's positive that is the same passage
  as query b's (two questions about one passage in a batch: an in-batch false negative) is
  removed from query b's candidates; without it such a duplicate counts as a negative.

  Args:
    query_bd: [B, D] query embeddings, any float dtype.
    positive_bd: [B, D] the positive passage of each query.
    hard_negative_bnd: optional [B, N, D] hard negatives mined for each query.
    hard_negative_mask_bn: optional [B, N] bool/0-1, 1 on real hard-negative slots.
    positive_ids_b: optional [B] int ids (e.g. corpus rows) of the positives.
    reduce: "mean" (DPR: `F.nll_loss(..., reduction="mean")`) | "sum" | "none".
  Returns:
    DprLoss(loss, accuracy): float32 scalars ("mean": fraction correct, "sum": number correct)
    or [B] for reduce="none".
  Raises:
    ValueError on mismatched shapes, a mask without hard negatives, or an unknown reduce.
  """
  check_reduce(reduce, REDUCTIONS)
  q_bd, p_bd = jnp.asarray(query_bd), jnp.asarray(positive_bd)
  if q_bd.ndim != 2 or p_bd.shape != q_bd.shape:
    raise ValueError(f"expected query [B, D] and positive [B, D] of the same shape, got "
                     f"{q_bd.shape} and {p_bd.shape}")
  b, d = q_bd.shape
  cand_cd = p_bd.astype(jnp.float32)
  col_valid_c = None
  if hard_negative_bnd is not None:
    hn_bnd = jnp.asarray(hard_negative_bnd)
    if hn_bnd.ndim != 3 or hn_bnd.shape[0] != b or hn_bnd.shape[2] != d:
      raise ValueError(f"hard_negative_bnd must be [B, N, D] = [{b}, N, {d}], got shape "
                       f"{hn_bnd.shape}")
    n = hn_bnd.shape[1]
    cand_cd = jnp.concatenate([cand_cd, hn_bnd.astype(jnp.float32).reshape(b * n, d)], axis=0)
    if hard_negative_mask_bn is not None:
      mask_bn = jnp.asarray(hard_negative_mask_bn)
      if mask_bn.shape != (b, n):
        raise ValueError(f"hard_negative_mask_bn shape {mask_bn.shape} != (B, N) = {(b, n)} of "
                         f"hard_negative_bnd {hn_bnd.shape}")
      col_valid_c = jnp.concatenate([jnp.ones((b,), bool), (mask_bn != 0).reshape(b * n)])
  elif hard_negative_mask_bn is not None:
    raise ValueError("hard_negative_mask_bn given without hard_negative_bnd")

  logits_bc = jnp.einsum("bd,cd->bc", q_bd.astype(jnp.float32), cand_cd, precision=_HIGHEST)
  if col_valid_c is not None:
    logits_bc = jnp.where(col_valid_c[None, :], logits_bc, -jnp.inf)
  idx_b = jnp.arange(b)
  if positive_ids_b is not None:
    ids_b = jnp.asarray(positive_ids_b)
    if ids_b.shape != (b,):
      raise ValueError(f"positive_ids_b shape {ids_b.shape} != (B,) = {(b,)}")
    dup_bb = (ids_b[:, None] == ids_b[None, :]) & (idx_b[:, None] != idx_b[None, :])
    dup_bc = jnp.concatenate([dup_bb, jnp.zeros((b, cand_cd.shape[0] - b), bool)], axis=1)
    logits_bc = jnp.where(dup_bc, -jnp.inf, logits_bc)
  pos_b = logits_bc[idx_b, idx_b]
  loss_b = jax.nn.logsumexp(logits_bc, axis=-1) - pos_b
  correct_b = (jnp.argmax(logits_bc, axis=-1) == idx_b).astype(jnp.float32)
  return DprLoss(loss=reduce_loss(loss_b, reduce), accuracy=reduce_loss(correct_b, reduce))


def exclude_gold_mask(candidate_ids_bn: jax.Array, gold_ids_bg: jax.Array) -> jax.Array:
  """Which mined hard negatives to keep: [B, N] bool, False on padding and on gold passages.

  keep_bn[b, n] = candidate_ids_bn[b, n] >= 0 and candidate_ids_bn[b, n] not in gold_ids_bg[b]
  (DPR §3.2 mines BM25 negatives "that do not contain the answer"; a retrieved passage that is
  one of the query's gold passages must not be a negative). Feed it to `dpr_contrastive_loss`
  as `hard_negative_mask_bn`.

  Args:
    candidate_ids_bn: [B, N] int passage ids of the candidate hard negatives, -1 (any negative
      id) = padding.
    gold_ids_bg: [B, G] int gold passage ids of each query, -1 (any negative id) = padding.
  Returns:
    [B, N] bool.
  Raises:
    ValueError on non-integer ids or mismatched shapes.
  """
  cand_bn, gold_bg = jnp.asarray(candidate_ids_bn), jnp.asarray(gold_ids_bg)
  if not (jnp.issubdtype(cand_bn.dtype, jnp.integer) and jnp.issubdtype(gold_bg.dtype,
                                                                         jnp.integer)):
    raise ValueError(f"ids must be integer arrays, got {cand_bn.dtype} and {gold_bg.dtype}")
  if cand_bn.ndim != 2 or gold_bg.ndim != 2 or cand_bn.shape[0] != gold_bg.shape[0]:
    raise ValueError(f"expected candidate_ids [B, N] and gold_ids [B, G], got {cand_bn.shape} "
                     f"and {gold_bg.shape}")
  hit_bn = jnp.any(cand_bn[:, :, None] == gold_bg[:, None, :], axis=-1)
  return (cand_bn >= 0) & ~hit_bn            # a padded gold id (< 0) cannot match a kept one
