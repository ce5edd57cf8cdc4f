"""Train-step throughput, CPU: ragjax RAG vs transformers' `RagTokenForGeneration` /
`RagSequenceForGeneration` (PyTorch), same architecture and sizes, one process.

Workload (all CLI flags; defaults in `BenchConfig`): question encoder BERT 6 x 384, 12 heads, FFN
1536 (MiniLM size), [CLS] pooled (DPR); generator BART d_model 384, 6 + 6 layers, 12 heads, FFN
1536; both vocabularies 30,522; K = 5 passages per question, batch 8 questions, query length 32,
context length 128, target length 16; dropout 0.1 (BART: attention and activation dropout 0, the
BartConfig defaults); AdamW lr 1e-5, weight decay 0.01. The passage encoder is frozen (RAG §2.4):
its embeddings `[B, K, D]` are given (random floats), so one step is
  question encoder -> doc_scores = q·d -> generator on the B*K contexts -> RAG loss (eq. 2 / 3)
  -> backward -> AdamW on the question encoder and the generator.
Random weights on both sides (same shapes, not the same values); random token ids; padded lengths
vary per example but both systems compute on the full padded shapes.

ragjax: `ragjax_step_fn(cfg)` (one `jax.jit` with the state donated) around `rag.rag_loss`. HF:
`RagTokenForGeneration` / `RagSequenceForGeneration` built from a `DPRQuestionEncoder` and a
`BartForConditionalGeneration`, loss from `model(context_input_ids=.., doc_scores=.., labels=..)`,
`torch.optim.AdamW` (fused, as the HF Trainer's default), all `torch.get_num_threads()` threads.
Our step is compiled ahead (`lower().compile()`, which also gives XLA's FLOP count), so no step
is timed with a compile in it. After `--warmup` untimed steps each, the four steps and two plain
float32 matmuls (`--matmul-size`^3, jax and torch) are timed round-robin, `--reps` rounds, and the
medians compared (see `bench/_results.py`). `--breakdown` (minutes more) also times forward,
backward and optimizer parts of both. Every system runs under the same host allocator settings:
`--malloc tuned` (default; `ragjax.hostenv.TUNED_MALLOC`, what the `ragjax` command runs with:
freed memory stays in the process) or `--malloc system` (glibc's defaults, under which XLA's
3.3 GB temporary buffer is mmap'd and page-faulted in again at every step).

  python bench/train_step.py                   # writes its section of bench/RESULTS.md
  python bench/train_step.py --reps 2 --no-write --batch-size 2   # a quick try
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import _results  # noqa: E402
from ragjax.models import rag  # noqa: E402
from ragjax.models.bert import BertConfig  # noqa: E402
from ragjax.models.seq2seq import Seq2SeqConfig  # noqa: E402

LOSSES = {"rag_token": "RAG-Token", "rag_sequence": "RAG-Sequence"}
BART_PAD, BART_BOS, BART_EOS = 1, 0, 2  # BartConfig defaults; decoder start = eos = 2
BERT_PAD, BERT_CLS, BERT_SEP = 0, 101, 102


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One train step's shapes and hyper-parameters (shared by both systems)."""
  batch_size: int = 8          # B questions
  n_docs: int = 5              # K retrieved passages per question
  query_length: int = 32       # Lq
  context_length: int = 128    # L (generator input: passage // question)
  target_length: int = 16      # T (decoder positions, start token first)
  vocab_size: int = 30522      # both the question encoder's and the generator's
  q_hidden: int = 384
  q_layers: int = 6
  q_heads: int = 12
  q_ffn: int = 1536
  g_d_model: int = 384
  g_encoder_layers: int = 6
  g_decoder_layers: int = 6
  g_heads: int = 12
  g_ffn: int = 1536
  dropout: float = 0.1
  lr: float = 1e-5
  weight_decay: float = 0.01
  loss: str = "rag_token"      # "rag_token" | "rag_sequence" (ragjax.config.LOSSES names)
  seed: int = 0

  def describe(self) -> str:
    return (f"question encoder BERT {self.q_layers} layers x {self.q_hidden}, {self.q_heads} "
            f"heads, FFN {self.q_ffn}, [CLS] pooling; generator BART d_model {self.g_d_model}, "
            f"{self.g_encoder_layers} + {self.g_decoder_layers} layers, {self.g_heads} heads, FFN "
            f"{self.g_ffn}; vocab {self.vocab_size:,} (both); K {self.n_docs}, batch "
            f"{self.batch_size}, query length {self.query_length}, context length "
            f"{self.context_length}, target length {self.target_length}; dropout {self.dropout} "
            f"(BART attention/activation dropout 0); AdamW lr {self.lr:g}, weight decay "
            f"{self.weight_decay:g}, betas (0.9, 0.999), eps 1e-8; float32")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for f in dataclasses.fields(BenchConfig):
    if f.name != "loss":
      ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
  ap.add_argument("--losses", default="rag_token,rag_sequence",
                  help="comma-separated, of " + ", ".join(LOSSES))
  ap.add_argument("--reps", type=int, default=5, help="timed rounds (each runs every system once)")
  ap.add_argument("--warmup", type=int, default=2,
                  help="untimed steps per system (after ours compiles)")
  ap.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n @ n x n matmul")
  ap.add_argument("--torch-adamw", choices=("default", "foreach", "fused"), default="fused",
                  help="torch.optim.AdamW implementation: fused (the HF Trainer's default "
                       "`adamw_torch_fused` for torch >= 2.8), foreach, or default (torch's "
                       "per-tensor loop on CPU)")
  ap.add_argument("--breakdown", action="store_true",
                  help="also time forward / backward / optimizer separately on both sides")
  ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
  ap.add_argument("--in-process", action="store_true",
                  help="run every system in this process (the old method: the two frameworks' "
                       "thread pools and allocators then share one process)")
  ap.add_argument("--malloc", choices=("tuned", "system"), default="tuned",
                  help="host allocator of every system (both frameworks alike): tuned "
                       "(`ragjax.hostenv.TUNED_MALLOC`, what the `ragjax` command runs with) or "
                       "system (glibc's defaults)")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one system
  args = ap.parse_args(argv)
  names = {f.name for f in dataclasses.fields(BenchConfig)} - {"loss"}
  args.cfg = BenchConfig(**{n: getattr(args, n) for n in names})
  args.losses = [x.strip() for x in args.losses.split(",") if x.strip()]
  unknown = [x for x in args.losses if x not in LOSSES]
  if unknown:
    ap.error(f"unknown --losses {unknown}; expected {list(LOSSES)}")
  return args


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ the batch

