"""Experiment configs: one Python file per experiment, `get_config(arg) -> ConfigDict`.

  ragjax train --config experiments/bios.py:smoke --config.train.total_steps=50 --workdir runs/x

`load_config("file.py:arg")` imports the file and calls `get_config(arg)`; `parse_arg` turns the
argument string ("smoke,loss=rag_token") into a ConfigDict of typed values; `apply_overrides`
applies `--config.a.b=value` strings, refusing unknown keys (the message lists the valid ones)
and parsing each value as the type of the field it replaces. `base_config()` has every key the
trainer reads; the enumerated values each key takes are the constants below (the modules that
implement them import these, so each list exists once). `validate(cfg, mesh)` runs every config
check before any data is read or any array is allocated (MaxText's `pyconfig` validation is the
model); `load_workdir_config(W)` reads back the config a run was trained with.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
from dataclasses import dataclass

import jax
import ml_collections

from ragjax import sharding
from ragjax.config_checks import (  # noqa: F401 (re-exported: ragjax.config.READERS, ...)
    BIOS_LAYOUTS, CONTEXT_MODES, DATA_SOURCES, DPR_NEGATIVES, PRETRAIN_EXCLUDE, PRETRAIN_QUERIES,
    PRETRAIN_OBJECTIVES, READERS, RETRIEVER_LOSSES, _choice, check_indexer_placement,
    config_file_errors, retrieved_k, validate_dpr, validate_retriever_loss, validate_sources)
from ragjax.errors import ConfigError, DataError

TOWERS = ("query_encoder", "passage_encoder", "generator")
LOSSES = ("rag_sequence", "rag_token", "top1", "closed_book")  # ragjax.objectives.rag_losses
RETRIEVER_ONLY_LOSSES = ("dpr",)  # model.loss of a job without a reader (ragjax.models.rag)
DECODINGS = ("rag_token", "rag_sequence_fast", "rag_sequence_thorough")
INDEX_KINDS = ("auto", "device", "scann", "exact_host")
REFRESH_MODES = ("off", "async", "sync")
LR_SCHEDULES = ("linear", "cosine", "constant")


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
    ConfigError: missing file, no `get_config` in it, a syntax error in it or an exception while
      it runs (naming the file and line).
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {file}: not found")
  module_spec = importlib.util.spec_from_file_location(f"ragjax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  with config_file_errors(file, "loading it"):
    module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {file}: defines no get_config(arg)")
  with config_file_errors(file, f"get_config({arg or None!r})"):
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
  value = _literal(text)
  if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
    example = tuple(x.strip() for x in text.split(",") if x.strip())
    raise ConfigError(f"--config.{key}={text}: expected a tuple, e.g. "
                      f"--config.{key}='{example!r}'")
  return value


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
    try:
      node[last] = _coerce(node[last], value, key)
    except TypeError as e:  # ml_collections' own type check (e.g. a tuple for an int field)
      raise ConfigError(f"--config.{key}={value}: {e}") from None
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with defaults; experiment files start here and override.

  Units: learning rates per step, lengths in tokens, sizes in bytes, intervals in steps.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      source="bios",              # "bios" | "files" | "squad_split"
      seed=0,                     # example order: permutation per (seed, epoch)
      num_people=2000, bios_seed=0, eval_fraction=0.2,       # source=bios
      bios_layout="single",       # "single" | "documents" (source=bios; data.synthetic_docs)
      bios_docs=dict(             # bios_layout="documents": its generator's options, as the
          shared_name_rate=0.2, max_namesakes=3, name_in_text=0.15,  # defaults of
          surname_in_news=0.5, role_noun=0.3, news_attribute_rate=0.5,  # ragjax.data.
          news_passages=2, personal_section=0.5, distractors=4,  # synthetic_docs.DocOptions
          headings=False, restate_rate=0.0),  # (ranges checked when the data is built)
      passage_context="none",     # none | first_sentence | file: contextual retrieval
      passage_context_file="",    # (data.contextualize), applied to every source's passages
      corpus="", train_questions="", eval_questions="",      # source=files
      squad="", num_eval_articles=10, split_seed=0,          # source=squad_split
      max_train_questions=0, max_eval_questions=0,           # 0 = all
      pretrain=dict(              # joint pretraining: train on the corpus itself, not questions
          objective="none",       # none | salient_span (REALM) | prefix_lm | span_corruption
          exclude="passage",      # passage | document: what a query may never retrieve
          query="passage",        # salient_span: passage (the masked passage) | title_sentence
                                  # (its title + the sentence holding the mask)
          seed=0, mask_token="[MASK]", sentinel="<extra_id_{}>", noise_density=0.15,
          mean_span_length=3.0, max_target_words=8))
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
      k=5, loss="rag_token",      # rag_token | rag_sequence | top1 | closed_book | dpr (a
                                  # retriever-only job on gold passages: DPR eq. 2, see dpr)
      reader="rag",               # rag (each passage apart, marginalised) | fid (Fusion-in-Decoder)
      retriever_k=0,              # K_r >= k passages retrieved and scored by retriever_loss; the
                                  # reader reads the top k of them (Atlas); 0: K_r = k
      label_smoothing=0.0, query_max_length=32, context_max_length=128, answer_max_length=16,
      compute_dtype="float32",    # "bfloat16": bf16 matmuls, float32 parameters
      doc_score_scale=1.0,        # p(z|x) = softmax(scale * q·d): 1 for DPR, ~20 for cosine
      dpr=dict(                   # model.loss="dpr": in-batch + hard negatives (Karpukhin et al.)
          hard_negatives=1,         # per question (0: in-batch negatives only)
          negatives="index"),       # index (the current index's top, ANCE) | bm25 (DPR), gold
                                    # passages excluded
      reencode_passages=False,    # joint training: the step re-encodes the K passages (REALM)
      rerank_candidates=0,        # >K: retrieve this many, keep the top K by the live passage
                                  # encoder (Atlas's over-retrieve-then-rerank); 0: off
      retriever_loss="none",      # none (the marginal trains it) | pdist | emdr2 (sequence
                                  # level) | emdr2_token (token level, Atlas's code) | loop | adist
      retriever_temperature=1.0,  # Atlas's temperature_score (divides the doc scores)
      target_temperature=1.0,     # Atlas's temperature_gold (divides the reader-side target;
                                  # emdr2_token: the reader's logits, as Atlas's code; not emdr2)
      retriever_loss_weight=1.0,  # its weight beside the generator's NLL
      retriever_null_baseline=False,  # train it on target minus its mean under exchangeable
                                  # evidence (retriever_losses.null_baselined)
      retriever_in_batch_negatives=False,  # pdist | emdr2 | emdr2_token | adist: the other examples'
                                  # passages join each query's softmax with target 0 (rag_loss)
      target_evidence="likelihood")  # likelihood | contrastive (rag reader: log p(y_i|x,z) -
                                  # log p(y_j|x,z), another example's answer) | random (a
                                  # control: noise of the reader's spread; see rag_loss)
  c.init = dict(                # start from another run (e.g. joint pretraining -> QA)
      from_workdir="",            # a `ragjax train` workdir: its towers initialise this run
      step=0,                     # its checkpoint step (0: the newest)
      towers=TOWERS,              # the towers taken from W
                                  # (the others start as this run's retriever/generator.init)
      index="reembed")            # reembed (the corpus under its passage encoder) | keep (its
                                  # published index version of that step)
  c.index = dict(
      kind="auto",                # auto | device (exact top-k on the mesh) | scann | exact_host
      device_max_bytes=2 * 2**30, chunk=65536,
      scann=dict(),               # ScannIndex.build parameters (defaults by corpus size)
      hybrid_bm25_candidates=0,   # >0: fuse this many BM25 and dense results per query by
      rrf_k=60.0,                 # reciprocal rank fusion (retrieval/hybrid.py); host kinds
      refresh=dict(               # joint training (`ragjax.joint`)
          mode="off",             # off | async (indexer process) | sync (in-process baseline)
          schedule="asap",        # "asap" | Atlas-style "0-1000:500,1000-10000:1000"
          max_staleness_steps=0,  # 0: unbounded; else wait for the indexer past it
          spawn_indexer=True,     # async: `ragjax train` starts the indexer worker(s)
          num_shards=1, poll_seconds=1.0, keep_versions=3, shard_size=1024,
          idle_timeout=1800.0,    # a spawned indexer exits after this long without work
          indexer_nice=0,         # os.nice() of spawned indexers (trainer keeps priority)
          indexer_env=dict(),     # extra environment of spawned indexers (e.g. XLA_FLAGS)
          indexer_device="auto")) # auto: refuse to spawn beside an accelerator trainer | cpu
  c.optim = dict(
      learning_rate=1e-4, warmup_steps=100, schedule="linear", end_lr_fraction=0.0,
      weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_grad_norm=1.0,
      lr_multipliers=dict(query_encoder=1.0, passage_encoder=1.0, generator=1.0),
      start_steps=dict(query_encoder=0, passage_encoder=0, generator=0),  # lr 0 before
      freeze=("passage_encoder",))  # RAG §2.4: the document encoder stays fixed
  c.train = dict(
      total_steps=1000, global_batch=8, grad_accum_steps=1, log_every=10,
      checkpoint_every=200, keep_checkpoints=3, eval_every=0, async_checkpointing=True,
      tensorboard=True, progress_bar=True,
      allow_config_change=False)  # resume although keys that change the steps differ
                                  # (training.workdir.check_resumed_config)
  c.mesh = dict(axes=tuple(sharding.DEFAULT_MESH), axis_rules=tuple(sharding.DEFAULT_AXIS_RULES),
                num_devices=0)            # 0: every device; N: the first N (one process)
  c.eval = dict(decoding="rag_token", num_beams=1, max_new_tokens=16, batch_size=32,
                recall_ks=(1, 5, 20))
  return c


def load_workdir_config(workdir) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (`W/config.json`), over `base_config()` (keys
  added since the run was written take their defaults). Raises: ConfigError when absent or not
  a `{"config": {...}}` JSON object."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise ConfigError(f"{path}: not found (is {workdir} a `ragjax train` workdir?)")
  try:
    saved = json.loads(path.read_text())["config"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConfigError(f"{path}: not a ragjax workdir config ({type(e).__name__}: {e}); expected "
                      'the {"config": {...}} that `ragjax train` writes') from None

  def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


# ------------------------------------------------------------------------- parsed values

@dataclass(frozen=True)
class RefreshSchedule:
  """Which steps export a checkpoint for the indexer (Atlas's `"0-1000:500,1000-10000:1000"`:
  every 500 steps in [0, 1000), every 1000 in [1000, 10000)), or `asap`: whenever the indexer has
  caught up with the last export."""
  ranges: tuple[tuple[int, int, int], ...] = ()
  asap: bool = False

  @classmethod
  def parse(cls, spec: str, key: str = "index.refresh.schedule") -> "RefreshSchedule":
    """`"asap"`, `""` (no exports), or comma-separated `start-end:every`.

    Raises: ConfigError (a ValueError) naming `key` and the malformed part.
    """
    spec = (spec or "").strip()
    if spec == "asap":
      return cls(asap=True)
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
      try:
        span, every = part.split(":")
        start, end = (int(x) for x in span.split("-"))
        every = int(every)
      except ValueError:
        raise ConfigError(f"{key}: {part!r} is not start-end:every (e.g. "
                          "'0-1000:500,1000-10000:1000', or 'asap')") from None
      if not (0 <= start < end and every > 0):
        raise ConfigError(f"{key}: {part!r} needs 0 <= start < end and every > 0")
      ranges.append((start, end, every))
    return cls(tuple(ranges))

  def exports(self, step: int) -> bool:
    """Whether a checkpoint at `step` (steps done) is exported by the schedule (not `asap`)."""
    return any(a <= step < b and step > 0 and (step - a) % e == 0 for a, b, e in self.ranges)


def towers(value, key: str) -> frozenset:
  """A config value naming towers (`optim.freeze`, the keys of `optim.lr_multipliers`) as a set.

  Raises: ConfigError naming `key` and the unknown tower(s).
  """
  out = frozenset(value or ())
  unknown = sorted(out - set(TOWERS))
  if unknown:
    raise ConfigError(f"{key}: unknown tower(s) {unknown}; expected some of {TOWERS}")
  return out


def frozen_towers(o) -> frozenset:
  """`optim.freeze` as a set. Raises: ConfigError naming an unknown tower."""
  return towers(o.freeze, "optim.freeze")


def dpr_live_passages(cfg) -> bool:
  """Whether a DPR job re-encodes its positives and hard negatives with a trained passage
  encoder (batch tokens) rather than reading the index's vectors (a frozen one)."""
  return "passage_encoder" not in frozen_towers(cfg.optim)


