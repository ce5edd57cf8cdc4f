"""A RAG system built from a config: towers, tokenizers, corpus, questions.

  system = build_system(cfg)                       # model, tokenizers, corpus, questions
  towers = system.host_towers()                    # pretrained / warm-started towers (numpy)
  host = system.question_batch(questions)          # [B, ...] numpy: query tokens, labels, ...

Retrieval feeding (`ragjax.system.feed`) turns `host` and the top-k rows into the step batch,
with the generator inputs assembled by `ragjax.system.inputs`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from ragjax import config as config_lib
from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.data.sources import load_data
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.errors import ConfigError, DataError
from ragjax.models import hf_import
from ragjax.models.bert import BertConfig, BertEncoder
from ragjax.models.rag import RagModel
from ragjax.models.retriever import EMBED_BUCKETS, Retriever, load_retriever
from ragjax.models.seq2seq import Seq2SeqConfig
from ragjax.models.seq2seq_import import load_seq2seq_dir, warm_start_from_bert
from ragjax.objectives.pretraining import pretraining_examples_from_config
from ragjax.retrieval.embed import corpus_fingerprint
from ragjax.system.inputs import (DOC_SEP, ContextTables, GeneratorTokenizer, pad_rows,
                                  passage_tables)

log = logging.getLogger("ragjax")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class RagSystem:
  """Everything a run needs besides parameters (static for the life of a run).

  Attributes: `cfg` (the ConfigDict), `model` (RagModel), `retriever` (host-side query/passage
  encoders with the initial retriever params; its `tokenizer` makes query tokens),
  `gen_tok`, `generator_params` (host numpy, or None for a random generator), `passages`,
  `train_questions`, `eval_questions`, `tables` (ContextTables).
  """
  cfg: Any
  model: RagModel
  retriever: Retriever
  gen_tok: GeneratorTokenizer
  generator_params: dict | None
  passages: list[Passage]
  train_questions: list[Question]
  eval_questions: list[Question]
  tables: ContextTables
  _bm25: Any = dataclasses.field(default=None, repr=False)

  @property
  def k(self) -> int:
    """Passages retrieved per question (K_r, `config.retrieved_k`)."""
    return config_lib.retrieved_k(self.cfg.model)

  @property
  def reader_k(self) -> int:
    """Passages the generator reads: the first `model.k` of the K_r retrieved."""
    return 1 if self.closed_book else int(self.cfg.model.k)

  @property
  def closed_book(self) -> bool:
    return self.cfg.model.loss == "closed_book"

  def with_passages(self, passages: Sequence[Passage]) -> "RagSystem":
    """This system reading `passages` instead of its corpus (new generator context tables, no
    BM25 index until one is asked for); embedding them is the caller's."""
    return dataclasses.replace(self, passages=list(passages), _bm25=None, tables=passage_tables(
        passages, self.gen_tok, int(self.cfg.model.context_max_length)))

  # -------------------------------------------------------------------------------- batches

  def question_batch(self, questions: Sequence[Question]) -> dict[str, np.ndarray]:
    """Host arrays for B questions: `query_input_ids` / `query_attention_mask` `[B, Lq]`
    (retriever tokens), `question_ids` `[B, Q]` / `question_lengths` `[B]` (generator's
    ` // question [eos]`, or `[bos] question [eos]` for closed_book), `labels` `[B, T]`
    (decoder start, [bos for BART], first answer, eos; pad after)."""
    m = self.cfg.model
    lq, length, t = int(m.query_max_length), int(m.context_max_length), int(m.answer_max_length)
    q_tok = self.retriever.tokenizer.encode([x.question for x in questions], max_length=lq,
                                            length=lq)
    tok = self.gen_tok
    qmax = length // 2 if not self.closed_book else length
    prefix = "" if self.closed_book else DOC_SEP
    bos = [tok.bos] if (self.closed_book and tok.bos is not None) else []
    q_ids, q_len = pad_rows([(bos + row)[:qmax - 1] + [tok.eos]
                             for row in tok.ids([prefix + x.question for x in questions])],
                            qmax, tok.pad)
    cfg = self.model.generator_cfg
    start = [cfg.decoder_start_token_id]
    if tok.bos is not None and tok.bos != cfg.decoder_start_token_id:
      start.append(tok.bos)  # BART: </s> <s> answer </s> (HF RAG fine-tuning labels)
    answers = [x.answers[0] if x.answers else "" for x in questions]
    labels, _ = pad_rows([(start + row)[:t - 1] + [tok.eos] for row in tok.ids(answers)], t,
                         tok.pad)
    return {"query_input_ids": q_tok.input_ids, "query_attention_mask": q_tok.attention_mask,
            "question_ids": q_ids, "question_lengths": q_len, "labels": labels}

  def bm25_top_rows(self, questions: Sequence[Question], depth: int) -> np.ndarray:
    """BM25 (bm25s, Lucene scoring over `title text`) corpus rows `[B, depth]` int64, best
    first, of each question's text; the index is built on first use (seconds for 10^4
    passages)."""
    if self._bm25 is None:
      from ragjax.retrieval.bm25_index import BM25Index  # bm25s: imported on use
      self._bm25 = BM25Index.build([f"{p.title} {p.text}" for p in self.passages],
                                   [p.id for p in self.passages])
    return self._bm25.search_rows([q.question for q in questions],
                                  min(int(depth), len(self.passages)))[1]

  def closed_book_contexts(self, host: dict) -> tuple[np.ndarray, np.ndarray]:
    """closed_book generator inputs `[B, 1, Q]`: the question alone."""
    ids = host["question_ids"][:, None, :]
    mask = (np.arange(ids.shape[-1])[None, None, :] < host["question_lengths"][:, None, None])
    return ids, mask.astype(np.int32)

  # ----------------------------------------------------------------------------- parameters

  def host_towers(self) -> dict:
    """Host numpy towers to place into the state (`{tower: params}`): both retriever towers
    (pretrained, or the seeded random ones that embedded the corpus) and a loaded or
    warm-started generator (absent for a random one, which is initialised on the mesh)."""
    out = {"query_encoder": self.retriever.params["query_encoder"],  # the towers the index
           "passage_encoder": self.retriever.params["passage_encoder"]}  # was embedded with
    if self.generator_params is not None:
      out["generator"] = self.generator_params
    return out