def make_batch(cfg: BenchConfig) -> dict[str, np.ndarray]:
  """Random token ids in ragjax's batch layout (numpy): `query_input_ids` / `_attention_mask`
  `[B, Lq]` ([CLS] .. [SEP], BERT pad 0), `passage_embeddings` `[B, K, D]` float32,
  `context_input_ids` / `_attention_mask` `[B, K, L]` (<s> .. </s>, BART pad 1), `labels` `[B, T]`
  (decoder start </s>, <s>, answer, </s>, pad 1). Lengths vary per row; shapes are fixed."""
  rng = np.random.default_rng(cfg.seed)
  b, k, lq, length, t = (cfg.batch_size, cfg.n_docs, cfg.query_length, cfg.context_length,
                         cfg.target_length)

  def rows(n, width, min_len, first, last, pad):
    ids_nw = rng.integers(1000, cfg.vocab_size, size=(n, width), dtype=np.int64)
    mask_nw = np.zeros((n, width), np.int64)
    for i, n_tok in enumerate(rng.integers(min_len, width + 1, size=n)):
      ids_nw[i, 0], ids_nw[i, n_tok - 1], ids_nw[i, n_tok:] = first, last, pad
      mask_nw[i, :n_tok] = 1
    return ids_nw.astype(np.int32), mask_nw.astype(np.int32)

  q_ids, q_mask = rows(b, lq, max(lq // 4, 2), BERT_CLS, BERT_SEP, BERT_PAD)
  c_ids, c_mask = rows(b * k, length, max(length // 2, 2), BART_BOS, BART_EOS, BART_PAD)
  labels, _ = rows(b, t, min(4, t), 2, BART_EOS, BART_PAD)  # 2 = decoder_start_token_id
  labels[:, 1] = np.where(labels[:, 1] == BART_EOS, BART_EOS, BART_BOS)
  emb_bkd = (rng.standard_normal((b, k, cfg.q_hidden)) / np.sqrt(cfg.q_hidden)).astype(np.float32)
  return {"query_input_ids": q_ids, "query_attention_mask": q_mask,
          "passage_embeddings": emb_bkd,
          "context_input_ids": c_ids.reshape(b, k, length),
          "context_attention_mask": c_mask.reshape(b, k, length),
          "labels": labels}


# ------------------------------------------------------------------------------------- ragjax

def ragjax_model(cfg: BenchConfig) -> rag.RagModel:
  q_cfg = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.q_hidden,
                     num_hidden_layers=cfg.q_layers, num_attention_heads=cfg.q_heads,
                     intermediate_size=cfg.q_ffn, pooling="cls", normalize=False,
                     dropout_rate=cfg.dropout)
  g_cfg = Seq2SeqConfig(arch="bart", vocab_size=cfg.vocab_size, d_model=cfg.g_d_model,
                        encoder_layers=cfg.g_encoder_layers, decoder_layers=cfg.g_decoder_layers,
                        num_heads=cfg.g_heads, d_ff=cfg.g_ffn, dropout_rate=cfg.dropout,
                        attention_dropout_rate=0.0, activation_dropout_rate=0.0,
                        pad_token_id=BART_PAD, bos_token_id=BART_BOS, eos_token_id=BART_EOS,
                        decoder_start_token_id=2)
  return rag.RagModel(query_cfg=q_cfg, generator_cfg=g_cfg)


def _adamw(cfg: BenchConfig) -> optax.GradientTransformation:
  return optax.adamw(cfg.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)


def trainer_config(cfg: BenchConfig):
  """The `ragjax train` config of this benchmark: constant AdamW lr, no clipping (as the torch
  loop), passage encoder frozen (the default), one device."""
  from ragjax import config as config_lib
  c = config_lib.base_config()
  c.model.loss = cfg.loss
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.schedule = cfg.lr, 0, "constant"
  c.optim.weight_decay, c.optim.clip_grad_norm = cfg.weight_decay, 0.0
  c.train.global_batch = cfg.batch_size
  c.mesh.axes, c.mesh.num_devices = (("data", 1), ("fsdp", 1), ("tensor", 1)), 1
  return c


def ragjax_step_fn(cfg: BenchConfig):
  """`(step_fn, state, batch)` of the real trainer: `ragjax.training.step.jit_train_step` (explicit
  shardings on a one-device mesh, state donated, dropout key folded with the step),
  `make_optimizer` (AdamW per tower; the frozen passage encoder gets no update and no backward
  pass) and `init_state` (random towers materialised by a jitted init).
  `state, metrics = step_fn(state, batch)`; `step_fn.lower(state, batch)` lowers it."""
  from ragjax.training import optim, state as train_state, step as train_step
  c = trainer_config(cfg)
  model = ragjax_model(cfg)
  mesh, rules = train_state.build_mesh(c)
  tx, schedule = optim.make_optimizer(c.optim, int(c.train.total_steps))
  shapes = train_state.abstract_state(model, tx, mesh, rules, log_fn=lambda _: None)
  state = train_state.init_state(model, tx, shapes, {}, cfg.seed)
  step = train_step.jit_train_step(model, c, tx, schedule, shapes, mesh, rules)
  rng = jax.random.key(cfg.seed + 1)
  batch = {k: jax.device_put(v) for k, v in make_batch(cfg).items()}

  def step_fn(state, batch):
    return step(state, batch, rng)
  step_fn.lower = lambda state, batch: step.lower(state, batch, rng)
  return step_fn, state, batch


class JaxRunner:
  """Holds the (donated) state between calls; each call is one step, blocked until done."""

  def __init__(self, cfg: BenchConfig):
    self.step_fn, self.state, self.batch = ragjax_step_fn(cfg)
    self.loss = float("nan")

  def __call__(self):
    self.state, metrics = self.step_fn(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    self.loss = metrics["loss"]

  def num_params(self) -> int:
    """Trained parameters (the frozen passage encoder is not counted)."""
    p = self.state.params
    return sum(x.size for x in jax.tree.leaves((p["bi_encoder"]["query_encoder"],
                                                p["generator"])))


# ---------------------------------------------------------------------------------- transformers

def hf_model(cfg: BenchConfig, loss: str) -> torch.nn.Module:
  """`RagTokenForGeneration` / `RagSequenceForGeneration` with random weights, in train mode."""
  q_cfg = transformers.DPRConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.q_hidden, num_hidden_layers=cfg.q_layers,
      num_attention_heads=cfg.q_heads, intermediate_size=cfg.q_ffn, hidden_act="gelu",
      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
      projection_dim=0)
  g_cfg = transformers.BartConfig(
      vocab_size=cfg.vocab_size, d_model=cfg.g_d_model, encoder_layers=cfg.g_encoder_layers,
      decoder_layers=cfg.g_decoder_layers, encoder_attention_heads=cfg.g_heads,
      decoder_attention_heads=cfg.g_heads, encoder_ffn_dim=cfg.g_ffn, decoder_ffn_dim=cfg.g_ffn,
      activation_function="gelu", dropout=cfg.dropout, attention_dropout=0.0,
      activation_dropout=0.0, pad_token_id=BART_PAD, bos_token_id=BART_BOS,
      eos_token_id=BART_EOS, decoder_start_token_id=2, forced_eos_token_id=BART_EOS,
      scale_embedding=False)
  r_cfg = transformers.RagConfig.from_question_encoder_generator_configs(
      q_cfg, g_cfg, n_docs=cfg.n_docs, retrieval_vector_size=cfg.q_hidden,
      max_combined_length=cfg.context_length, label_smoothing=0.0, reduce_loss=False,
      use_cache=False)
  torch.manual_seed(cfg.seed)
  cls = (transformers.RagTokenForGeneration if loss == "rag_token"
         else transformers.RagSequenceForGeneration)
  model = cls(config=r_cfg, question_encoder=transformers.DPRQuestionEncoder(q_cfg),
              generator=transformers.BartForConditionalGeneration(g_cfg))
  return model.train()


class TorchRunner:
  """One HF train step per call: question encoder -> bmm doc scores -> RAG loss (mean over the
  batch, as ragjax's reduce="mean") -> backward -> AdamW. `phases` collects per-phase seconds
  (forward, backward, optimizer) of every call."""

  def __init__(self, cfg: BenchConfig, loss: str, adamw: str):
    self.model = hf_model(cfg, loss)
    kw = {} if adamw == "default" else {adamw: True}
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                 eps=1e-8, weight_decay=cfg.weight_decay, **kw)
    b, k = cfg.batch_size, cfg.n_docs
    np_batch = make_batch(cfg)
    t = lambda name: torch.from_numpy(np_batch[name].astype(np.int64))
    self.q_ids, self.q_mask, self.labels = (t("query_input_ids"), t("query_attention_mask"),
                                            t("labels"))
    self.c_ids = t("context_input_ids").reshape(b * k, -1)    # [B*K, L], batch-major
    self.c_mask = t("context_attention_mask").reshape(b * k, -1)
    self.emb_bkd = torch.from_numpy(np_batch["passage_embeddings"])
    self.n_docs = k
    self.loss = float("nan")
    self.phases: list[tuple[float, float, float]] = []

  def __call__(self):
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    q_bd = self.model.question_encoder(input_ids=self.q_ids,
                                       attention_mask=self.q_mask).pooler_output
    doc_scores_bk = torch.bmm(q_bd.unsqueeze(1), self.emb_bkd.transpose(1, 2)).squeeze(1)
    out = self.model(context_input_ids=self.c_ids, context_attention_mask=self.c_mask,
                     doc_scores=doc_scores_bk, labels=self.labels, n_docs=self.n_docs)
    loss = out.loss.mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    self.opt.step()
    t3 = time.perf_counter()
    self.phases.append((t1 - t0, t2 - t1, t3 - t2))
    self.loss = loss.item()

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ FLOPs

def model_flops(cfg: BenchConfig) -> dict[str, float]:
  """Analytic model FLOPs of one train step, by part (`forward` parts, then `train` = 3 x forward).

  A matmul [m, k] @ [k, n] is 2mkn FLOPs. With E the width, F the FFN width, N tokens through a
  layer: the projections cost 2 * (4E^2 + 2EF) * N per encoder layer (Q, K, V, O; FFN up/down) and
  attention 2 * 2 * S * Lk * E per sequence of S queries over Lk keys (QK^T and PV, all heads).
    question encoder: Nq = B*Lq tokens, self-attention Lk = Lq;
    generator encoder: Ne = B*K*L tokens, Lk = L;
    decoder: Nd = B*K*T tokens; self-attn Q/K/V/O 4E^2, cross-attn Q/O 2E^2 on Nd and cross-attn
      K/V 2E^2 on the Ne encoder states, FFN 2EF; attention over T (self) and L (cross) keys;
    LM head (tied embeddings): 2 * Nd * E * V;  doc scores: 2 * B * K * D.
  Backward is counted as 2x forward (the gradients with respect to the activations and to the
  weights are one matmul each), so train = 3x forward, the "6 * params * tokens" rule with
  attention added. Not counted: embedding lookups, softmax / LayerNorm / GELU / dropout / loss
  element-wise work, and AdamW (~15 FLOPs per parameter, memory bound). Both systems are charged
  the same model FLOPs (HF's RAG-Token loss also materialises the [B, T, V] marginal over K,
  which is extra element-wise work, not credited).
  """
  b, k, lq, length, t, v = (cfg.batch_size, cfg.n_docs, cfg.query_length, cfg.context_length,
                            cfg.target_length, cfg.vocab_size)
  eq, fq, e, f = cfg.q_hidden, cfg.q_ffn, cfg.g_d_model, cfg.g_ffn
  nq, ne, nd = b * lq, b * k * length, b * k * t
  fwd = {
      "question encoder": cfg.q_layers * (2 * (4 * eq * eq + 2 * eq * fq) * nq
                                          + 4 * b * lq * lq * eq),
      "doc scores": 2 * b * k * eq,
      "generator encoder": cfg.g_encoder_layers * (2 * (4 * e * e + 2 * e * f) * ne
                                                   + 4 * b * k * length * length * e),
      "decoder": cfg.g_decoder_layers * (2 * (6 * e * e + 2 * e * f) * nd + 2 * 2 * e * e * ne
                                         + 4 * b * k * t * (t + length) * e),
      "LM head": 2 * nd * e * v,
  }
  fwd = {name: float(x) for name, x in fwd.items()}
  fwd["forward"] = sum(fwd.values())
  fwd["train"] = 3 * fwd["forward"]
  return fwd


def xla_cost(step_fn, state, batch) -> dict[str, float]:
  """XLA's own count for the compiled step (`cost_analysis()`): every HLO op, element-wise ones
  included (1 FLOP per output element), transcendentals apart."""
  cost = step_fn.lower(state, batch).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {"flops": float(cost.get("flops", float("nan"))),
          "transcendentals": float(cost.get("transcendentals", float("nan")))}


def matmul_fns(n: int) -> dict:
  """A plain n x n @ n x n float32 matmul in jax (jit) and in torch, each blocked until done."""
  rng = np.random.default_rng(0)
  a_np, b_np = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
  a_j, b_j = jax.device_put(a_np), jax.device_put(b_np)
  mm = jax.jit(jnp.matmul)
  a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
  return {"jax_matmul": lambda: mm(a_j, b_j).block_until_ready(),
          "torch_matmul": lambda: torch.mm(a_t, b_t)}


def torch_blas() -> str:
  """The BLAS torch was built with (`BLAS_INFO` of `torch.__config__.show()`)."""
  m = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
  return m.group(1) if m else "unknown"


# ---------------------------------------------------------------------------------- breakdown

def jax_breakdown(cfg: BenchConfig, reps: int) -> dict[str, float]:
  """Median seconds of separately jitted parts of our step: the forward loss, forward + backward
  (value_and_grad), the AdamW update alone, and forwards of the pieces (question encoder + doc
  scores, generator encoder, decoder + LM head)."""
  step_fn, state, batch = ragjax_step_fn(cfg)
  model = ragjax_model(cfg)
  rng = jax.random.key(7)
  loss_fn = functools.partial(rag.rag_loss, model, loss_name=cfg.loss, deterministic=False,
                              rng=rng)
  dec_bt = batch["labels"]
  v = lambda p: {"params": p}
  kw = dict(deterministic=False, rngs={"dropout": rng})
  fns = {
      "forward (loss)": jax.jit(lambda p: loss_fn(p, batch)[0]),
      "forward + backward": jax.jit(lambda p: jax.value_and_grad(
          lambda q: loss_fn(q, batch)[0])(p)),
      "question encoder + doc scores (fwd)": jax.jit(lambda p: rag.batch_doc_scores(
          model, p, batch, deterministic=False, rngs={"dropout": rng})),
      "generator encoder (fwd)": jax.jit(lambda p: model.apply(
          v(p), batch["context_input_ids"], batch["context_attention_mask"],
          method=rag.RagModel.encode_contexts, **kw)),
      "generator encoder + decoder + LM head (fwd)": jax.jit(lambda p: model.apply(
          v(p), batch["context_input_ids"], batch["context_attention_mask"], dec_bt,
          method=rag.RagModel.generator_logits, **kw)),
  }
  grads = jax.tree.map(jnp.ones_like, state.params)
  tx = _adamw(cfg)

  def adamw(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  adamw_j = jax.jit(adamw)
  calls = {name: (lambda fn=fn: jax.block_until_ready(fn(state.params)))
           for name, fn in fns.items()}
  calls["AdamW update"] = lambda: jax.block_until_ready(adamw_j(state.params, state.opt_state))
  for fn in calls.values():
    fn()
  secs = _results.time_interleaved(calls, reps)
  return {name: _results.median(s) for name, s in secs.items()}


def torch_breakdown(cfg: BenchConfig, loss: str, adamw: str, reps: int) -> dict[str, float]:
  """Median seconds of HF's parts: forward pieces (autograd recording, as in training; outputs
  discarded), and the forward / backward / AdamW phases of whole steps (`TorchRunner.phases`)."""
  r = TorchRunner(cfg, loss, adamw)
  m = r.model
  gen = m.generator

  def qenc():
    q_bd = m.question_encoder(input_ids=r.q_ids, attention_mask=r.q_mask).pooler_output
    return torch.bmm(q_bd.unsqueeze(1), r.emb_bkd.transpose(1, 2))

  def genc():
    return gen.model.encoder(input_ids=r.c_ids, attention_mask=r.c_mask)

  def gfull():
    dec = r.labels.repeat_interleave(r.n_docs, dim=0)
    return gen(input_ids=r.c_ids, attention_mask=r.c_mask, decoder_input_ids=dec,
               use_cache=False).logits

  calls = {"question encoder + doc scores (fwd)": qenc, "generator encoder (fwd)": genc,
           "generator encoder + decoder + LM head (fwd)": gfull}
  for fn in calls.values():
    fn()
  secs = _results.time_interleaved(calls, reps)
  out = {name: _results.median(s) for name, s in secs.items()}
  r(), r()
  r.phases.clear()
  for _ in range(reps):
    r()
  fwd, bwd, opt = (list(x) for x in zip(*r.phases))
  out["forward (loss)"] = _results.median(fwd)
  out["forward + backward"] = _results.median([a + b for a, b in zip(fwd, bwd)])
  out["AdamW update"] = _results.median(opt)
  return out


# ------------------------------------------------------------------------------------- workers

def build_system(name: str, args):
  """`(callable, info)` of one timed system: `ours_<loss>`, `hf_<loss>`, `jax_matmul` or
  `torch_matmul`; the callable runs one step (or one matmul) and blocks until it is done."""
  if name in ("jax_matmul", "torch_matmul"):
    fn = matmul_fns(args.matmul_size)[name]
    fn()
    return fn, {}
  who, loss = name.split("_", 1)
  cfg = dataclasses.replace(args.cfg, loss=loss)
  info = {}
  if who == "ours":
    runner = JaxRunner(cfg)
    xla, info["compile_s"] = _results.timed(
        lambda: xla_cost(runner.step_fn, runner.state, runner.batch))
    info["xla"] = xla
  else:
    torch.manual_seed(cfg.seed)
    runner = TorchRunner(cfg, loss, args.torch_adamw)
    info["attn"] = runner.model.generator.config._attn_implementation
  _, info["first"] = _results.timed(runner)
  info["num_params"] = runner.num_params()
  info["loss"] = float(runner.loss)
  for _ in range(args.warmup - 1):
    runner()
  if isinstance(runner, TorchRunner):
    runner.phases.clear()
  return runner, info


def worker_main(args) -> None:
  """`--worker NAME`: build one system, say `ready` (with its info) on stdout, then run it once
  per `run` line on stdin, answering the seconds measured around the call."""
  import json
  import sys
  fn, info = build_system(args.worker, args)
  out = sys.__stdout__
  out.write(json.dumps({"ready": True, **info}) + "\n")
  out.flush()
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "run":
      t0 = time.perf_counter()
      fn()
      reply = {"seconds": time.perf_counter() - t0}
    elif cmd == "phases":
      reply = {"phases": getattr(fn, "phases", [])}
    else:
      break
    out.write(json.dumps(reply) + "\n")
    out.flush()


class Worker:
  """A system in its own process (`--worker`): its thread pool and allocator are its own, and it
  sleeps on a pipe while the others run."""

  def __init__(self, name: str, argv: list[str]):
    import json
    import subprocess
    import sys
    self.name, self._json = name, json
    self.proc = subprocess.Popen([sys.executable, __file__, *argv, "--worker", name],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f"worker {self.name} exited ({self.proc.wait()})")
      if line.startswith("{"):
        return self._json.loads(line)

  def ask(self, cmd: str) -> dict:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.write("exit\n")
    self.proc.stdin.close()
    self.proc.wait(60)


# ---------------------------------------------------------------------------------------- main

def use_malloc(mode: str) -> None:
  """Re-exec this process (and so every worker it starts) with the allocator `mode` asks for:
  `tuned` as `ragjax.hostenv` sets it, `system` without those tunables.

  Raises: SystemExit when the environment forbids `mode` (a user's own malloc settings)."""
  from ragjax import hostenv
  os.environ[hostenv.ENV_SWITCH] = mode
  hostenv.reexec_with_malloc_env()
  if hostenv.tuned() != (mode == "tuned"):
    raise SystemExit(f"--malloc {mode}: this environment keeps its own allocator settings "
                     f"({hostenv.describe()})")


def main(argv=None):
  import sys
  args = parse_args(argv)
  if args.worker:
    return worker_main(args)
  use_malloc(args.malloc)
  base = args.cfg
  flops = model_flops(base)
  log(f"{base.describe()}; torch threads {torch.get_num_threads()}, jax {jax.devices()}; "
      f"{'one process' if args.in_process else 'one worker process per system'}")
  log("analytic model FLOPs per train step: " + ", ".join(
      f"{name} {x / 1e9:.2f} G" for name, x in flops.items()))
  order = [f"{who}_{loss}" for loss in args.losses for who in ("ours", "hf")] + [
      "jax_matmul", "torch_matmul"]
  if args.in_process:
    systems, info = {}, {}
    for name in order:
      systems[name], info[name] = build_system(name, args)
      log(f"{name} ready: {info[name]}")
    log(f"timing {args.reps} interleaved rounds of {order}")
    secs = _results.time_interleaved(systems, args.reps)
    hf_phases = {loss: systems[f"hf_{loss}"].phases for loss in args.losses}
    method = "all systems in this one process"
  else:
    worker_argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-write"]
    workers = {}
    try:
      for name in order:
        workers[name] = Worker(name, worker_argv)
        log(f"{name} ready: {workers[name].info}")
      log(f"timing {args.reps} interleaved rounds of {order}")
      secs = {name: [] for name in order}
      for _ in range(args.reps):
        for name in order:
          secs[name].append(workers[name].ask("run")["seconds"])
      hf_phases = {loss: workers[f"hf_{loss}"].ask("phases")["phases"] for loss in args.losses}
    finally:
      for w in workers.values():
        w.close()
    info = {name: w.info for name, w in workers.items()}
    method = ("each system in its own worker process (its own thread pool and allocator; idle on "
              "a pipe while the others run), seconds measured in the worker around the call")
  first = {name: info[name]["first"] for name in order if "first" in info[name]}
  xla = {loss: info[f"ours_{loss}"]["xla"] for loss in args.losses}
  compile_s = {loss: info[f"ours_{loss}"]["compile_s"] for loss in args.losses}
  notes = {loss: (info[f"ours_{loss}"]["num_params"], info[f"hf_{loss}"]["num_params"],
                  info[f"hf_{loss}"]["attn"]) for loss in args.losses}
  report(args, flops, secs, first, notes, xla, compile_s, hf_phases, order, method)


def report(args, flops, secs, first, notes, xla, compile_s, hf_phases, order, method):
  """Log, print and (unless --no-write) write the section from the timed seconds."""
  base = args.cfg
  mm = {"jax_matmul": None, "torch_matmul": None}
  mm_flop = 2.0 * args.matmul_size ** 3
  med = {name: _results.median(s) for name, s in secs.items()}
  for name, s in secs.items():
    log(f"{name}: s {[round(x, 3) for x in s]}, median {med[name]:.3f}")
  mm_rate = {name: mm_flop / med[name] for name in mm}
  best_mm = max(mm_rate.values())
  log("matmul GFLOP/s: " + ", ".join(f"{n} {r / 1e9:.1f}" for n, r in mm_rate.items()))

  b = base.batch_size
  rows, ratio_rows, flop_rows = [], [], []
  for loss in args.losses:
    o, h = f"ours_{loss}", f"hf_{loss}"
    ratio = med[h] / med[o]
    paired = _results.paired_ratio(secs, o, h)
    label = LOSSES[loss]
    for key, system, own_mm in ((o, "ragjax (jit step)", "jax_matmul"),
                                (h, "transformers (PyTorch eager)", "torch_matmul")):
      rate = flops["train"] / med[key]
      rows.append([label, system, f"{b / med[key]:.2f}", f"{med[key]:.3f}",
                   ", ".join(f"{x:.2f}" for x in secs[key]), f"{first[key]:.1f}"])
      flop_rows.append([label, system, f"{rate / 1e9:.1f}", f"{rate / mm_rate[own_mm]:.3f}",
                        f"{rate / best_mm:.3f}"])
    ratio_rows.append([label, f"**{ratio:.3f}**", f"{paired:.3f}"])
    log(f"{label}: ours {b / med[o]:.2f} ex/s, HF {b / med[h]:.2f} ex/s, ours/HF {ratio:.3f} "
        f"(per-round {paired:.3f}); achieved GFLOP/s ours {flops['train'] / med[o] / 1e9:.1f} "
        f"({flops['train'] / med[o] / mm_rate['jax_matmul']:.3f} of jax matmul), HF "
        f"{flops['train'] / med[h] / 1e9:.1f} "
        f"({flops['train'] / med[h] / mm_rate['torch_matmul']:.3f} of torch matmul)")
  hf_phases = {loss: [_results.median(list(x)) for x in zip(*ph)]
               for loss, ph in hf_phases.items()}
  for loss, (fw, bw, op) in hf_phases.items():
    log(f"HF {loss} phases (median s): forward {fw:.3f}, backward {bw:.3f}, AdamW {op:.3f}")

  breakdown = {}
  if args.breakdown:
    for loss in args.losses:
      cfg = dataclasses.replace(base, loss=loss)
      breakdown[loss] = (jax_breakdown(cfg, args.reps), torch_breakdown(
          cfg, loss, args.torch_adamw, args.reps))
      for name in breakdown[loss][0]:
        log(f"breakdown {loss} {name}: ours {breakdown[loss][0][name]:.3f} s, HF "
            f"{breakdown[loss][1][name]:.3f} s")

  xla_note = "; ".join(
      f"{LOSSES[loss]} {xla[loss]['flops'] / 1e9:.1f} GFLOP (analytic / XLA "
      f"{flops['train'] / xla[loss]['flops']:.3f}), {xla[loss]['transcendentals'] / 1e6:.0f} M "
      f"transcendentals, compiled in {compile_s[loss]:.1f} s (before the first step)"
      for loss in args.losses)
  parts = ", ".join(f"{name} {flops[name] / 1e9:.2f}" for name in flops
                    if name not in ("forward", "train"))
  body = [
      _results.table(["loss", "system", "examples/s (median)", "median s/step",
                      "timed steps s", "first step s"], rows),
      "Ratio ours/HF of examples/s (ratio of the medians; median of the per-round ratios):",
      _results.table(["loss", "ours / HF", "per-round median"], ratio_rows),
      f"Achieved model FLOP/s, with {flops['train'] / 1e9:.1f} GFLOP per step (analytic, "
      f"`model_flops`: forward {flops['forward'] / 1e9:.1f} GFLOP = {parts}; x3 for forward + "
      f"backward), against a plain {args.matmul_size}^3 float32 matmul timed in the same rounds: "
      f"jax {mm_rate['jax_matmul'] / 1e9:.1f} GFLOP/s, torch "
      f"{mm_rate['torch_matmul'] / 1e9:.1f} GFLOP/s (medians).",
      _results.table(["loss", "system", "GFLOP/s", "/ own framework's matmul",
                      "/ faster matmul"], flop_rows),
      f"XLA `cost_analysis()` of our compiled step (all HLO ops, element-wise included): "
      f"{xla_note}.",
      "HF phases inside its timed steps (median s): " + "; ".join(
          f"{LOSSES[loss]} forward {fw:.2f}, backward {bw:.2f}, AdamW {op:.3f}"
          for loss, (fw, bw, op) in hf_phases.items()) + ".",
  ]
  if breakdown:
    names = list(next(iter(breakdown.values()))[0])
    body.append("Breakdown (separately timed parts, median s; ours: each part its own jit; "
                "forward pieces with dropout on):")
    body.append(_results.table(
        ["part"] + [f"{LOSSES[loss]} {who}" for loss in breakdown for who in ("ours", "HF")],
        [[name] + [f"{breakdown[loss][i][name]:.3f}" for loss in breakdown for i in (0, 1)]
         for name in names]))
  params_note = "; ".join(f"{LOSSES[loss]}: ours {o:,}, HF {h:,} (HF attention `{attn}`)"
                          for loss, (o, h, attn) in notes.items())
  params_note += (f" (ours trains BART's `final_logits_bias` ({base.vocab_size:,}), a buffer in "
                  "HF)")
  setup = {
      "versions": _results.versions("jax", "jaxlib", "flax", "optax", "torch", "transformers")
                  + f" (torch BLAS: {torch_blas()})",
      "threads": f"torch.get_num_threads() {torch.get_num_threads()}, interop "
                 f"{torch.get_num_interop_threads()}; jax {jax.default_backend()} devices "
                 f"{len(jax.devices())}; {_results.thread_env()}",
      "config": base.describe(),
      "trained parameters": params_note,
      "timing": f"our steps compiled ahead of time; {args.warmup} untimed steps per system, then "
                f"{args.reps} rounds, each running every system once (order "
                f"{', '.join(order)}); {method}; torch AdamW `{args.torch_adamw}`",
  }
  print("\n\n".join(body))
  if not args.no_write:
    text = _results.section("train_step", "Train step: ragjax vs transformers RAG (CPU)", setup,
                            "\n\n".join(body))
    print(f"wrote {_results.write_section('train_step', text)}")


if __name__ == "__main__":
  main()