def passage_encoder_start(cfg) -> int:
  """`optim.start_steps.passage_encoder`: checkpoints up to this step hold the initial passage
  encoder, so there is nothing to re-embed before it."""
  return int(cfg.optim.start_steps.get("passage_encoder", 0))


# ---------------------------------------------------------------------------------- validate

def validate(cfg, mesh=None, *, data: bool = True) -> None:
  """Every check of a run's config, before any data is read or any array is allocated.

  Without `mesh`, the checks that need no devices (enumerated values, towers, schedules, joint
  training, and with `data` the data paths and init specs: an ahead-of-time compile reads
  neither); with the run's `mesh`, also the batch splits (global and eval batch over processes,
  micro-batches and data-parallel shards) and the logical axis rules.

  Raises: ConfigError naming the key and what was expected; DataError for a data path or init
  spec that names nothing on disk (the path and the key).
  """
  m, o = cfg.model, cfg.optim
  _choice(m.loss, LOSSES + RETRIEVER_ONLY_LOSSES, "model.loss")
  _choice(cfg.eval.decoding, DECODINGS, "eval.decoding")
  _choice(cfg.index.kind, INDEX_KINDS, "index.kind")
  _choice(o.schedule, LR_SCHEDULES, "optim.schedule")
  if int(cfg.train.total_steps) < 1:
    raise ConfigError(f"train.total_steps={cfg.train.total_steps}: expected a number of steps "
                      ">= 1")
  validate_retriever_loss(m)
  frozen = frozen_towers(o)
  validate_dpr(m, frozen)
  towers(dict(o.lr_multipliers), "optim.lr_multipliers")
  towers(dict(o.start_steps), "optim.start_steps")
  _validate_refresh(cfg, frozen)
  hybrid = int(cfg.index.get("hybrid_bm25_candidates", 0) or 0)
  if hybrid:
    if cfg.index.kind not in ("exact_host", "scann"):
      raise ConfigError(f"index.hybrid_bm25_candidates={hybrid} fuses BM25 with a host index: "
                        f"set index.kind to exact_host or scann (got {cfg.index.kind!r})")
    if hybrid < retrieved_k(m) or m.get("rerank_candidates", 0):
      raise ConfigError(f"index.hybrid_bm25_candidates={hybrid}: expected >= K={retrieved_k(m)} "
                        "and no model.rerank_candidates")
  c = int(m.get("rerank_candidates", 0) or 0)
  k_r = retrieved_k(m)
  if c and m.loss != "closed_book" and c <= k_r:
    raise ConfigError(f"model.rerank_candidates={c}: expected K={k_r} < it (0: no "
                      "re-ranking)")
  if data:
    validate_sources(cfg)
    _validate_bios_docs(cfg)
    _validate_init(cfg)
  if mesh is not None:
    _validate_mesh(cfg, mesh)


