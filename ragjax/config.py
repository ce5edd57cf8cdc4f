"""Experiment configs: one Python file per experiment, `get_config(arg) -> ConfigDict`.

  ragjax train --config experiments/bios.py:smoke --config.train.total_steps=50 --workdir runs/x

`load_config("file.py:arg")` imports the file and calls `get_config(arg)`; `parse_arg` turns the
argument string ("smoke,loss=rag_token") into a ConfigDict of typed values; `apply_overrides`
applies `--config.a.b=value` strings, refusing unknown keys (the message lists the valid ones)
and parsing each value as the type of the field it replaces.
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib

import ml_collections


class ConfigError(ValueError):
  """A config file, argument or override that cannot be applied; the message says which."""


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"smoke,loss=rag_token,k=3"` -> ConfigDict(smoke=True, loss="rag_token", k=3).

  Only keys present in `defaults` are allowed; a bare key sets True.
  Raises:
    ConfigError: an unknown key (listing the known ones).
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config argument {key!r}: unknown; known: {sorted(defaults)}")
    out[key] = _literal(value) if sep else True
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Import `path.py` (`spec` is `path.py` or `path.py:arg`) and return `get_config(arg)`.

  Raises:
    ConfigError: missing file, or no `get_config` in it.
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {file}: not found")
  module_spec = importlib.util.spec_from_file_location(f"ragjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {file}: defines no get_config(arg)")
  cfg = module.get_config(arg or None)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"config file {file}: get_config returned {type(cfg).__name__}, "
                      "expected ml_collections.ConfigDict")
  return cfg


def _coerce(old, text: str, key: str):
  if isinstance(old, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected true or false")
  if isinstance(old, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"--config.{key}={text}: expected an integer") from None
  if isinstance(old, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"--config.{key}={text}: expected a number") from None
  if isinstance(old, str):
    return text
  return _literal(text)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Apply `["--config.a.b=v", "a.c=w", ...]` to `cfg` in place and return it.

  Raises:
    ConfigError: a malformed override, or an unknown key (naming the valid keys at that level).
  """
  for item in overrides or []:
    text = item[len("--config."):] if item.startswith("--config.") else item
    key, sep, value = text.partition("=")
    if not sep or not key:
      raise ConfigError(f"{item!r}: expected --config.key=value")
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:i]) or "<top level>"
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"--config.{key}: unknown key {part!r} in {where}; valid keys: {valid}")
      if i < len(parts) - 1:
        node = node[part]
    last = parts[-1]
    node[last] = _coerce(node[last], value, key)
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with defaults; experiment files start here and override.

  Units: learning rates per step, lengths in tokens, sizes in bytes, intervals in steps.
  """
  from ragjax import sharding
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      source="bios",              # "bios" | "files" | "squad_split"
      seed=0,                     # example order: permutation per (seed, epoch)
      num_people=2000, bios_seed=0, eval_fraction=0.2,       # source=bios
      corpus="", train_questions="", eval_questions="",      # source=files
      squad="", num_eval_articles=10, split_seed=0,          # source=squad_split
      max_train_questions=0, max_eval_questions=0)           # 0 = all
  c.retriever = dict(
      init="minilm",              # "minilm" | checkpoint dir | "random"
      passage_max_length=256, embed_batch_size=64,
      random=dict(hidden_size=32, num_layers=2, num_heads=4, ffn_size=64))
  c.generator = dict(
      init="bert:minilm",         # "bert:minilm" | "bert:DIR" (BERT2BERT) | "hf:DIR" | "random"
      num_layers=0,               # bert warm start: keep the first N layers (0 = all)
      cross_attention_init="random",  # bert warm start: "random" (Rothe et al.) | "self_attention"
      dropout_rate=0.1,
      random=dict(arch="bart", d_model=32, num_layers=2, num_heads=4, ffn_size=64))
  c.model = dict(
      k=5, loss="rag_token",      # rag_token | rag_sequence | top1 | closed_book
      label_smoothing=0.0, query_max_length=32, context_max_length=128, answer_max_length=16,
      compute_dtype="float32",    # "bfloat16": bf16 matmuls, float32 parameters
      doc_score_scale=1.0,        # p(z|x) = softmax(scale * q·d): 1 for DPR, ~20 for cosine
      reencode_passages=False,    # joint training: the step re-encodes the K passages (REALM)
      rerank_candidates=0)        # >K: retrieve this many, keep the top K by the live passage
                                  # encoder (Atlas's over-retrieve-then-rerank); 0: off
  c.index = dict(
      kind="auto",                # auto | device (exact top-k on the mesh) | scann | exact_host
      device_max_bytes=2 * 2**30, chunk=65536,
      scann=dict(),               # ScannIndex.build parameters (defaults by corpus size)
      refresh=dict(               # joint training (`ragjax.refresh`, `ragjax.indexer`)
          mode="off",             # off | async (indexer process) | sync (in-process baseline)
          schedule="asap",        # "asap" | Atlas-style "0-1000:500,1000-10000:1000"
          max_staleness_steps=0,  # 0: unbounded; else wait for the indexer past it
          spawn_indexer=True,     # async: `ragjax train` starts the indexer worker(s)
          num_shards=1, poll_seconds=1.0, keep_versions=3, shard_size=1024,
          idle_timeout=1800.0,    # a spawned indexer exits after this long without work
          indexer_nice=0,         # os.nice() of spawned indexers (trainer keeps priority)
          indexer_env=dict()))    # extra environment of spawned indexers (e.g. XLA_FLAGS)
  c.optim = dict(
      learning_rate=1e-4, warmup_steps=100, schedule="linear", end_lr_fraction=0.0,
      weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_grad_norm=1.0,
      lr_multipliers=dict(query_encoder=1.0, passage_encoder=1.0, generator=1.0),
      start_steps=dict(query_encoder=0, passage_encoder=0, generator=0),  # lr 0 before
      freeze=("passage_encoder",))  # RAG §2.4: the document encoder stays fixed
  c.train = dict(
      total_steps=1000, global_batch=8, grad_accum_steps=1, log_every=10,
      checkpoint_every=200, keep_checkpoints=3, eval_every=0, async_checkpointing=True,
      tensorboard=True, progress_bar=True)
  c.mesh = dict(axes=tuple(sharding.DEFAULT_MESH), axis_rules=tuple(sharding.DEFAULT_AXIS_RULES),
                num_devices=0)            # 0: every device; N: the first N (one process)
  c.eval = dict(decoding="rag_token", num_beams=1, max_new_tokens=16, batch_size=32,
                recall_ks=(1, 5, 20))
  return c
