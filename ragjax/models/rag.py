"""The RAG model of Lewis et al. 2020 ("Retrieval-Augmented Generation for Knowledge-Intensive
NLP Tasks", arXiv:2005.11401): a DPR bi-encoder retriever and a seq2seq generator, as one Flax
(linen) module plus the host-side glue and the jittable loss.

  retriever (§2.2, DPR eq. 1):  score(x, z) = d(z)ᵀ q(x),  p_eta(z|x) = softmax_z over the top K
  generator (§2.3):             p_theta(y_i | x, z, y_<i), input "title / passage // question"

    model = RagModel(query_cfg, generator_cfg, passage_cfg=passage_cfg)
    params = {"bi_encoder": {"query_encoder": q, "passage_encoder": p}, "generator": g}
    loss_fn = functools.partial(rag_loss, model, loss_name="rag_token", label_smoothing=0.1)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)

Given query tokens and retrieved passage embeddings, the loss re-runs the query encoder and
recomputes the doc scores from the live q(x), so gradients reach it (RAG §2.4 "Training": the
document encoder and index stay fixed, the query encoder and the generator are fine-tuned);
given passage tokens instead, it re-encodes the retrieved passages with the passage encoder,
which then trains too. Decoding lives in `ragjax.decoding.rag`; the generator inputs `[B, K, L]`
are assembled by `ragjax.system.inputs`. Equations are numbered as in
`ragjax.objectives.rag_losses` (eq. 1 retriever prior, eq. 2 RAG-Sequence, eq. 3 RAG-Token).
Parameters: `{"bi_encoder": {"query_encoder", "passage_encoder"}, "generator": Seq2Seq params}`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from ragjax import sharding as sh
from ragjax.models.bert import BertConfig, BiEncoder
from ragjax.models.seq2seq import Seq2Seq, Seq2SeqConfig
from ragjax.objectives import dpr as dpr_objective
from ragjax.objectives import rag_losses as losses
from ragjax.objectives import retriever_losses
from ragjax.objectives.retriever_losses import pad_negatives

Array = jax.Array


class RagModel(nn.Module):
  """DPR bi-encoder (`bi_encoder`: query tower E_Q, passage tower E_P) + generator (`generator`).

  Shapes: B examples, K passages each, Lq query tokens, L context tokens, T decoder positions,
  D retrieval dimension, V generator vocabulary. All methods take `deterministic` (dropout off
  unless False, then apply with `rngs={"dropout": key}`).
  """
  query_cfg: BertConfig
  generator_cfg: Seq2SeqConfig
  passage_cfg: BertConfig | None = None
  shared_encoders: bool = False
  # Doc scores are q·d * doc_score_scale (an inverse temperature). DPR's unnormalised inner
  # products need none (1.0, RAG as published); L2-normalised encoders (MiniLM) give cosines in
  # [-1, 1] whose softmax over K is nearly uniform, so a scale such as 20 (sentence-transformers'
  # MultipleNegativesRankingLoss; 1/temperature in Atlas' attention distillation) is used.
  doc_score_scale: float = 1.0

  def setup(self):
    self.bi_encoder = BiEncoder(self.query_cfg, self.passage_cfg, self.shared_encoders)
    self.generator = Seq2Seq(self.generator_cfg)

  def encode_query(self, query_ids_bl, query_mask_bl, *, deterministic: bool = True):
    """q(x): `[B, Lq]` int32 ids and mask -> `[B, D]` float32 (DPR eq. 1's E_Q)."""
    return self.bi_encoder.encode_query(query_ids_bl, query_mask_bl, deterministic=deterministic)

  def encode_passages(self, passage_ids_bkl, passage_mask_bkl, *, deterministic: bool = True):
    """d(z) of the retrieved passages: `[B, K, Lp]` int32 -> `[B, K, D]` float32 (E_P)."""
    b, k, length = passage_ids_bkl.shape
    p_nd = self.bi_encoder.encode_passage(passage_ids_bkl.reshape(b * k, length),
                                          passage_mask_bkl.reshape(b * k, length),
                                          deterministic=deterministic)
    return p_nd.reshape(b, k, -1)

  def retrieve_scores(self, query_ids_bl, query_mask_bl, passage_embeddings_bkd, *,
                      deterministic: bool = True):
    """Doc scores `[B, K]` float32 = q(x)·d(z_k) * doc_score_scale (DPR eq. 1), q from the LIVE query encoder so
    the loss's gradient reaches it; `passage_embeddings_bkd` `[B, K, D]` (any float dtype) are
    the retrieved passages' vectors (HF: `torch.bmm(q.unsqueeze(1), d.transpose(1, 2))`).

    Raises: ValueError when D of the query encoder and of the passages differ.
    """
    q_bd = self.encode_query(query_ids_bl, query_mask_bl, deterministic=deterministic)
    if passage_embeddings_bkd.shape[-1] != q_bd.shape[-1]:
      raise ValueError(f"passage embeddings {passage_embeddings_bkd.shape} do not match the "
                       f"query encoder's dimension {q_bd.shape[-1]}")
    scores_bk = jnp.einsum("bd,bkd->bk", q_bd.astype(jnp.float32),
                           passage_embeddings_bkd.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
    if self.doc_score_scale != 1.0:
      scores_bk = scores_bk * self.doc_score_scale
    return nn.with_logical_constraint(scores_bk, (sh.BATCH, sh.PASSAGES))

  def encode_contexts(self, context_ids_bkl, context_mask_bkl, *, deterministic: bool = True):
    """Generator encoder states of the K contexts, flattened batch-major: `[B*K, L, E]` (row
    b*K + k is passage k of example b, as HF's `context_input_ids`)."""
    b, k, length = context_ids_bkl.shape
    return self.generator.encode(context_ids_bkl.reshape(b * k, length),
                                 context_mask_bkl.reshape(b * k, length),
                                 deterministic=deterministic)

  def generator_logits(self, context_ids_bkl, context_mask_bkl, decoder_input_ids_bt,
                       decoder_mask_bt=None, *, deterministic: bool = True):
    """Teacher-forced logits log p_theta(. | x, z_k, y_<t) before softmax: `[B, K, T, V]` f32.

    The B*K contexts `[B, K, L]` go through the generator as one batch; the decoder inputs
    `[B, T]` (start token first) are repeated K times (HF `repeat_interleave(n_docs)`).
    """
    b, k, _ = context_ids_bkl.shape
    t = decoder_input_ids_bt.shape[1]
    enc_nle = self.encode_contexts(context_ids_bkl, context_mask_bkl, deterministic=deterministic)
    dec_nt = jnp.repeat(decoder_input_ids_bt, k, axis=0)
    dec_mask_nt = None if decoder_mask_bt is None else jnp.repeat(decoder_mask_bt, k, axis=0)
    logits_ntv = self.generator.decode(dec_nt, enc_nle, context_mask_bkl.reshape(b * k, -1),
                                       dec_mask_nt, deterministic=deterministic)
    logits_bktv = logits_ntv.reshape(b, k, t, -1)
    return nn.with_logical_constraint(logits_bktv, (sh.BATCH, sh.PASSAGES, sh.LENGTH, sh.VOCAB))

  def __call__(self, query_ids_bl, query_mask_bl, passage_embeddings_bkd, context_ids_bkl,
               context_mask_bkl, decoder_input_ids_bt, *, deterministic: bool = True):
    """`(doc_scores [B, K], logits [B, K, T, V])`: `retrieve_scores` and `generator_logits`."""
    scores_bk = self.retrieve_scores(query_ids_bl, query_mask_bl, passage_embeddings_bkd,
                                     deterministic=deterministic)
    logits_bktv = self.generator_logits(context_ids_bkl, context_mask_bkl, decoder_input_ids_bt,
                                        deterministic=deterministic)
    return scores_bk, logits_bktv

  def init_all(self, query_ids_bl, context_ids_bkl, decoder_input_ids_bt):
    """Touches every tower (for `init`): query, passage (on the contexts) and generator."""
    q_bd = self.encode_query(query_ids_bl, jnp.ones_like(query_ids_bl))
    ones_bkl = jnp.ones_like(context_ids_bkl)
    p_bkd = self.encode_passages(context_ids_bkl, ones_bkl)
    return q_bd, p_bkd, self.generator_logits(context_ids_bkl, ones_bkl, decoder_input_ids_bt)


def init_params(model: RagModel, rng: Array, *, boxed: bool = False):
  """Random parameters of every tower (logically boxed if `boxed`; wrap in `jax.eval_shape`
  for shapes only)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  variables = model.init(rng, ids, ids[:, None], ids, method=RagModel.init_all)
  params = variables["params"]
  return params if boxed else meta.unbox(params)


# ---------------------------------------------------------------------------------- the loss

def batch_targets(batch: dict, pad_id: int) -> tuple[Array, Array, Array]:
  """`(decoder_input_ids [B, T], targets [B, T], target_mask [B, T])` from a batch holding either
  HF-style `labels` (start token first; targets = labels[:, 1:] + pad, `losses.shift_targets`)
  or explicit `decoder_input_ids`, `targets` and `target_mask`."""
  if "labels" in batch:
    labels_bt = jnp.asarray(batch["labels"])
    targets_bt, mask_bt = losses.shift_targets(labels_bt, pad_id)
    return labels_bt, targets_bt, mask_bt
  return batch["decoder_input_ids"], batch["targets"], batch["target_mask"]


def batch_doc_scores(model: RagModel, params, batch: dict, *, deterministic: bool = True,
                     rngs=None) -> Array:
  """Doc scores `[B, K]` for a batch, by the first key present:
  `passage_input_ids`/`passage_attention_mask` `[B, K, Lp]` (live query AND passage encoders),
  `passage_embeddings` `[B, K, D]` (live query encoder; both need `query_input_ids` /
  `query_attention_mask` `[B, Lq]`), or fixed `doc_scores` `[B, K]` (no retriever gradient).

  Raises: KeyError when none is present.
  """
  v = {"params": params}
  if "passage_input_ids" in batch:
    def live(mdl, q_ids_bl, q_mask_bl, p_ids_bkl, p_mask_bkl):
      p_bkd = mdl.encode_passages(p_ids_bkl, p_mask_bkl, deterministic=deterministic)
      return mdl.retrieve_scores(q_ids_bl, q_mask_bl, p_bkd, deterministic=deterministic)
    return model.apply(v, batch["query_input_ids"], batch["query_attention_mask"],
                       batch["passage_input_ids"], batch["passage_attention_mask"],
                       method=live, rngs=rngs)
  if "passage_embeddings" in batch:
    return model.apply(v, batch["query_input_ids"], batch["query_attention_mask"],
                       batch["passage_embeddings"], method=RagModel.retrieve_scores,
                       deterministic=deterministic, rngs=rngs)
  if "doc_scores" in batch:
    return jnp.asarray(batch["doc_scores"], jnp.float32)
  raise KeyError("batch needs passage_input_ids, passage_embeddings (with query_input_ids) or "
                 "doc_scores")


TARGET_EVIDENCE = ("likelihood", "contrastive", "random")
RAG_RETRIEVER_LOSSES = ("none", "pdist", "emdr2", "emdr2_token", "loop")


def rag_loss(model: RagModel, params, batch: dict, loss_name: str = "rag_token",
             label_smoothing: float = 0.0, *, reduce: str = "mean", deterministic: bool = True,
             rng: Array | None = None, retriever_loss: str = "none",
             retriever_temperature: float = 1.0, target_temperature: float = 1.0,
             retriever_weight: float = 1.0, reader_k: int | None = None,
             target_evidence: str = "likelihood",
             null_baseline: bool = False, in_batch_negatives: bool = False
             ) -> tuple[Array, dict]:
  """`(loss, aux)` of one batch, jittable (close over everything but `params`, `batch`, `rng`).

  doc scores `[B, K]` from `batch_doc_scores` (live query encoder: RAG §2.4), generator logits
  `[B, K, T, V]` on `context_input_ids` / `context_attention_mask` `[B, K, L]`, targets from
  `batch_targets`, then `losses.get_loss_fn(loss_name)` (RAG eq. 1-3 as in
  `ragjax.objectives.rag_losses`:
  HF's get_nll, token-summed NLL per example; `reduce` "mean" | "sum" | "none").

  aux (float32 scalars, batch means): `retrieval_entropy` H(p_eta(z|x)) (log K = uniform,
  0 = one passage), `posterior_entropy` H(p(z|x,y)), `posterior_prior_kl` KL(p(z|x,y) ||
  p_eta(z|x)) in nats (how much the reader's evidence moves the prior; 0 while the generator
  does not read its passages), `top1_prior` max_z p_eta(z|x),
  `doc_score_mean` / `doc_score_std` / `doc_score_max` / `doc_score_margin` (best minus
  second-best score; 0 when K = 1), `nll_per_token` (RAG-Sequence -log p(y|x) / tokens),
  `num_tokens`.

  `retriever_loss` other than "none" trains the retriever by an Atlas objective instead of
  through the marginal (Izacard et al. 2022, §2.2): the marginal NLL then reads the doc scores
  under stop-gradient (it trains the generator only) and `retriever_weight` times the objective
  is added, on the same K passages, with the reader-side target under stop-gradient:
  "pdist" (`perplexity_distillation_loss`, target the per-token mean log p(y|x,z)), "emdr2"
  (`emdr_loss`, sequence level), "emdr2_token" (`emdr_token_loss`, the token-level form of
  Atlas's code: -sum_t log sum_z p(z|x) p(y_t|x,z,y_<t) averaged over the batch's answer tokens,
  the reader's token log-likelihoods `[B, K_r, T]` from its logits / `target_temperature`,
  Atlas's temperature_gold), "loop" (`leave_one_out_loss`, target the per-token mean of
  log p(y|x, Z without z) = log sum_{j != z} p(j|x) p(y|x,j) / sum_{j != z} p(j|x): this
  reader reads each passage apart, so leaving one out is a re-marginalisation); the KL losses
  reduce as Atlas does ("elementwise_mean"). aux then has `retriever_loss` (its value).
  `null_baseline` trains against the target minus its mean under exchangeable evidence
  (`retriever_losses.null_baselined`). `in_batch_negatives` scores each query against the
  other examples' K_r passages too (`[B, B*K_r]`, from `passage_embeddings`; a passage that is
  also one of its own, by `doc_ids` `[B, K_r]`, is left out), with target mass 0 there, as
  DPR's in-batch negatives: the top-K objective alone does not see a move shared by every
  query, which the corpus-wide ranking does (`experiments/bios.py`).

  `reader_k` (default: the batch's K_r) < K_r separates Atlas's two K: the generator and the
  marginal read the first `reader_k` passages (best first) while the retriever objective scores
  all K_r, its target from a deterministic stop-gradient pass on the others; the doc-score and
  entropy statistics are then over the K_r.

  `target_evidence="contrastive"` makes the reader-side evidence for the retriever objective
  question-specific: e_k = log p(y_i | x_i, z_k) - (T_i / T_j) log p(y_j | x_i, z_k), with y_j
  the answer of the next example in the batch (j = i + 1 mod B; T the answers' token counts),
  so the per-token target is the difference of two per-token means. A passage that raises every
  answer alike (the generator's answer prior before it reads; once thought the cause of the
  retriever collapse, refuted in `experiments/bios.py`) cancels out; one that supports this
  question's answer rather than another's gains (a pointwise-mutual-information reading of
  the reader's evidence). aux then also has `contrastive_evidence` (batch mean of e_k on the
  top passage).

  `target_evidence="random"` is a control, not a training method: the reader's evidence is
  replaced by i.i.d. noise e_bk ~ N(0, s_b^2), s_b the spread (standard deviation over the K_r
  passages) of the real log p(y|x,z) of example b, so the target keeps the reader's noise level
  but carries neither question content nor the generator's answer prior. It needs `rng`.

  Raises: ValueError for an unknown loss or retriever loss or evidence, emdr2_token with
  null_baseline or another target_evidence than "likelihood", reader_k outside
  [1, K_r], reader_k < K_r without a retriever loss, contrastive evidence with B < 2, or random
  evidence without rng;
  KeyError for a batch without doc-score inputs.
  """
  if target_evidence not in TARGET_EVIDENCE:
    raise ValueError(f"target_evidence {target_evidence!r}: expected one of {TARGET_EVIDENCE}")
  loss_fn = losses.get_loss_fn(loss_name)
  if retriever_loss not in RAG_RETRIEVER_LOSSES:
    raise ValueError(f"retriever_loss {retriever_loss!r}: expected one of {RAG_RETRIEVER_LOSSES} "
                     "(adist needs a FiD reader's cross-attention)")
  if retriever_loss == "emdr2_token" and target_evidence != "likelihood":
    raise ValueError("retriever_loss='emdr2_token' reads the reader's own token log-likelihoods: "
                     "target_evidence='likelihood' only")
  rngs = None if deterministic else {"dropout": rng}
  if not deterministic and rng is None:
    raise ValueError("rag_loss: deterministic=False needs rng (dropout)")
  dec_bt, targets_bt, mask_bt = batch_targets(batch, model.generator_cfg.pad_token_id)
  ids_bkl, cmask_bkl = batch["context_input_ids"], batch["context_attention_mask"]
  k_r = ids_bkl.shape[1]
  k = k_r if reader_k is None else int(reader_k)
  if not 1 <= k <= k_r:
    raise ValueError(f"reader_k={k}: expected 1 <= it <= the batch's K_r={k_r} passages")
  if k < k_r and retriever_loss == "none":
    raise ValueError(f"reader_k={k} < K_r={k_r}: the extra passages only serve a retriever_loss")
  scores_bk = batch_doc_scores(model, params, batch, deterministic=deterministic, rngs=rngs)
  logits_bktv = model.apply({"params": params}, ids_bkl[:, :k], cmask_bkl[:, :k], dec_bt,
                            method=RagModel.generator_logits, deterministic=deterministic,
                            rngs=rngs)
  reader_scores_bk = scores_bk if retriever_loss == "none" else jax.lax.stop_gradient(scores_bk)
  loss = loss_fn(logits_bktv, reader_scores_bk[:, :k], targets_bt, mask_bt,
                 label_smoothing=label_smoothing, reduce=reduce)
  target_logits = jax.lax.stop_gradient(logits_bktv)
  if k < k_r:  # the retriever objective's passages beyond the reader's, read apart
    rest = model.apply({"params": jax.lax.stop_gradient(params)}, ids_bkl[:, k:],
                       cmask_bkl[:, k:], dec_bt, method=RagModel.generator_logits)
    target_logits = jnp.concatenate([target_logits, jax.lax.stop_gradient(rest)], axis=1)
  stats = losses.marginal_answer_logprob(target_logits, jax.lax.stop_gradient(scores_bk),
                                         targets_bt, mask_bt)
  extra = {}
  if retriever_loss != "none" and target_evidence == "contrastive":
    if ids_bkl.shape[0] < 2:
      raise ValueError("target_evidence='contrastive' compares with another example's answer: "
                       "it needs a batch of at least 2")
    neg_dec, neg_t, neg_m = (jnp.roll(x, -1, axis=0) for x in (dec_bt, targets_bt, mask_bt))
    neg_logits = jax.lax.stop_gradient(model.apply(
        {"params": jax.lax.stop_gradient(params)}, ids_bkl, cmask_bkl, neg_dec,
        method=RagModel.generator_logits))
    neg_bk = losses.sequence_logprob(neg_logits, neg_t, neg_m)
    ratio_b1 = (stats.num_tokens_b / jnp.maximum(jnp.sum(neg_m != 0, -1), 1))[:, None]
    evidence_bk = stats.seq_logprob_bk - ratio_b1 * neg_bk
    stats = stats._replace(seq_logprob_bk=evidence_bk)
    extra["contrastive_evidence"] = jnp.mean(evidence_bk[:, 0] / jnp.maximum(
        stats.num_tokens_b, 1.0))
  if retriever_loss != "none" and target_evidence == "random":
    if rng is None:
      raise ValueError("target_evidence='random' draws noise: it needs rng")
    real_bk = stats.seq_logprob_bk
    valid_bk = jnp.isfinite(stats.log_prior_bk)
    n_b1 = jnp.maximum(jnp.sum(valid_bk, -1, keepdims=True), 1)
    mean_b1 = jnp.sum(jnp.where(valid_bk, real_bk, 0.0), -1, keepdims=True) / n_b1
    spread_b1 = jnp.sqrt(jnp.sum(jnp.where(valid_bk, jnp.square(real_bk - mean_b1), 0.0), -1,
                                 keepdims=True) / n_b1)
    noise_bk = jax.random.normal(jax.random.fold_in(rng, 0x5EED), real_bk.shape, jnp.float32)
    stats = stats._replace(seq_logprob_bk=mean_b1 + spread_b1 * noise_bk)
    extra["evidence_spread"] = jnp.mean(spread_b1)
  if retriever_loss != "none":
    objective_scores, objective_stats = scores_bk, stats
    if in_batch_negatives:
      objective_scores, objective_stats = _with_in_batch_negatives(model, params, batch,
                                                                   scores_bk, stats, rngs)
    if retriever_loss == "emdr2_token":  # [B, K_r, T], -inf past the own K_r passages
      token_bkt = retriever_losses.token_logprobs(target_logits, targets_bt,
                                                  temperature=target_temperature)
      r_loss = retriever_losses.emdr_token_loss(
          objective_scores, pad_negatives(token_bkt, objective_scores.shape[1]), mask_bt,
          retriever_temperature=retriever_temperature, null_baseline=null_baseline)
    else:
      r_loss = retriever_objective(retriever_loss, objective_scores, objective_stats,
                                   retriever_temperature, target_temperature, null_baseline,
                                   reader_k_r=k_r)
    if in_batch_negatives:
      extra.update(negative_stats(objective_scores, k_r, retriever_temperature))
    loss = loss + retriever_weight * r_loss
    extra["retriever_loss"] = r_loss
  tokens_b = stats.num_tokens_b
  aux = dict(
      retrieval_entropy=jnp.mean(stats.prior_entropy_b),
      posterior_entropy=jnp.mean(stats.posterior_entropy_b),
      posterior_prior_kl=jnp.mean(losses.posterior_prior_kl(stats)),
      top1_prior=jnp.mean(jnp.exp(jnp.max(stats.log_prior_bk, axis=-1))),
      nll_per_token=-jnp.sum(stats.rag_sequence_logprob_b) / jnp.maximum(jnp.sum(tokens_b), 1.0),
      num_tokens=jnp.mean(tokens_b), **doc_score_stats(scores_bk), **extra)
  return loss, aux


def in_batch_scores(model: RagModel, params, batch: dict, scores_bk: Array, rngs=None
                    ) -> Array:
  """Doc scores `[B, B*K]` float32 of each query against its own K passages (first, the same
  values as `scores_bk` `[B, K]` up to the call's rounding) and then every other example's
  passages, -inf where one of those is also among its own (by `doc_ids` `[B, K]`): the
  candidates of in-batch negatives (DPR §3.2). Passages by the live passage encoder on
  `passage_input_ids` / `passage_attention_mask` `[B, K, Lp]` when present (joint training: it
  gets a gradient), else their `passage_embeddings` `[B, K, D]` (under stop-gradient); the live
  query encoder with `rngs` (its dropout).

  Raises: KeyError when the batch lacks doc_ids or both passage keys."""
  if "doc_ids" not in batch or not {"passage_embeddings", "passage_input_ids"} & set(batch):
    raise KeyError("in-batch negatives need doc_ids and passage_embeddings or "
                   "passage_input_ids in the batch")
  if "passage_input_ids" in batch:
    emb_bkd = model.apply({"params": params}, batch["passage_input_ids"],
                          batch["passage_attention_mask"], method=RagModel.encode_passages,
                          deterministic=rngs is None, rngs=rngs)
  else:
    emb_bkd = jax.lax.stop_gradient(batch["passage_embeddings"])
  b, k, d = emb_bkd.shape
  all_bnd = jnp.broadcast_to(emb_bkd.reshape(1, b * k, d), (b, b * k, d))
  ext_bn = model.apply({"params": params}, batch["query_input_ids"],
                       batch["query_attention_mask"], all_bnd, method=RagModel.retrieve_scores,
                       deterministic=rngs is None, rngs=rngs)
  ids_bk = batch["doc_ids"]
  ids_n = ids_bk.reshape(b * k)
  others_bn = jnp.repeat(jnp.arange(b), k)[None, :] != jnp.arange(b)[:, None]
  dup_bn = jnp.any(ids_n[None, :, None] == ids_bk[:, None, :], axis=-1)
  own_bk = jnp.take_along_axis(ext_bn, jnp.arange(b)[:, None] * k + jnp.arange(k)[None], axis=1)
  own_bk = jnp.where(jnp.isfinite(scores_bk), own_bk, -jnp.inf)
  order_bn = jnp.argsort(~others_bn, axis=1, stable=True)[:, :b * k - k]  # the others' columns
  rest_bn = jnp.take_along_axis(jnp.where(others_bn & ~dup_bn, ext_bn, -jnp.inf), order_bn, 1)
  return jnp.concatenate([own_bk, rest_bn], axis=1)


def negative_stats(obj_scores_bn: Array, k_r: int, retriever_temperature: float) -> dict:
  """Logging statistics of a retriever objective's negatives, under stop-gradient: scores
  `[B, N]` (the first `k_r` columns the query's own passages, the rest its negatives, -inf =
  none). `negative_mass`: the batch mean of the retriever softmax(s / retriever_temperature)
  mass on the negatives (the force by which they hold the ranking: ~0 when they sit many nats
  below the own passages); `negative_gap`: the batch mean of the best own score minus the best
  negative score, in doc-score units (0 where a row has no negative). float32 scalars."""
  s_bn = jax.lax.stop_gradient(obj_scores_bn).astype(jnp.float32)
  p_bn = jax.nn.softmax(jnp.where(jnp.isfinite(s_bn), s_bn / retriever_temperature, -jnp.inf),
                        axis=-1)
  mass_b = jnp.sum(jnp.where(jnp.isfinite(s_bn[:, k_r:]), p_bn[:, k_r:], 0.0), axis=-1)
  gap_b = jnp.max(s_bn[:, :k_r], axis=-1) - jnp.max(s_bn[:, k_r:], axis=-1)
  return dict(negative_mass=jnp.mean(mass_b),
              negative_gap=jnp.mean(jnp.where(jnp.isfinite(gap_b), gap_b, 0.0)))


def _with_in_batch_negatives(model, params, batch, scores_bk, stats, rngs):
  """`(scores [B, B*K], stats)` for the retriever objective: `in_batch_scores`, the reader-side
  evidence and prior -inf on the negatives (no target mass)."""
  ext_bn = in_batch_scores(model, params, batch, scores_bk, rngs)
  n = ext_bn.shape[1]
  return ext_bn, stats._replace(seq_logprob_bk=pad_negatives(stats.seq_logprob_bk, n),
                                log_prior_bk=pad_negatives(stats.log_prior_bk, n))


def dpr_loss(model: RagModel, params, batch: dict, *, reduce: str = "mean",
             deterministic: bool = True, rng: Array | None = None) -> tuple[Array, dict]:
  """`(loss, aux)` of a retriever-only DPR batch (`model.loss="dpr"`), jittable.

  DPR's in-batch + hard-negative NLL (Karpukhin et al. 2020 §3.2 eq. 2,
  `ragjax.objectives.dpr.dpr_contrastive_loss`) with logits doc_score_scale * q·d: q from the
  live query encoder on `query_input_ids` / `query_attention_mask` `[B, Lq]`; the positives
  (each question's gold passage) and hard negatives from the live passage encoder on
  `positive_input_ids` / `positive_attention_mask` `[B, Lp]` and `passage_input_ids` /
  `passage_attention_mask` `[B, N, Lp]` when the batch has those tokens, else the index's
  vectors `positive_embeddings` `[B, D]` and `passage_embeddings` `[B, N, D]` (a frozen passage
  encoder); no hard-negative keys: in-batch negatives only. `positive_rows` `[B]` (corpus rows
  of the positives), when present, keeps a question's own passage out of its in-batch negatives
  when another question of the batch shares it.

  aux (float32 scalars): `dpr_accuracy` (fraction of questions whose positive scores top among
  the B + B*N candidates), `doc_score_*` of the positive and hard-negative scores (`[B, 1+N]`).
  Raises: ValueError for dropout without `rng`; KeyError for a batch with neither positive key.
  """
  if not deterministic and rng is None:
    raise ValueError("dpr_loss: deterministic=False needs rng (dropout)")
  kw = dict(deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
  v = {"params": params}
  q_bd = model.apply(v, batch["query_input_ids"], batch["query_attention_mask"],
                     method=RagModel.encode_query, **kw)
  if "positive_input_ids" in batch:
    pos_bd = model.apply(v, batch["positive_input_ids"][:, None],
                         batch["positive_attention_mask"][:, None],
                         method=RagModel.encode_passages, **kw)[:, 0]
  else:
    pos_bd = batch["positive_embeddings"]
  if "passage_input_ids" in batch:
    neg_bnd = model.apply(v, batch["passage_input_ids"], batch["passage_attention_mask"],
                          method=RagModel.encode_passages, **kw)
  else:
    neg_bnd = batch.get("passage_embeddings")
  scale = float(model.doc_score_scale)
  q_bd = q_bd.astype(jnp.float32) * scale
  out = dpr_objective.dpr_contrastive_loss(q_bd, pos_bd, neg_bnd, reduce=reduce,
                                           positive_ids_b=batch.get("positive_rows"))
  own_bk = jnp.einsum("bd,bd->b", q_bd, pos_bd.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)[:, None]
  if neg_bnd is not None:
    own_bk = jnp.concatenate([own_bk, jnp.einsum("bd,bnd->bn", q_bd, neg_bnd.astype(jnp.float32),
                                                 precision=jax.lax.Precision.HIGHEST)], 1)
  return out.loss, {"dpr_accuracy": jnp.mean(out.accuracy), **doc_score_stats(own_bk)}


def doc_score_stats(scores_bk: Array) -> dict:
  """Logging statistics of doc scores `[B, K]` (-inf = empty slot), under stop-gradient:
  `doc_score_mean` / `doc_score_std` over the valid slots, `doc_score_max` (batch mean of the best
  score) and `doc_score_margin` (best minus second best; 0 when K = 1), float32 scalars."""
  s_bk = jax.lax.stop_gradient(scores_bk).astype(jnp.float32)
  valid_bk = jnp.isfinite(s_bk)
  n_valid = jnp.maximum(jnp.sum(valid_bk), 1)
  mean = jnp.sum(jnp.where(valid_bk, s_bk, 0.0)) / n_valid
  std = jnp.sqrt(jnp.sum(jnp.where(valid_bk, jnp.square(s_bk - mean), 0.0)) / n_valid)
  top2_bk = jax.lax.top_k(s_bk, min(2, s_bk.shape[1]))[0]
  margin_b = top2_bk[:, 0] - top2_bk[:, -1]
  margin_b = jnp.where(jnp.isfinite(margin_b), margin_b, 0.0)
  return dict(doc_score_mean=mean, doc_score_std=std, doc_score_max=jnp.mean(top2_bk[:, 0]),
              doc_score_margin=jnp.mean(margin_b))


def retriever_objective(name: str, scores_bk: Array, stats, retriever_temperature: float,
                        target_temperature: float, null_baseline: bool = False,
                        reader_k_r: int | None = None) -> Array:
  """The Atlas retriever objective `name` ("pdist" | "emdr2" | "loop", see `rag_loss`) of doc
  scores `[B, K]` (with gradient) against the reader's `losses.RagStats` (under stop-gradient):
  a float32 scalar. `reader_k_r`: the passages really scored when `scores_bk` carries in-batch
  negatives past them (PDist's Atlas mean divides by B * K_r; default K)."""
  tokens_b1 = jnp.maximum(stats.num_tokens_b, 1.0)[:, None]
  if name == "pdist":  # Atlas's elementwise mean over the B*K scored passages (`reader_k_r`)
    k_r = int(reader_k_r or scores_bk.shape[1])
    return retriever_losses.perplexity_distillation_loss(
        scores_bk, stats.seq_logprob_bk / tokens_b1, retriever_temperature=retriever_temperature,
        target_temperature=target_temperature, null_baseline=null_baseline,
        reduce="mean") / k_r
  if name == "emdr2":
    return retriever_losses.emdr_loss(scores_bk, stats.seq_logprob_bk,
                                      retriever_temperature=retriever_temperature,
                                      null_baseline=null_baseline)
  k = scores_bk.shape[1]
  others_kk = ~jnp.eye(k, dtype=bool)                                  # [k, j]: j != k
  joint_bk = stats.log_prior_bk + stats.seq_logprob_bk
  mask = lambda x_bk: jnp.where(others_kk[None], x_bk[:, None, :], -jnp.inf)  # [B, k, j]
  loo_bk = (jax.nn.logsumexp(mask(joint_bk), axis=-1)
            - jax.nn.logsumexp(mask(stats.log_prior_bk), axis=-1))
  return retriever_losses.leave_one_out_loss(
      scores_bk, loo_bk / tokens_b1, retriever_temperature=retriever_temperature,
      target_temperature=target_temperature, null_baseline=null_baseline)
