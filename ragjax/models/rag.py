"""The RAG model of Lewis et al. 2020 ("Retrieval-Augmented Generation for Knowledge-Intensive
NLP Tasks", arXiv:2005.11401): a DPR bi-encoder retriever and a seq2seq generator, as one Flax
(linen) module plus the host-side glue and the jittable loss.

  retriever (§2.2, DPR eq. 1):  score(x, z) = d(z)ᵀ q(x),  p_eta(z|x) = softmax_z over the top K
  generator (§2.3):             p_theta(y_i | x, z, y_<i), input "title / passage // question"

    model, params = load_rag("dpr_question_encoder/", "bart/")
    ids_bkl, mask_bkl = build_context_inputs(titles_bk, texts_bk, questions_b, bart_tok, 128,
                                             pad_id=1)
    loss_fn = functools.partial(rag_loss, model, loss_name="rag_token", label_smoothing=0.1)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)

Given query tokens and retrieved passage embeddings, the loss re-runs the query encoder and
recomputes the doc scores from the live q(x), so gradients reach it (RAG §2.4 "Training": the
document encoder and index stay fixed, the query encoder and the generator are fine-tuned);
given passage tokens instead, it re-encodes the retrieved passages with the passage encoder,
which then trains too. Decoding lives in `ragjax.rag_decoding`. Equations are numbered as in
`ragjax.losses` (eq. 1 retriever prior, eq. 2 RAG-Sequence, eq. 3 RAG-Token). Parameters:
`{"bi_encoder": {"query_encoder", "passage_encoder"}, "generator": Seq2Seq params}`
(`assemble_params`).
"""
from __future__ import annotations

import pathlib
from typing import Any, NamedTuple, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from ragjax import losses
from ragjax import sharding as sh
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.models.bert import BertConfig, BiEncoder
from ragjax.models.seq2seq import Seq2Seq, Seq2SeqConfig
from ragjax.retrieval.index import topk_chunked

Array = jax.Array
TITLE_SEP, DOC_SEP = " / ", " // "  # HF RagConfig.title_sep / doc_sep


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


def assemble_params(query_params, generator_params, passage_params=None) -> dict:
  """RAG params from separately loaded towers (e.g. `load_bert_dir` / `load_seq2seq_dir`).
  `passage_params=None` leaves the passage tower out: only valid with `shared_encoders=True`,
  or when the passage encoder is never applied (doc scores from precomputed embeddings)."""
  towers = {"query_encoder": query_params}
  if passage_params is not None:
    towers["passage_encoder"] = passage_params
  return {"bi_encoder": towers, "generator": generator_params}


def load_rag(question_encoder_dir, generator_dir, passage_encoder_dir=None,
             **generator_overrides) -> tuple[RagModel, dict]:
  """`(RagModel, params)` from HF checkpoint directories: a DPR/BERT question encoder (pooled
  [CLS], as HF RAG uses `pooler_output`), a BART/T5 generator, optionally a passage encoder.

  Raises: WeightImportError (from the importers) on missing or mis-shaped tensors.
  """
  from ragjax.models.hf_import import load_bert_dir
  from ragjax.models.seq2seq_import import load_seq2seq_dir
  q_cfg, q_params = load_bert_dir(pathlib.Path(question_encoder_dir), pooling="cls",
                                  normalize=False)
  g_cfg, g_params = load_seq2seq_dir(pathlib.Path(generator_dir), **generator_overrides)
  p_cfg, p_params = None, None
  if passage_encoder_dir is not None:
    p_cfg, p_params = load_bert_dir(pathlib.Path(passage_encoder_dir), pooling="cls",
                                    normalize=False)
  model = RagModel(q_cfg, g_cfg, passage_cfg=p_cfg)
  return model, assemble_params(q_params, g_params, p_params)


# ------------------------------------------------------------------------ generator inputs (host)

class TextTokenizer(Protocol):
  """What `build_context_inputs` needs: a `tokenizers.Tokenizer`-like `encode_batch(texts)`
  whose results have `.ids` (special tokens added, no padding or truncation). A
  `ragjax.data.tokenize.WordPieceTokenizer` is accepted as well."""

  def encode_batch(self, texts: list[str]) -> Sequence[Any]: ...


