"""Fusion-in-Decoder reader (Izacard & Grave 2021, "Leveraging Passage Retrieval with Generative
Models for Open Domain Question Answering", arXiv:2007.01282, §3) on the RAG generator, trained
with Atlas's retriever objectives (Izacard et al. 2022, arXiv:2208.03299, §2.2).

  encoder:  each (question, passage) context apart     [B, K, L] -> [B*K, L, E]
  decoder:  one cross-attention over their concatenation [B, K*L, E] -> logits [B, T, V]
  loss:     -log p(y | x, z_1..z_K)  (FiD eq. in §3: no latent passage, the reader fuses them)

The reader reads the first `reader_k` of the batch's K_r retrieved passages (best first); the
retriever objective scores all K_r (Atlas's `retriever_n_context` >= `n_context`). FiD has no
path from the doc scores to the NLL, so the retriever trains only through `retriever_loss`:

  "adist"  the reader's cross-attention on each passage (`aggregate_cross_attention`: mean over
           heads, layers and target tokens of alpha * ||v||, summed over the passage's tokens)
  "pdist" / "emdr2"  the reader run on each passage alone, log p(y | x, z_k)
  "emdr2_token"      the same runs token by token, log p(y_t | x, z_k, y_<t) `[B, K_r, T]`
                     (the logits divided by the target temperature first, as Atlas's code)
  "loop"   the reader with passage k masked out of the cross-attention, log p(y | x, Z \\ z_k)

Targets come from a deterministic pass under stop-gradient over all K_r passages (Atlas's eval-
mode `eval_score` pass); when the training pass is itself deterministic and K_r = K it is reused.
Because the encoder reads each context apart, "each passage alone" and "all but one" are the
same encoder states decoded with other cross-attention masks (T5 and BART cross-attention carry
no position, so a passage's slot in the concatenation does not matter).

Params are the RAG model's (`ragjax.models.rag.RagModel`); every function here is jittable.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from ragjax.models.rag import (RagModel, batch_doc_scores, batch_targets, doc_score_stats,
                               in_batch_scores, negative_stats)
from ragjax.objectives import rag_losses as losses
from ragjax.objectives import retriever_losses
from ragjax.objectives.retriever_losses import pad_negatives

Array = jax.Array
FID_RETRIEVER_LOSSES = ("none", "adist", "pdist", "emdr2", "emdr2_token", "loop")


def fid_encode(mdl: RagModel, context_ids_bkl, context_mask_bkl, *, deterministic: bool = True):
  """Encoder states of the K contexts, each encoded apart and concatenated per example:
  `([B, K*L, E] cfg.dtype, mask [B, K*L] int)` (FiD §3)."""
  b, k, length = context_ids_bkl.shape
  enc_nle = mdl.encode_contexts(context_ids_bkl, context_mask_bkl, deterministic=deterministic)
  return enc_nle.reshape(b, k * length, -1), context_mask_bkl.reshape(b, k * length)


def fid_decode(mdl: RagModel, decoder_input_ids_bt, encoded_bse, encoder_mask_bs,
               decoder_mask_bt=None, *, deterministic: bool = True):
  """Teacher-forced logits `[B, T, V]` float32 over fused encoder states `[B, S, E]`."""
  return mdl.generator.decode(decoder_input_ids_bt, encoded_bse, encoder_mask_bs,
                              decoder_mask_bt, deterministic=deterministic)


def fid_logits(mdl: RagModel, context_ids_bkl, context_mask_bkl, decoder_input_ids_bt,
               decoder_mask_bt=None, *, deterministic: bool = True):
  """FiD logits log p(y_t | x, z_1..z_K, y_<t) before softmax: contexts `[B, K, L]` int32,
  decoder inputs `[B, T]` -> `[B, T, V]` float32. Use as `model.apply(v, ..., method=fid_logits)`;
  with `mutable=["intermediates"]` the decoder's cross-attention is returned too
  (`cross_attention_of`)."""
  enc_bse, mask_bs = fid_encode(mdl, context_ids_bkl, context_mask_bkl,
                                deterministic=deterministic)
  return fid_decode(mdl, decoder_input_ids_bt, enc_bse, mask_bs, decoder_mask_bt,
                    deterministic=deterministic)


def cross_attention_of(intermediates: dict, k: int, length: int) -> tuple[Array, Array]:
  """The sown decoder cross-attention of a FiD pass: `(attn [N, B, H, T, K, L] float32,
  value_norm [N, B, H, K, L] float32)` over the N decoder layers in order, the key axis K*L
  split into (passage, token).

  Raises: ValueError when the intermediates hold no decoder cross-attention.
  """
  layers = intermediates["generator"]["decoder"]
  names = sorted((n for n in layers if re.fullmatch(r"layer_\d+", n)), key=lambda n: int(n[6:]))
  attn, vnorm = [], []
  for name in names:
    sown = layers[name].get("cross_attn", {})
    if "cross_attention" not in sown:
      raise ValueError(f"no cross_attention sown in decoder {name}: apply with "
                       "mutable=['intermediates']")
    a = sown["cross_attention"][0]                                # [B, H, T, K*L]
    attn.append(a.reshape(a.shape[:3] + (k, length)))
    v = sown["value_norm"][0]                                     # [B, H, K*L]
    vnorm.append(v.reshape(v.shape[:2] + (k, length)))
  if not attn:
    raise ValueError("no decoder layers in the intermediates")
  return jnp.stack(attn), jnp.stack(vnorm)


def _seq_logprob(logits_ntv, targets_nt, mask_nt) -> Array:
  """sum_t mask * log p(y_t | ...): `[N]` float32 (`losses.sequence_logprob` with one passage)."""
  return losses.sequence_logprob(logits_ntv[:, None], targets_nt, mask_nt)[:, 0]


def _subset_logits(mdl: RagModel, enc_bse, mask_bs, keep_bsk, k: int, dec_bt) -> Array:
  """Decoder logits `[B*S, T, V]` for S passage subsets per example (`keep_bsk` `[B, S, K]`
  bool): the encoder states decoded with the cross-attention restricted to the kept passages'
  tokens."""
  b, s, _ = keep_bsk.shape
  length = mask_bs.shape[1] // k
  keep_bss = jnp.repeat(keep_bsk, length, axis=-1)                # [B, S, K*L]
  sub_ns = (mask_bs[:, None, :] * keep_bss).reshape(b * s, -1)
  return fid_decode(mdl, jnp.repeat(dec_bt, s, axis=0), jnp.repeat(enc_bse, s, axis=0), sub_ns)


def fid_loss(model: RagModel, params, batch: dict, label_smoothing: float = 0.0, *,
             reduce: str = "mean", deterministic: bool = True, rng: Array | None = None,
             retriever_loss: str = "none", retriever_temperature: float = 1.0,
             target_temperature: float = 1.0, retriever_weight: float = 1.0,
             reader_k: int | None = None, null_baseline: bool = False,
             in_batch_negatives: bool = False) -> tuple[Array, dict]:
  """`(loss, aux)` of one batch for the FiD reader, jittable.

  The batch is `rag_loss`'s: doc-score inputs for K_r passages (`batch_doc_scores`), contexts
  `context_input_ids` / `context_attention_mask` `[B, K_r, L]` best first, targets
  (`batch_targets`). loss = `losses.seq2seq_nll` of the FiD logits on the first `reader_k`
  (default K_r) contexts (token-summed per example, label smoothing as the RAG losses; `reduce`
  "mean" | "sum" | "none"), plus `retriever_weight` times the retriever objective (module
  docstring; Atlas §2.2) on all K_r scores, its KL reduced as Atlas ("elementwise_mean");
  `null_baseline` (not emdr2_token) and `in_batch_negatives` (adist, pdist, emdr2,
  emdr2_token; the batch then needs `passage_embeddings` and `doc_ids`) as in `rag_loss`.

  aux (float32 scalars, batch means): `nll_per_token`, `num_tokens`, `retrieval_entropy`,
  `top1_prior`, `doc_score_*` (`doc_score_stats`); with a retriever loss `retriever_loss`, and
  `posterior_entropy` and `posterior_prior_kl` (of p(z|x) p(y|x,z) over the K_r passages) for
  pdist / emdr2 / emdr2_token.

  Raises: ValueError for an unknown retriever loss, reader_k outside [1, K_r], or dropout without
  `rng`; KeyError for a batch without doc-score inputs.
  """
  if retriever_loss not in FID_RETRIEVER_LOSSES:
    raise ValueError(f"retriever_loss {retriever_loss!r}: expected one of {FID_RETRIEVER_LOSSES}")
  if not deterministic and rng is None:
    raise ValueError("fid_loss: deterministic=False needs rng (dropout)")
  rngs = None if deterministic else {"dropout": rng}
  ids_bkl, cmask_bkl = batch["context_input_ids"], batch["context_attention_mask"]
  b, k_r, length = ids_bkl.shape
  k = k_r if reader_k is None else int(reader_k)
  if not 1 <= k <= k_r:
    raise ValueError(f"reader_k={k}: expected 1 <= it <= the batch's K_r={k_r} passages")
  dec_bt, targets_bt, mask_bt = batch_targets(batch, model.generator_cfg.pad_token_id)
  v = {"params": params}
  want_attn = retriever_loss == "adist" and deterministic and k == k_r
  out = model.apply(v, ids_bkl[:, :k], cmask_bkl[:, :k], dec_bt, method=fid_logits,
                    deterministic=deterministic, rngs=rngs,
                    mutable=["intermediates"] if want_attn else False)
  logits_btv, sown = out if want_attn else (out, None)
  loss = losses.seq2seq_nll(logits_btv, targets_bt, mask_bt, label_smoothing=label_smoothing,
                            reduce=reduce)
  tokens_b = jnp.sum(mask_bt != 0, axis=-1).astype(jnp.float32)
  nll_b = -jax.lax.stop_gradient(_seq_logprob(logits_btv, targets_bt, mask_bt))
  aux = dict(nll_per_token=jnp.sum(nll_b) / jnp.maximum(jnp.sum(tokens_b), 1.0),
             num_tokens=jnp.mean(tokens_b))
  if retriever_loss == "none" and not any(key in batch for key in (
      "passage_input_ids", "passage_embeddings", "doc_scores")):
    return loss, aux
  scores_bk = batch_doc_scores(model, params, batch, deterministic=deterministic, rngs=rngs)
  s_bk = jax.lax.stop_gradient(scores_bk)
  p_bk = jnp.exp(losses.retrieval_log_prior(doc_scores_bk=s_bk))
  aux.update(retrieval_entropy=jnp.mean(losses.retrieval_entropy(s_bk)),
             top1_prior=jnp.mean(jnp.max(p_bk, axis=-1)), **doc_score_stats(scores_bk))
  if retriever_loss == "none":
    return loss, aux
  negatives = in_batch_scores(model, params, batch, scores_bk, rngs) if in_batch_negatives else None
  r_loss, r_aux = _retriever_term(model, params, batch, scores_bk, sown, retriever_loss,
                                  retriever_temperature, target_temperature,
                                  (dec_bt, targets_bt, mask_bt), null_baseline, negatives)
  aux.update(retriever_loss=r_loss, **r_aux)
  if negatives is not None:
    aux.update(negative_stats(negatives, k_r, retriever_temperature))
  return loss + retriever_weight * r_loss, aux


def _retriever_term(model, params, batch, scores_bk, sown, name, t_retr, t_tgt, targets,
                    null_baseline=False, negatives_bn=None):
  """The retriever objective `name` on `scores_bk` `[B, K_r]` against a stop-gradient reader
  target over all K_r passages: `(float32 scalar, extra aux)`. With `negatives_bn` (`[B, N]`,
  `in_batch_scores`) the objective's scores are those, its target -inf past the first K_r."""
  dec_bt, targets_bt, mask_bt = targets
  if negatives_bn is not None:
    if name == "loop":
      raise ValueError("in-batch negatives extend adist, pdist, emdr2 or emdr2_token, not loop")
    obj_scores, pad = negatives_bn, (lambda t: pad_negatives(t, negatives_bn.shape[1]))
    # Atlas's elementwise mean is over the B*K_r scored passages, not the padded B*B*K_r
    kl_reduce, kl_scale = "mean", 1.0 / scores_bk.shape[1]
  else:
    obj_scores, pad = scores_bk, (lambda t: t)
    kl_reduce, kl_scale = "elementwise_mean", 1.0
  ids_bkl, cmask_bkl = batch["context_input_ids"], batch["context_attention_mask"]
  b, k_r, length = ids_bkl.shape
  sg = jax.lax.stop_gradient
  if name == "adist":
    if sown is None:  # Atlas's eval-mode pass over all K_r passages
      _, sown = model.apply({"params": sg(params)}, ids_bkl, cmask_bkl, dec_bt,
                            method=fid_logits, mutable=["intermediates"])
    attn, vnorm = cross_attention_of(sown["intermediates"], k_r, length)
    target_bk = retriever_losses.aggregate_cross_attention(
        sg(attn), cmask_bkl, mask_bt, value_norm_nbhkl=sg(vnorm))
    logp_t_bk = jax.nn.log_softmax(target_bk / t_tgt, axis=-1)   # the distilled target
    diag = {"target_entropy": jnp.mean(-jnp.sum(jnp.exp(logp_t_bk) * logp_t_bk, axis=-1)),
            "target_top1_is_retriever_top1": jnp.mean(
                (jnp.argmax(target_bk, -1) == jnp.argmax(sg(scores_bk), -1)).astype(jnp.float32))}
    return kl_scale * retriever_losses.attention_distillation_loss(
        obj_scores, pad(target_bk), retriever_temperature=t_retr, target_temperature=t_tgt,
        null_baseline=null_baseline, reduce=kl_reduce), diag
  enc_bse, fmask_bs = model.apply({"params": sg(params)}, ids_bkl, cmask_bkl, method=fid_encode)
  enc_bse = sg(enc_bse)
  eye_kk = jnp.eye(k_r, dtype=bool)
  keep_kk = eye_kk if name in ("pdist", "emdr2", "emdr2_token") else ~eye_kk  # alone | all but one
  keep_bkk = jnp.broadcast_to(keep_kk, (b, k_r, k_r))
  logits = sg(model.apply({"params": sg(params)}, enc_bse, fmask_bs, keep_bkk, k_r, dec_bt,
                          method=_subset_logits))
  logits_bktv = logits.reshape((b, k_r) + logits.shape[1:])        # one decode per subset
  logp_bk = losses.sequence_logprob(logits_bktv, targets_bt, mask_bt)  # log p(y | x, subset k)
  tokens_b1 = jnp.maximum(jnp.sum(mask_bt != 0, axis=-1), 1).astype(jnp.float32)[:, None]
  if name == "loop":
    return retriever_losses.leave_one_out_loss(
        scores_bk, logp_bk / tokens_b1, retriever_temperature=t_retr,
        target_temperature=t_tgt, null_baseline=null_baseline), {}
  log_prior_bk = losses.retrieval_log_prior(doc_scores_bk=sg(scores_bk))
  post_bk = jax.nn.log_softmax(log_prior_bk + logp_bk, axis=-1)   # p(z|x,y), Bayes' rule
  q_bk = jnp.exp(post_bk)
  post_entropy = jnp.mean(-jnp.sum(jnp.where(q_bk > 0, q_bk * post_bk, 0.0), axis=-1))
  kl = jnp.mean(jnp.sum(jnp.where(q_bk > 0, q_bk * (post_bk - log_prior_bk), 0.0), axis=-1))
  if name == "pdist":
    r_loss = kl_scale * retriever_losses.perplexity_distillation_loss(
        obj_scores, pad(logp_bk / tokens_b1), retriever_temperature=t_retr,
        target_temperature=t_tgt, null_baseline=null_baseline, reduce=kl_reduce)
  elif name == "emdr2_token":  # the tempered per-token target (Atlas's temperature_gold)
    token_bkt = retriever_losses.token_logprobs(logits_bktv, targets_bt, temperature=t_tgt)
    r_loss = retriever_losses.emdr_token_loss(obj_scores, pad(token_bkt), mask_bt,
                                              retriever_temperature=t_retr,
                                              null_baseline=null_baseline)
  else:
    r_loss = retriever_losses.emdr_loss(obj_scores, pad(logp_bk), retriever_temperature=t_retr,
                                        null_baseline=null_baseline)
  return r_loss, {"posterior_entropy": post_entropy, "posterior_prior_kl": kl}