def _validate_refresh(cfg, frozen) -> None:
  r = cfg.index.refresh
  if r.mode not in REFRESH_MODES:
    raise ConfigError(f"index.refresh.mode {r.mode!r}: expected one of {REFRESH_MODES}")
  schedule = RefreshSchedule.parse(r.schedule)
  if r.mode == "sync" and schedule.asap:
    raise ConfigError("index.refresh.schedule='asap' needs mode='async' (sync refreshes at "
                      "scheduled steps)")
  if int(r.max_staleness_steps) < 0:
    raise ConfigError("index.refresh.max_staleness_steps must be >= 0 (0: unbounded)")
  if cfg.model.loss == "closed_book":
    return
  trainable = "passage_encoder" not in frozen
  if trainable and not cfg.model.reencode_passages and cfg.model.loss != "dpr":
    raise ConfigError("a trainable passage encoder (optim.freeze without passage_encoder) needs "
                      "model.reencode_passages=true: the step scores passages by their index "
                      "embeddings otherwise, so the passage encoder would get no gradient")
  if trainable and r.mode == "off":
    raise ConfigError("a trainable passage encoder needs index.refresh.mode 'async' or 'sync': "
                      "with 'off' the index would keep the initial encoder's embeddings")


def shape_config(cfg) -> dict:
  """The config keys that fix parameter shapes (a checkpoint from a run that differs in them
  cannot be restored; loss, K, lengths or learning rates may change between runs)."""
  r, g = cfg.retriever, cfg.generator
  return {"retriever": {"init": r.init, "random": r.random.to_dict()},
          "generator": {"init": g.init, "num_layers": g.num_layers,
                        "random": g.random.to_dict()}}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _validate_bios_docs(cfg) -> None:
  """`data.bios_docs` set away from its defaults only with the documents layout."""
  d = cfg.data
  defaults = base_config().data.bios_docs
  changed = sorted(k for k in d.get("bios_docs", {}) if d.bios_docs[k] != defaults.get(k))
  if changed and (d.source != "bios" or d.get("bios_layout", "single") != "documents"):
    raise ConfigError(f"data.bios_docs ({', '.join(changed)}): options of the documents layout, "
                      f"but data.source is {d.source!r} and data.bios_layout "
                      f"{d.get('bios_layout', 'single')!r}")


