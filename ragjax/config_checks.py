"""The model-objective and data-source checks of `ragjax.config.validate` (retriever losses,
readers and their options, the retriever-only DPR job, data sources and initialisations; each
raises ConfigError or DataError naming the key) and the names and helpers they need, re-exported
by `ragjax.config`."""
from __future__ import annotations

import contextlib
import pathlib
import traceback

from ragjax.errors import ConfigError, DataError, RagjaxError

RETRIEVER_LOSSES = ("none", "pdist", "emdr2", "emdr2_token", "loop", "adist")
READERS = ("rag", "fid")
DPR_NEGATIVES = ("index", "bm25")  # where a DPR job mines its hard negatives
DATA_SOURCES = ("bios", "files", "squad_split")
BIOS_LAYOUTS = ("single", "documents")
PRETRAIN_OBJECTIVES = ("salient_span", "prefix_lm", "span_corruption")  # ragjax.objectives.pretraining
PRETRAIN_EXCLUDE = ("passage", "document")
PRETRAIN_QUERIES = ("passage", "title_sentence")  # salient_span query text
CONTEXT_MODES = ("none", "first_sentence", "file")  # ragjax.data.contextualize


def _choice(value, options, key: str) -> None:
  if value not in options:
    raise ConfigError(f"{key} {value!r}: expected one of {options}")


def retrieved_k(m) -> int:
  """Passages per example in a step batch: `model.retriever_k` (K_r) when set, else `model.k`
  (1 for closed_book, which reads the question alone)."""
  if m.loss == "closed_book":
    return 1
  return max(int(m.k), int(m.get("retriever_k", 0) or 0))


def validate_dpr(m, frozen) -> None:
  if m.loss != "dpr":
    return
  d = m.get("dpr", {})
  _choice(d.get("negatives", "index"), DPR_NEGATIVES, "model.dpr.negatives")
  if int(d.get("hard_negatives", 1)) < 0:
    raise ConfigError(f"model.dpr.hard_negatives={d.get('hard_negatives')}: expected >= 0")
  if "generator" not in frozen:
    raise ConfigError("model.loss='dpr' trains the retriever alone: add 'generator' to "
                      "optim.freeze (AdamW's weight decay would otherwise shrink it)")
  if m.get("retriever_loss", "none") != "none" or m.get("reader", "rag") != "rag":
    raise ConfigError("model.loss='dpr' has no reader: leave model.retriever_loss='none' and "
                      "model.reader='rag'")
  if {"query_encoder", "passage_encoder"} <= frozen:
    raise ConfigError("model.loss='dpr' with both retriever towers in optim.freeze trains "
                      "nothing")


def validate_retriever_loss(m) -> None:
  name = m.get("retriever_loss", "none")
  reader = m.get("reader", "rag")
  _choice(reader, READERS, "model.reader")
  _choice(name, RETRIEVER_LOSSES, "model.retriever_loss")
  if name == "adist" and reader != "fid":
    raise ConfigError("model.retriever_loss='adist' distils the reader's cross-attention: it needs "
                      "model.reader='fid' (one cross-attention over all K passages); the rag "
                      "reader reads each passage apart. Use pdist, emdr2 or loop")
  if reader == "fid" and m.loss in ("closed_book", "top1"):
    raise ConfigError(f"model.reader='fid' with model.loss={m.loss!r}: the FiD reader reads all K "
                      "passages with its own NLL; use loss rag_token or rag_sequence (ignored "
                      "by FiD) or reader 'rag'")
  k_r = int(m.get("retriever_k", 0) or 0)
  if k_r:
    if k_r < int(m.k):
      raise ConfigError(f"model.retriever_k={k_r} < model.k={int(m.k)}: the retriever scores "
                        "at least the passages the reader reads (0: the same K)")
    if k_r > int(m.k) and name == "none":
      raise ConfigError(f"model.retriever_k={k_r} > model.k={int(m.k)} needs a "
                        "model.retriever_loss (pdist, emdr2, emdr2_token, loop or adist): only it "
                        "reads the extra passages")
  if name != "none" and m.loss == "closed_book":
    raise ConfigError("model.retriever_loss: closed_book retrieves nothing to train")
  if name == "emdr2_token" and m.get("retriever_null_baseline", False):
    raise ConfigError("model.retriever_null_baseline: emdr2_token has no null baseline (it is "
                      "defined for the sequence-level targets); use emdr2 or turn it off")
  if m.get("retriever_in_batch_negatives", False) and (
      name not in ("pdist", "emdr2", "emdr2_token", "adist") or m.get("retriever_null_baseline")):
    raise ConfigError("model.retriever_in_batch_negatives extends a pdist, emdr2, emdr2_token "
                      "or adist "
                      "objective: set model.retriever_loss accordingly (without "
                      "retriever_null_baseline)")
  if m.get("retriever_null_baseline", False) and name == "none":
    raise ConfigError("model.retriever_null_baseline baselines a retriever objective: set "
                      "model.retriever_loss to pdist, emdr2, emdr2_token, loop or adist")
  ev = m.get("target_evidence", "likelihood")
  _choice(ev, ("likelihood", "contrastive", "random"), "model.target_evidence")
  if ev != "likelihood" and (name in ("none", "emdr2_token") or reader == "fid"):
    raise ConfigError(f"model.target_evidence={ev!r} changes the target of a retriever "
                      "objective of the rag reader: set model.retriever_loss to pdist, emdr2 or "
                      "loop and model.reader='rag'")
  for key in ("retriever_temperature", "target_temperature"):
    if not float(m.get(key, 1.0)) > 0:
      raise ConfigError(f"model.{key}={m.get(key)}: expected a positive number")