# ------------------------------------------------------------------------------ construction

def _bert_random_cfg(rcfg, vocab_size: int, dtype) -> BertConfig:
  r = rcfg.random
  vocab_size = int(r.get("vocab_size", 0)) or vocab_size
  return BertConfig(vocab_size=vocab_size, hidden_size=r.hidden_size,
                    num_hidden_layers=r.num_layers, num_attention_heads=r.num_heads,
                    intermediate_size=r.ffn_size, max_position_embeddings=512, pooling="cls",
                    normalize=False, dtype=dtype)


def build_retriever(cfg) -> Retriever:
  """The retriever from `cfg.retriever.init`: "minilm", a checkpoint directory, or "random"
  (sizes in `cfg.retriever.random`, MiniLM's WordPiece vocabulary, seeded by `cfg.seed`)."""
  dtype = DTYPES[cfg.model.compute_dtype]
  r = cfg.retriever
  if r.init != "random":  # the spec was checked by `ragjax.config.validate`
    ret = load_retriever(r.init, max_length=int(r.passage_max_length), dtype=dtype)
    # Separate towers: the query side trains, the passage side (and its index) stays put.
    ret.params = {"query_encoder": ret.params["query_encoder"],
                  "passage_encoder": jax.tree.map(np.copy, ret.params["passage_encoder"])}
    return ret
  tok = WordPieceTokenizer.from_dir(hf_import.minilm_dir(verify=False),
                                    max_length=int(r.passage_max_length), buckets=EMBED_BUCKETS)
  bcfg = _bert_random_cfg(r, tok.vocab_size, dtype)
  ids = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(lambda key: BertEncoder(bcfg).init(key, ids, ids)["params"])
  keys = jax.random.split(jax.random.key(cfg.seed), 2)
  params = {name: jax.tree.map(np.asarray, meta.unbox(init(key)))
            for name, key in zip(("query_encoder", "passage_encoder"), keys)}
  identity = {"name": "random", "seed": int(cfg.seed), "dim": bcfg.output_dim,
              "sizes": r.random.to_dict()}
  return Retriever(bcfg, bcfg, params, tok, identity)


def build_generator(cfg, vocab_dir) -> tuple[Seq2SeqConfig, dict | None, GeneratorTokenizer]:
  """`(Seq2SeqConfig, host params or None, tokenizer)` from `cfg.generator.init`:
  "bert:minilm" / "bert:DIR" (BERT2BERT warm start, first `num_layers` layers), "hf:DIR" (BART/T5
  safetensors + tokenizer.json) or "random" (`cfg.generator.random` sizes, the retriever's
  vocabulary from `vocab_dir`)."""
  g = cfg.generator
  dtype = DTYPES[cfg.model.compute_dtype]
  common = dict(dtype=dtype, dropout_rate=float(g.dropout_rate))
  kind, _, where = g.init.partition(":")
  if kind == "bert":
    path = hf_import.minilm_dir(verify=False) if where in ("", "minilm") else pathlib.Path(where)
    bcfg, bparams = hf_import.load_bert_dir(path)
    n = int(g.num_layers) or bcfg.num_hidden_layers
    if n < bcfg.num_hidden_layers:
      bcfg = dataclasses.replace(bcfg, num_hidden_layers=n)
      bparams = {k: v for k, v in bparams.items()
                 if not k.startswith("layer_") or int(k[6:]) < n}
    vocab = WordPieceTokenizer.from_dir(path)
    gcfg, params = warm_start_from_bert(
        bcfg, bparams, seed=int(cfg.seed), pad_token_id=vocab.pad_id,
        bos_token_id=vocab._token_id("[CLS]"), eos_token_id=vocab._token_id("[SEP]"),
        attention_dropout_rate=0.0, cross_attention=str(g.cross_attention_init), **common)
    return gcfg, params, GeneratorTokenizer(vocab._tok, gcfg)
  if kind == "hf":  # the directory was checked by `ragjax.config.validate`
    path = pathlib.Path(where)
    gcfg, params = load_seq2seq_dir(path, **common)
    return gcfg, params, GeneratorTokenizer.from_dir(path, gcfg)
  if kind == "random":
    vocab = WordPieceTokenizer.from_dir(vocab_dir)
    gcfg = random_generator_cfg(cfg, vocab.vocab_size, vocab.pad_id, vocab._token_id("[CLS]"),
                                vocab._token_id("[SEP]"))
    return gcfg, None, GeneratorTokenizer(vocab._tok, gcfg)
  raise ConfigError(f"generator.init {g.init!r}: expected 'bert:minilm', 'bert:DIR', 'hf:DIR' "
                    "or 'random'")