def context_strings(titles_bk: Sequence[Sequence[str]], texts_bk: Sequence[Sequence[str]],
                    questions_b: Sequence[str], *, prefix: str | None = None,
                    title_sep: str = TITLE_SEP, doc_sep: str = DOC_SEP) -> list[list[str]]:
  """The generator's input text per (example, passage): `prefix + title / text // question`,
  exactly HF `RagRetriever.postprocess_docs`: one leading and one trailing `"` stripped from the
  title, then every double space replaced by one (Python `str.replace`, a single pass).

  Raises: ValueError when the three inputs disagree in B, or titles and texts in K.
  """
  if not len(titles_bk) == len(texts_bk) == len(questions_b):
    raise ValueError(f"{len(titles_bk)} title rows, {len(texts_bk)} text rows and "
                     f"{len(questions_b)} questions: expected one row per question")
  out = []
  for b, (titles_k, texts_k, question) in enumerate(zip(titles_bk, texts_bk, questions_b)):
    if len(titles_k) != len(texts_k):
      raise ValueError(f"example {b}: {len(titles_k)} titles but {len(texts_k)} passages")
    out.append([((prefix or "") + title.removeprefix('"').removesuffix('"') + title_sep + text
                 + doc_sep + question).replace("  ", " ")
                for title, text in zip(titles_k, texts_k)])
  return out


