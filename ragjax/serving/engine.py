"""The serving engine: a loaded bundle answering, retrieving and scoring in static-shape batches.

  engine = Engine(load_bundle(B), buckets=(1, 2, 4, 8))
  engine.warm()                                  # compile every bucket once, at start-up
  engine.answer(["Where was Ada Okafor born?"])  # [{"answer", "passages": [...]}]

Requests are padded to the smallest bucket that holds them (the padding rows repeat the first
question and are dropped), so after `warm()` no request compiles, and each row is computed alone:
a question's answer does not depend on what it was batched with. Retrieval and decoding are the
training code's (`ragjax.system.feed.Feeder`, `ragjax.evaluation.evaluate.decode_batch`): the
bundle answers as `ragjax generate` does on the same checkpoint. One thread drives an engine (the
batcher's worker); `set_index` swaps in a new index version between batches without recompiling.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from ragjax import config as config_lib
from ragjax.config import DECODINGS
from ragjax import sharding as sh
from ragjax.data.qa import Question
from ragjax.errors import UsageError
from ragjax.evaluation.evaluate import decode_batch, gather
from ragjax.models.fid import fid_logits
from ragjax.models.rag import RagModel
from ragjax.objectives.rag_losses import (marginal_answer_logprob, sequence_logprob,
                                          shift_targets)
from ragjax.serving.bundle import Bundle, jax_params
from ragjax.system import feed

log = logging.getLogger("ragjax")
DEFAULT_BUCKETS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a request may ask for (the compiled shapes): `max_batch` questions per call,
  `max_retrieve_k` passages from /v1/retrieve, `max_answers` answers to score, `max_new_tokens`
  (the bundle's `eval.max_new_tokens`), `max_question_chars`."""
  max_batch: int
  max_retrieve_k: int
  max_answers: int
  max_new_tokens: int
  max_question_chars: int
  retrieved_k: int
  decodings: tuple[str, ...]


