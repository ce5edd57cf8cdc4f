"""A RAG system built from a config: towers, tokenizers, corpus, questions and the retrieval glue
that turns a batch of questions into the generator's inputs.

  system = build_system(cfg)                       # model, tokenizers, corpus, questions
  params = system.initial_params(shardings)        # pretrained / warm-started / random towers
  host = system.question_batch(questions)          # [B, ...] numpy: query tokens, labels, ...
  rows_bk = ...                                    # top-k corpus rows (device or ScaNN)
  ctx = assemble_contexts(tables, host, rows_bk)   # generator inputs [B, K, L]

The generator reads `title / passage // question` (RAG §2.3, HF `RagRetriever.postprocess_docs`)
as `[bos] title / text` (the passage part, pre-tokenized once per corpus into a table) followed by
` // question [eos]` (per question); joining separately tokenized parts equals tokenizing the
joined string for WordPiece and byte-level BPE (both split at the space before ` //`). When the
whole does not fit in `context_max_length`, the passage part is truncated so that the question is
always read (HF truncates the joined string from the end, which can drop the question).
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

from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.errors import DataError
from ragjax.models.bert import BertConfig, BertEncoder
from ragjax.models.rag import TITLE_SEP, DOC_SEP, RagModel
from ragjax.models.retriever import EMBED_BUCKETS, Retriever
from ragjax.models.seq2seq import Seq2SeqConfig

log = logging.getLogger("ragjax")
TOWERS = ("query_encoder", "passage_encoder", "generator")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class GeneratorTokenizer:
  """The generator's tokenizer: a `tokenizers.Tokenizer` used without special tokens (they are
  placed explicitly from the `Seq2SeqConfig`: `bos` for BART-style inputs, `eos` last)."""

  def __init__(self, tokenizer, cfg: Seq2SeqConfig):
    self._tok = tokenizer
    self._tok.no_padding()
    self._tok.no_truncation()
    self.cfg = cfg
    # BART (and a BERT2BERT warm start) open inputs with <s>/[CLS]; T5 has no BOS.
    self.bos = cfg.bos_token_id if cfg.arch == "bart" else None
    self.eos, self.pad = cfg.eos_token_id, cfg.pad_token_id
    self.specials = {t for t in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id,
                                 cfg.decoder_start_token_id) if t is not None}

  @classmethod
  def from_dir(cls, path, cfg: Seq2SeqConfig) -> "GeneratorTokenizer":
    return cls(WordPieceTokenizer.from_dir(path)._tok
               if not (pathlib.Path(path) / "tokenizer.json").is_file()
               else __import__("tokenizers").Tokenizer.from_file(
                   str(pathlib.Path(path) / "tokenizer.json")), cfg)

  def ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Text of generated ids `[T]`, special tokens and everything after the first EOS dropped."""
    out = []
    for i in np.asarray(ids).tolist()[1:]:  # [0] is the decoder start token
      if i == self.eos:
        break
      if i not in self.specials:
        out.append(int(i))
    return self._tok.decode(out, skip_special_tokens=True).strip()


@dataclasses.dataclass
class ContextTables:
  """The passage part of every generator input, tokenized once: `ids [N, L]` int32 (`[bos] title /
  text`, truncated to L - 1 tokens, padded) and `lengths [N]` int32."""
  ids: np.ndarray
  lengths: np.ndarray