def build_context_inputs(titles_bk: Sequence[Sequence[str]], texts_bk: Sequence[Sequence[str]],
                         questions_b: Sequence[str], tokenizer: TextTokenizer | WordPieceTokenizer,
                         max_length: int, *, pad_id: int | None = None, prefix: str | None = None,
                         title_sep: str = TITLE_SEP, doc_sep: str = DOC_SEP
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenized generator inputs `(ids [B, K, max_length] int32, mask [B, K, max_length] int32)`
  of `context_strings(...)` with the GENERATOR's tokenizer, on the host (static shapes).

  Truncation keeps the first `max_length - 1` tokens and the last one (the closing special token,
  `</s>` / `[SEP]`), which is what HF's `truncation=True, padding="max_length"` gives for a
  single sequence with one trailing special token; then right-padding with `pad_id` (default:
  the tokenizer's `pad_id` attribute, or its `<pad>`/`[PAD]` token) and mask 0.

  Raises:
    ValueError: ragged K, max_length < 2, no pad id, or a `tokenizers.Tokenizer` with padding or
      truncation switched on (call `no_padding()` / `no_truncation()` on a copy first).
  """
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  strings = context_strings(titles_bk, texts_bk, questions_b, prefix=prefix,
                            title_sep=title_sep, doc_sep=doc_sep)
  b = len(strings)
  k = len(strings[0]) if b else 0
  if any(len(row) != k for row in strings):
    raise ValueError(f"every example needs the same number of passages K; got "
                     f"{[len(row) for row in strings]}")
  flat = [s for row in strings for s in row]
  if isinstance(tokenizer, WordPieceTokenizer):  # same truncation rule, its own pad id
    batch = tokenizer.encode(flat, max_length=max_length, length=max_length)
    return (batch.input_ids.reshape(b, k, max_length),
            batch.attention_mask.reshape(b, k, max_length))
  if getattr(tokenizer, "padding", None) or getattr(tokenizer, "truncation", None):
    raise ValueError("build_context_inputs: the tokenizer has padding or truncation enabled; "
                     "pass a copy with no_padding() and no_truncation() (shapes are set here)")
  if pad_id is None:
    pad_id = getattr(tokenizer, "pad_id", None)
    for token in ("<pad>", "[PAD]"):
      if pad_id is None and hasattr(tokenizer, "token_to_id"):
        pad_id = tokenizer.token_to_id(token)
  if pad_id is None:
    raise ValueError("build_context_inputs: no pad id; pass pad_id= (the generator's)")
  ids = np.full((b * k, max_length), pad_id, np.int32)
  mask = np.zeros((b * k, max_length), np.int32)
  for i, enc in enumerate(tokenizer.encode_batch(flat)):
    row = list(enc.ids)
    if len(row) > max_length:
      row = row[:max_length - 1] + row[-1:]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids.reshape(b, k, max_length), mask.reshape(b, k, max_length)


# ---------------------------------------------------------------------------------- retrieval

class TopK(NamedTuple):
  """`doc_ids` `[B, K]` int32 (corpus rows, best first), `scores` `[B, K]` float32 (q·d),
  `embeddings` `[B, K, D]` (the corpus rows, for `RagModel.retrieve_scores`)."""
  doc_ids: Array
  scores: Array
  embeddings: Array


def device_top_k(query_bd: Array, corpus_nd: Array, k: int, *, chunk: int = 65536) -> TopK:
  """Exact MIPS top-k (DPR eq. 1) on the device holding `corpus_nd` `[N, D]` (it must fit in its
  memory; the score matrix is built `chunk` rows at a time, `topk_chunked`). Jittable with `k`
  and `chunk` static; `query_bd` `[B, D]`. No gradient flows through the selection: recompute
  scores from the live query encoder with `RagModel.retrieve_scores(.., TopK.embeddings)`.

  Raises: ValueError when k < 1, k > N or the dimensions differ.
  """
  n, d = corpus_nd.shape
  if not 1 <= k <= n:
    raise ValueError(f"device_top_k: k={k} must be in [1, N={n}]")
  if query_bd.shape[-1] != d:
    raise ValueError(f"device_top_k: queries {query_bd.shape} and corpus {corpus_nd.shape} "
                     "differ in dimension")
  scores_bk, rows_bk = topk_chunked(jax.lax.stop_gradient(query_bd), corpus_nd, k, chunk=chunk)
  return TopK(rows_bk.astype(jnp.int32), scores_bk, jnp.take(corpus_nd, rows_bk, axis=0))


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


def rag_loss(model: RagModel, params, batch: dict, loss_name: str = "rag_token",
             label_smoothing: float = 0.0, *, reduce: str = "mean", deterministic: bool = True,
             rng: Array | None = None) -> tuple[Array, dict]:
  """`(loss, aux)` of one batch, jittable (close over everything but `params`, `batch`, `rng`).

  doc scores `[B, K]` from `batch_doc_scores` (live query encoder: RAG §2.4), generator logits
  `[B, K, T, V]` on `context_input_ids` / `context_attention_mask` `[B, K, L]`, targets from
  `batch_targets`, then `losses.get_loss_fn(loss_name)` (RAG eq. 1-3 as in `ragjax.losses`:
  HF's get_nll, token-summed NLL per example; `reduce` "mean" | "sum" | "none").

  aux (float32 scalars, batch means): `retrieval_entropy` H(p_eta(z|x)) (log K = uniform,
  0 = one passage), `posterior_entropy` H(p(z|x,y)), `top1_prior` max_z p_eta(z|x),
  `doc_score_mean` / `doc_score_std` / `doc_score_max` / `doc_score_margin` (best minus
  second-best score; 0 when K = 1), `nll_per_token` (RAG-Sequence -log p(y|x) / tokens),
  `num_tokens`.

  Raises: ValueError for an unknown loss; KeyError for a batch without doc-score inputs.
  """
  loss_fn = losses.get_loss_fn(loss_name)
  rngs = None if deterministic else {"dropout": rng}
  if not deterministic and rng is None:
    raise ValueError("rag_loss: deterministic=False needs rng (dropout)")
  dec_bt, targets_bt, mask_bt = batch_targets(batch, model.generator_cfg.pad_token_id)
  scores_bk = batch_doc_scores(model, params, batch, deterministic=deterministic, rngs=rngs)
  logits_bktv = model.apply({"params": params}, batch["context_input_ids"],
                            batch["context_attention_mask"], dec_bt,
                            method=RagModel.generator_logits, deterministic=deterministic,
                            rngs=rngs)
  loss = loss_fn(logits_bktv, scores_bk, targets_bt, mask_bt, label_smoothing=label_smoothing,
                 reduce=reduce)
  stats = losses.marginal_answer_logprob(jax.lax.stop_gradient(logits_bktv),
                                         jax.lax.stop_gradient(scores_bk), targets_bt, mask_bt)
  s_bk = jax.lax.stop_gradient(scores_bk)
  valid_bk = jnp.isfinite(s_bk)  # -inf marks an empty passage slot
  n_valid = jnp.maximum(jnp.sum(valid_bk), 1)
  mean = jnp.sum(jnp.where(valid_bk, s_bk, 0.0)) / n_valid
  std = jnp.sqrt(jnp.sum(jnp.where(valid_bk, jnp.square(s_bk - mean), 0.0)) / n_valid)
  top2_bk = jax.lax.top_k(s_bk, min(2, s_bk.shape[1]))[0]
  margin_b = top2_bk[:, 0] - top2_bk[:, -1]
  margin_b = jnp.where(jnp.isfinite(margin_b), margin_b, 0.0)
  tokens_b = stats.num_tokens_b
  aux = dict(
      retrieval_entropy=jnp.mean(stats.prior_entropy_b),
      posterior_entropy=jnp.mean(stats.posterior_entropy_b),
      top1_prior=jnp.mean(jnp.exp(jnp.max(stats.log_prior_bk, axis=-1))),
      doc_score_mean=mean, doc_score_std=std, doc_score_max=jnp.mean(top2_bk[:, 0]),
      doc_score_margin=jnp.mean(margin_b),
      nll_per_token=-jnp.sum(stats.rag_sequence_logprob_b) / jnp.maximum(jnp.sum(tokens_b), 1.0),
      num_tokens=jnp.mean(tokens_b))
  return loss, aux