class Engine:
  """Answers, passages and answer log-likelihoods from a `Bundle` (module docstring).

  Args:
    bundle: a loaded bundle.
    buckets: the batch sizes compiled; requests go to the smallest that holds them.
    max_retrieve_k: the deepest /v1/retrieve search (compiled once; default min(100, N)).
    max_answers: answers per /v1/score request.
    max_question_chars: longest question accepted.
    decodings: the decodings a request may choose (each is compiled for every bucket; default
      the bundle's `eval.decoding`). A FiD, closed-book or top-1 bundle decodes one way only.

  Raises:
    UsageError: a decoding not in `ragjax.config.DECODINGS`, or one this reader cannot use.
  """

  def __init__(self, bundle: Bundle, *, buckets=DEFAULT_BUCKETS, max_retrieve_k: int = 100,
               max_answers: int = 16, max_question_chars: int = 1000, decodings=None):
    self.bundle = bundle
    self.system = system = bundle.system
    self.cfg = cfg = bundle.cfg
    self.buckets = tuple(sorted(int(b) for b in buckets))
    mesh_axes = [(str(name), 1) for name, _ in cfg.mesh.axes]
    self.mesh = sh.make_mesh(mesh_axes, devices=jax.devices()[:1])
    self.rules = sh.check_rules(config_lib.normalized_axis_rules(cfg), self.mesh)
    kind = "device" if bundle.manifest["index_kind"] == "exact" else "scann"
    self.feeder = feed.Feeder(system, self.mesh, self.rules, kind)
    self.params = jax_params(bundle.params)
    self.index_version = bundle.index_version
    n = len(system.passages)
    decodings = tuple(decodings or (str(cfg.eval.decoding),))
    for d in decodings:
      if d not in DECODINGS:
        raise UsageError(f"--decodings {d!r}: expected one of {DECODINGS}")
    one_way = (cfg.model.get("reader", "rag") == "fid" or system.closed_book
               or cfg.model.loss == "top1")
    if one_way and decodings != (str(cfg.eval.decoding),):
      raise UsageError(f"--decodings {','.join(decodings)}: this bundle (reader "
                       f"{cfg.model.get('reader', 'rag')}, loss {cfg.model.loss}) decodes only "
                       f"{cfg.eval.decoding!r}")
    self.limits = Limits(
        max_batch=self.buckets[-1], max_retrieve_k=0 if system.closed_book else
        min(int(max_retrieve_k), n), max_answers=int(max_answers),
        max_new_tokens=int(cfg.eval.max_new_tokens), max_question_chars=int(max_question_chars),
        retrieved_k=0 if system.closed_book else system.k, decodings=decodings)
    self._embeddings = None
    self.set_index(bundle.embeddings, bundle.index_version,
                   None if kind == "device" else bundle.index)
    self._score = None

  # ------------------------------------------------------------------------------- helpers

  def set_index(self, embeddings_nd: np.ndarray, version, index=None) -> None:
    """Install an index version `[N, D]` float32 of the bundle's corpus (same N and D: no
    recompile); responses then name `version`."""
    if self.system.closed_book:
      return
    self._embeddings = np.asarray(embeddings_nd, np.float32)
    self.feeder.set_corpus(self._embeddings, index=index)
    self.index_version = version

  def bucket(self, n: int) -> int:
    for b in self.buckets:
      if n <= b:
        return b
    raise ValueError(f"{n} questions: more than the largest batch {self.buckets[-1]}")

  def _batch(self, questions: list[Question]) -> tuple[dict, int]:
    n = len(questions)
    padded = questions + [questions[0]] * (self.bucket(n) - n)
    return self.feeder.batch(self.params, padded), n

  def _passage(self, row: int, score: float, prior: float | None) -> dict:
    p = self.system.passages[int(row)]
    out = {"id": p.id, "title": p.title, "text": p.text, "score": float(score)}
    if prior is not None:
      out["prior"] = float(prior)
    return out

  # ------------------------------------------------------------------------------- requests

  def decode(self, questions: list[str], decoding: str | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(generated ids [n, 1 + max_new_tokens], retrieved rows [n, K_r], doc scores [n, K_r]
    float32, log prior over the reader's K [n, k])` of n questions, one bucket-sized batch,
    decoded by `decoding` (one of `limits.decodings`; default the first)."""
    decoding = decoding or self.limits.decodings[0]
    if decoding not in self.limits.decodings:
      raise ValueError(f"decoding {decoding!r}: this engine decodes {list(self.limits.decodings)}")
    qs = [Question(f"q{i}", q, ()) for i, q in enumerate(questions)]
    batch, n = self._batch(qs)
    ecfg = types.SimpleNamespace(decoding=decoding, num_beams=int(self.cfg.eval.num_beams),
                                 max_new_tokens=int(self.cfg.eval.max_new_tokens))
    seqs, scores = decode_batch(self.feeder, self.params, batch, ecfg)
    rows = gather(batch["doc_ids"])
    if self.system.closed_book:
      doc_scores = np.zeros(rows.shape, np.float32)
    elif scores.shape[1] == rows.shape[1]:  # the reader reads all K_r: no second query pass
      doc_scores = np.asarray(scores, np.float32)
    else:
      with self.feeder._mesh_context():  # the step's doc scores of all K_r retrieved
        doc_scores = gather(self.feeder.doc_scores(self.params, batch))
    log_prior = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
    return seqs[:n], rows[:n], doc_scores[:n], log_prior[:n]

  def answer(self, questions: list[str], k: int | None = None,
             max_new_tokens: int | None = None, decoding: str | None = None) -> list[dict]:
    """An answer per question and its retrieved passages (the first `k` of K_r, default all),
    each with `score` (doc score, q·d x doc_score_scale) and `prior` (p(z|x) over the reader's
    K; absent past it). `max_new_tokens` at most the compiled `eval.max_new_tokens` (the
    greedy / beam output is cut there); `decoding` one of `limits.decodings`."""
    seqs, rows, doc_scores, log_prior = self.decode(questions, decoding)
    limit = 1 + int(max_new_tokens if max_new_tokens is not None else self.limits.max_new_tokens)
    out = []
    for i in range(len(questions)):
      prior = np.exp(log_prior[i])
      passages = [self._passage(r, doc_scores[i, j], prior[j] if j < len(prior) else None)
                  for j, r in enumerate(rows[i][:k] if k else rows[i]) if r >= 0]
      out.append({"answer": self.system.gen_tok.decode(seqs[i][:limit]), "passages": passages})
    return out

  def _doc_scores(self, batch, rows: np.ndarray) -> np.ndarray:
    """Doc scores `[B, k]` of corpus rows `[B, k]` (host: q·d x doc_score_scale)."""
    with self.feeder._mesh_context():
      q = np.asarray(gather(self.feeder._encode_fn()(self.params, batch["query_input_ids"],
                                                     batch["query_attention_mask"])))
    emb = self._embeddings[np.maximum(rows, 0)]
    return np.einsum("bd,bkd->bk", q, emb) * float(self.system.model.doc_score_scale)

  def retrieve(self, questions: list[str], k: int) -> list[list[dict]]:
    """The top `k` passages of each question (`k` <= `limits.max_retrieve_k`), best first, with
    `score` and `prior` (softmax of the scores over the k returned)."""
    if not 1 <= k <= self.limits.max_retrieve_k:
      raise ValueError(f"k={k}: expected 1..{self.limits.max_retrieve_k}")
    qs = [Question(f"q{i}", q, ()) for i, q in enumerate(questions)]
    n = len(qs)
    padded = qs + [qs[0]] * (self.bucket(n) - n)
    batch = self.feeder.query_batch(padded)
    rows = self.feeder.top_rows(self.params, batch, self.limits.max_retrieve_k)[:, :k]
    scores = self._doc_scores(batch, rows)
    out = []
    for i in range(n):
      prior = np.exp(scores[i] - np.logaddexp.reduce(scores[i]))
      out.append([self._passage(r, s, p) for r, s, p in zip(rows[i], scores[i], prior)])
    return out

  def _score_fn(self):
    if self._score is None:
      system, model = self.system, self.system.model
      reader = self.cfg.model.get("reader", "rag")
      k = 1 if self.cfg.model.loss == "top1" else system.reader_k
      sequence = self.cfg.model.loss == "rag_sequence"
      pad = model.generator_cfg.pad_token_id

      def score(params, batch):
        ids = batch["context_input_ids"][:, :k]
        mask = batch["context_attention_mask"][:, :k]
        labels = batch["labels"]
        targets, tmask = shift_targets(labels, pad)
        if system.closed_book:
          doc_scores = jnp.zeros((ids.shape[0], 1), jnp.float32)
        else:
          doc_scores = model.apply({"params": params}, batch["query_input_ids"],
                                   batch["query_attention_mask"],
                                   batch["passage_embeddings"][:, :k],
                                   method=RagModel.retrieve_scores)
        if reader == "fid" and not system.closed_book:
          logits = model.apply({"params": params}, ids, mask, labels, method=fid_logits)
          return sequence_logprob(logits[:, None], targets, tmask)[:, 0]
        logits = model.apply({"params": params}, ids, mask, labels,
                             method=RagModel.generator_logits)
        stats = marginal_answer_logprob(logits, doc_scores, targets, tmask)
        return stats.rag_sequence_logprob_b if sequence else stats.rag_token_logprob_b

      self._score = jax.jit(score)
    return self._score

  def score(self, question: str, answers: list[str]) -> list[float]:
    """log p(answer | question) in nats of each answer under the bundle's reader: the RAG
    marginal (Lewis et al. 2020 eq. 1 RAG-Sequence for `loss=rag_sequence`, else eq. 2
    RAG-Token) over its K retrieved passages, or FiD's fused likelihood; answers are truncated
    to `model.answer_max_length` tokens."""
    if not 1 <= len(answers) <= self.limits.max_answers:
      raise ValueError(f"{len(answers)} answers: expected 1..{self.limits.max_answers}")
    out = []
    for s in range(0, len(answers), self.buckets[-1]):
      chunk = answers[s:s + self.buckets[-1]]
      qs = [Question(f"a{i}", question, (a,)) for i, a in enumerate(chunk)]
      batch, n = self._batch(qs)
      with self.feeder._mesh_context():
        lp = gather(self._score_fn()(self.params, batch))
      out += [float(x) for x in lp[:n]]
    return out

  def warm(self) -> float:
    """Compile every bucket of every request kind; returns the seconds it took."""
    t0 = time.perf_counter()
    for b in self.buckets:
      for d in self.limits.decodings:
        self.answer(["warm up"] * b, decoding=d)
      if self.limits.max_retrieve_k:
        self.retrieve(["warm up"] * b, 1)
    for b in self.buckets:  # score batches of every size (a request's answers fill one)
      self.score("warm up", ["a"] * min(b, self.limits.max_answers))
    seconds = time.perf_counter() - t0
    log.info("engine: %d buckets warmed in %.1f s", len(self.buckets), seconds)
    return seconds