def passage_tables(passages: Sequence[Passage], tok: GeneratorTokenizer, length: int,
                   title_sep: str = TITLE_SEP) -> ContextTables:
  """`ContextTables` of `passages` for contexts of `length` tokens (HF postprocess_docs title
  handling: one leading/trailing `"` stripped, double spaces collapsed)."""
  texts = [(p.title.removeprefix('"').removesuffix('"') + title_sep + p.text).replace("  ", " ")
           for p in passages]
  bos = [] if tok.bos is None else [tok.bos]
  return ContextTables(*pad_rows([(bos + row)[:length - 1] for row in tok.ids(texts)], length,
                                 tok.pad))


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token id lists (each at most `width` long) -> `(ids [N, width] int32, lengths [N] int32)`,
  right-padded with `pad_id`."""
  ids = np.full((len(rows), width), pad_id, np.int32)
  lengths = np.zeros(len(rows), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    lengths[i] = len(row)
  return ids, lengths


def assemble_contexts(table_ids_nl, table_lengths_n, question_ids_bq, question_lengths_b,
                      rows_bk, pad_id: int, xp=jnp):
  """Generator inputs `(ids [B, K, L], mask [B, K, L])` int32: passage part of corpus row
  `rows_bk[b, k]` followed by question part `b`, passage truncated so the question fits.

  `table_ids_nl` `[N, L]` / `table_lengths_n` `[N]` from `passage_tables`; `question_ids_bq`
  `[B, Q]` / `question_lengths_b` `[B]` (` // question [eos]`, Q <= L). `xp` is `jnp` (inside jit,
  on the device) or `np` (host-side retrieval); both give the same result.
  """
  length = table_ids_nl.shape[1]
  q = question_ids_bq.shape[1]
  p_bkl = table_ids_nl[rows_bk]                                    # [B, K, L]
  qlen_b11 = question_lengths_b[:, None, None]
  plen_bk1 = xp.minimum(table_lengths_n[rows_bk][..., None], length - qlen_b11)
  j_l = xp.arange(length)[None, None, :]
  qpos_bkl = xp.clip(j_l - plen_bk1, 0, q - 1)
  q_bkl = xp.take_along_axis(xp.broadcast_to(question_ids_bq[:, None, :],
                                             (*rows_bk.shape, q)), qpos_bkl, axis=2)
  in_passage = j_l < plen_bk1
  in_question = (j_l >= plen_bk1) & (j_l < plen_bk1 + qlen_b11)
  ids = xp.where(in_passage, p_bkl, xp.where(in_question, q_bkl, pad_id))
  return ids.astype(xp.int32), (in_passage | in_question).astype(xp.int32)


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

  @property
  def k(self) -> int:
    return 1 if self.closed_book else int(self.cfg.model.k)

  @property
  def closed_book(self) -> bool:
    return self.cfg.model.loss == "closed_book"

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
  from ragjax.models import hf_import
  from ragjax.models.retriever import load_retriever
  dtype = DTYPES[cfg.model.compute_dtype]
  r = cfg.retriever
  if r.init != "random":
    if r.init != "minilm" and not pathlib.Path(r.init).is_dir():
      raise DataError("expected 'minilm', 'random' or a checkpoint directory", path=r.init,
                      field="retriever.init")
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
  from flax.core import meta
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
  from ragjax.models import hf_import
  from ragjax.models.seq2seq_import import load_seq2seq_dir, warm_start_from_bert
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
  if kind == "hf":
    path = pathlib.Path(where)
    if not path.is_dir():
      raise DataError("no such checkpoint directory", path=where, field="generator.init")
    gcfg, params = load_seq2seq_dir(path, **common)
    return gcfg, params, GeneratorTokenizer.from_dir(path, gcfg)
  if kind == "random":
    vocab = WordPieceTokenizer.from_dir(vocab_dir)
    gcfg = random_generator_cfg(cfg, vocab.vocab_size, vocab.pad_id, vocab._token_id("[CLS]"),
                                vocab._token_id("[SEP]"))
    return gcfg, None, GeneratorTokenizer(vocab._tok, gcfg)
  raise DataError("expected 'bert:minilm', 'bert:DIR', 'hf:DIR' or 'random'", path=g.init,
                  field="generator.init")


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


def load_data(cfg) -> tuple[list[Passage], list[Question], list[Question]]:
  """`(passages, train questions, eval questions)` of `cfg.data.source`:
  "bios" (built-in synthetic biographies), "files" (corpus + question files), or
  "squad_split" (SQuAD v1.1 dev split by article, `ragjax.data.splits`).

  Raises: DataError naming the missing path or the config key.
  """
  d = cfg.data
  if d.source == "bios":
    from ragjax.data.synthetic import make_bios
    bios = make_bios(int(d.num_people), seed=int(d.bios_seed),
                     eval_fraction=float(d.eval_fraction))
    passages, train, evals = bios.passages, bios.train_questions, bios.eval_questions
  elif d.source in ("files", "squad_split"):
    for key in ("corpus", "train_questions", "eval_questions") if d.source == "files" else (
        "squad",):
      if not d.get(key) or not pathlib.Path(d[key]).exists():
        raise DataError("data path not found", path=d.get(key) or "<empty>",
                        field=f"data.{key}")
    if d.source == "files":
      from ragjax.data.corpus import read_passages
      from ragjax.data.qa import read_questions
      passages = read_passages(d.corpus)
      train, evals = read_questions(d.train_questions), read_questions(d.eval_questions)
    else:
      from ragjax.data.splits import squad_article_split
      passages, train, evals = squad_article_split(d.squad, int(d.num_eval_articles),
                                                   seed=int(d.split_seed))
  else:
    raise DataError("expected bios, files or squad_split", path=d.source, field="data.source")
  if d.max_train_questions:
    train = train[:int(d.max_train_questions)]
  if d.max_eval_questions:
    evals = evals[:int(d.max_eval_questions)]
  if not train:
    raise DataError("no training questions", path=str(d.get("train_questions") or d.source),
                    field="data")
  return passages, train, evals


def build_system(cfg) -> RagSystem:
  """A `RagSystem` from a config (see `experiments/bios.py` for the keys).

  Raises: DataError (missing data, bad init spec), WeightImportError (checkpoints).
  """
  passages, train, evals = load_data(cfg)
  retriever = build_retriever(cfg)
  from ragjax.models import hf_import
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
  from ragjax.config import ConfigError
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
  from ragjax.retrieval.embed import corpus_fingerprint
  h = hashlib.sha256((corpus_fingerprint(system.passages)
                      + json.dumps(system.retriever.identity, sort_keys=True)).encode())
  return h.hexdigest()[:16]