@contextlib.contextmanager
def config_file_errors(file: pathlib.Path, doing: str):
  """Turn a config file's SyntaxError, or any exception raised while `doing` (importing it,
  calling its get_config), into one ConfigError naming the file and its line. A RagjaxError the
  file raises itself (e.g. an unknown row) passes through as it is."""
  try:
    yield
  except RagjaxError:
    raise
  except SyntaxError as e:
    raise ConfigError(f"config file {file}:{e.lineno}: syntax error: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 (user code: any exception becomes one line)
    here = str(pathlib.Path(file).resolve())
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if str(pathlib.Path(f.filename).resolve()) == here]
    where = f"{file}:{lines[-1]}" if lines else str(file)
    raise ConfigError(f"config file {where}: {type(e).__name__} while {doing}: {e}") from None


def validate_sources(cfg) -> None:
  """`cfg.data` and the towers' `init` paths (DataError / ConfigError naming the key)."""
  d = cfg.data
  if d.source not in DATA_SOURCES:
    raise DataError("expected bios, files or squad_split", path=d.source, field="data.source")
  if d.source == "bios":
    _choice(d.get("bios_layout", "single"), BIOS_LAYOUTS, "data.bios_layout")
  _choice(d.get("passage_context", "none"), CONTEXT_MODES, "data.passage_context")
  if d.get("passage_context") == "file" and not pathlib.Path(
      d.get("passage_context_file") or "").is_file():
    raise DataError("expected a JSON Lines file of {id, context}",
                    path=d.get("passage_context_file") or "<empty>",
                    field="data.passage_context_file")
  pre = d.get("pretrain", {})
  if pre and pre.get("objective", "none") != "none":
    _choice(pre.objective, PRETRAIN_OBJECTIVES + ("none",), "data.pretrain.objective")
    _choice(pre.exclude, PRETRAIN_EXCLUDE, "data.pretrain.exclude")
    _choice(pre.get("query", "passage"), PRETRAIN_QUERIES, "data.pretrain.query")
    if pre.get("query", "passage") != "passage" and pre.objective != "salient_span":
      raise ConfigError(f"data.pretrain.query={pre.query!r}: only salient_span reads it "
                        f"(objective {pre.objective!r})")
    if cfg.model.loss == "closed_book":
      raise ConfigError("data.pretrain.objective: closed_book retrieves nothing to pretrain")
  if d.source != "bios":
    for key in ("corpus", "train_questions", "eval_questions") if d.source == "files" else (
        "squad",):
      if not d.get(key) or not pathlib.Path(d[key]).exists():
        raise DataError("data path not found", path=d.get(key) or "<empty>",
                        field=f"data.{key}")
  init = cfg.retriever.init
  if init not in ("minilm", "random") and not pathlib.Path(init).is_dir():
    raise DataError("expected 'minilm', 'random' or a checkpoint directory", path=init,
                    field="retriever.init")
  kind, _, where = cfg.generator.init.partition(":")
  if kind not in ("bert", "hf", "random"):
    raise DataError("expected 'bert:minilm', 'bert:DIR', 'hf:DIR' or 'random'",
                    path=cfg.generator.init, field="generator.init")
  if kind == "hf" and not pathlib.Path(where).is_dir():
    raise DataError("no such checkpoint directory", path=where, field="generator.init")


INDEXER_DEVICES = ("auto", "cpu")


def check_indexer_placement(r, platform: str) -> None:
  """An asynchronous trainer that spawns its indexer on a host whose accelerators (`platform`
  of the mesh's devices: "gpu", "tpu", ...) it trains on would have the indexer compete for
  them. Refused unless `index.refresh.indexer_device="cpu"` (the spawned workers then see no
  accelerator: `indexer_spawn_env`). Raises: ConfigError saying how to start them apart."""
  device = r.get("indexer_device", "auto")
  _choice(device, INDEXER_DEVICES, "index.refresh.indexer_device")
  if r.mode != "async" or not r.get("spawn_indexer", True) or platform == "cpu":
    return
  if device == "auto":
    raise ConfigError(
        f"index.refresh.spawn_indexer: this trainer runs on the host's {platform} devices and a "
        "spawned indexer would compete for them. Start the indexer workers apart (`ragjax "
        "indexer --workdir W --shard i --num-shards n` on other hosts or node pools; "
        "launch/README.md) with --config.index.refresh.spawn_indexer=false, or spawn them on "
        "this host's CPU with --config.index.refresh.indexer_device=cpu")


def indexer_spawn_env(r) -> dict[str, str]:
  """Environment for a spawned indexer: `index.refresh.indexer_env`, and with
  `indexer_device="cpu"` no accelerator visible (JAX on the CPU, CUDA and TPU chips hidden)."""
  env = {k: str(v) for k, v in dict(r.get("indexer_env", {})).items()}
  if r.get("indexer_device", "auto") == "cpu":
    env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TPU_VISIBLE_CHIPS="")
  return env