def random_generator_cfg(cfg, vocab_size: int, pad: int, bos: int, eos: int) -> Seq2SeqConfig:
  """The `Seq2SeqConfig` of `cfg.generator.random` (`vocab_size` there overrides)."""
  r = cfg.generator.random
  common = dict(dtype=DTYPES[cfg.model.compute_dtype],
                dropout_rate=float(cfg.generator.dropout_rate))
  return Seq2SeqConfig(arch=r.arch, vocab_size=int(r.get("vocab_size", 0)) or vocab_size,
                       d_model=r.d_model, encoder_layers=r.num_layers,
                       decoder_layers=r.num_layers, num_heads=r.num_heads, d_ff=r.ffn_size,
                       position_offset=0, max_position_embeddings=1024, pad_token_id=pad,
                       bos_token_id=bos, eos_token_id=eos, decoder_start_token_id=bos, **common)


def build_system(cfg) -> RagSystem:
  """A `RagSystem` from a config (see `experiments/bios.py` for the keys). With
  `data.pretrain.objective` set the training examples are built from the passages
  (`ragjax.objectives.pretraining`), each excluding its own passage or document from retrieval;
  the eval questions stay the source's.

  Raises: DataError (missing data, bad init spec), WeightImportError (checkpoints).
  """
  passages, train, evals = load_data(cfg)
  pre = cfg.data.get("pretrain", {})
  if pre and pre.get("objective", "none") != "none":  # unlabelled text: the corpus itself
    train = pretraining_examples_from_config(
        passages, pre, where=str(cfg.data.get("corpus") or cfg.data.get("squad")
                                 or cfg.data.source))
    if cfg.data.max_train_questions:
      train = train[:int(cfg.data.max_train_questions)]
  if cfg.model.loss == "dpr":  # DPR trains on (question, gold passage) pairs
    ids = {p.id for p in passages}
    for q in train:
      if not q.gold_passage_ids or q.gold_passage_ids[0] not in ids:
        raise DataError(f"model.loss='dpr' needs every training question to carry a gold "
                        f"passage id of the corpus: question {q.id!r} ({cfg.data.source}) has "
                        f"{list(q.gold_passage_ids)}")
  retriever = build_retriever(cfg)
  gcfg, gparams, gen_tok = build_generator(cfg, hf_import.minilm_dir(verify=False))
  model = RagModel(retriever.query_cfg, gcfg, passage_cfg=retriever.passage_cfg,
                   doc_score_scale=float(cfg.model.doc_score_scale))
  tables = passage_tables(passages, gen_tok, int(cfg.model.context_max_length))
  return RagSystem(cfg, model, retriever, gen_tok, gparams, passages, train, evals, tables)


def abstract_model(cfg) -> RagModel:
  """The RagModel of a config whose towers are all "random" (sizes, with `vocab_size`, in
  `cfg.retriever.random` / `cfg.generator.random`), built without data, tokenizer or weights:
  for ahead-of-time compiles of paper-scale models.

  Raises: ConfigError when a tower is not random or a vocabulary size is missing.
  """
  if cfg.retriever.init != "random" or cfg.generator.init != "random":
    raise ConfigError("abstract_model: retriever.init and generator.init must be 'random'")
  if not cfg.retriever.random.get("vocab_size") or not cfg.generator.random.get("vocab_size"):
    raise ConfigError("abstract_model: set retriever.random.vocab_size and "
                      "generator.random.vocab_size")
  bcfg = _bert_random_cfg(cfg.retriever, 0, DTYPES[cfg.model.compute_dtype])
  gcfg = random_generator_cfg(cfg, 0, pad=1, bos=0, eos=2)
  return RagModel(bcfg, gcfg, passage_cfg=bcfg, doc_score_scale=float(cfg.model.doc_score_scale))


def corpus_key(system: RagSystem) -> str:
  """A short fingerprint of (corpus, passage encoder) naming cached embeddings."""
  h = hashlib.sha256((corpus_fingerprint(system.passages)
                      + json.dumps(system.retriever.identity, sort_keys=True)).encode())
  return h.hexdigest()[:16]