def _validate_init(cfg) -> None:
  i = cfg.get("init", {})
  if not i or not i.get("from_workdir"):
    return
  _choice(i.index, ("reembed", "keep"), "init.index")
  towers = tuple(i.get("towers", TOWERS))
  for t in towers:
    _choice(t, TOWERS, "init.towers")
  if not towers:
    raise ConfigError(f"init.towers: empty; expected some of {TOWERS}")
  if i.index == "keep" and "passage_encoder" not in towers:
    raise ConfigError("init.index='keep' needs 'passage_encoder' in init.towers (the kept index "
                      "was embedded by W's passage encoder)")
  src = pathlib.Path(i.from_workdir)
  if not (src / "config.json").is_file() or not (src / "checkpoints").is_dir():
    raise DataError("expected a `ragjax train` workdir (config.json and checkpoints/)",
                    path=src, field="init.from_workdir")
  theirs, ours = _flat(shape_config(load_workdir_config(src))), _flat(shape_config(cfg))
  side = {"retriever": "query_encoder" in towers or "passage_encoder" in towers,
          "generator": "generator" in towers}
  diff = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(ours)
          if side[k.split(".")[0]] and theirs.get(k) != ours.get(k)]
  if diff:
    raise ConfigError(f"init.from_workdir={src}: its towers have other shapes ({'; '.join(diff)})")


def _validate_mesh(cfg, mesh) -> None:
  try:
    rules = sharding.check_rules(normalized_axis_rules(cfg), mesh)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  g, accum = int(cfg.train.global_batch), int(cfg.train.grad_accum_steps)
  shards = sharding.batch_shards(mesh, rules)
  names = dict(rules).get(sharding.BATCH)
  if accum < 1 or g % accum:
    raise ConfigError(f"train.global_batch={g} is not divisible by train.grad_accum_steps="
                      f"{accum}")
  if (g // accum) % shards:
    raise ConfigError(f"train.global_batch={g} / grad_accum_steps={accum} = {g // accum} rows "
                      f"per micro-batch is not divisible by the data-parallel size {shards} "
                      f"(mesh axes {names} of {dict(mesh.shape)})")
  if g % jax.process_count():
    raise ConfigError(f"train.global_batch={g} is not divisible by the "
                      f"{jax.process_count()} processes")
  e = int(cfg.eval.batch_size)
  if e % shards or e % jax.process_count():
    raise ConfigError(f"eval.batch_size={e} is not divisible by the data-parallel size {shards} "
                      f"and the {jax.process_count()} processes")


def normalized_axis_rules(cfg) -> list:
  """`cfg.mesh.axis_rules` as `(logical, mesh axes)` pairs (lists from JSON become tuples)."""
  return [(l, tuple(p) if isinstance(p, (list, tuple)) else p) for l, p in cfg.mesh.axis_rules]
