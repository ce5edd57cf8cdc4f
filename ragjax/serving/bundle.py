"""Serving bundles: everything one checkpoint needs to answer questions, in one directory.

  manifest = export_bundle("runs/bios", "bundles/bios")      # newest checkpoint
  bundle = load_bundle("bundles/bios")                        # every file's sha256 checked
  system, params = bundle.system, bundle.params               # a RagSystem + host numpy towers

Layout (paths relative to the bundle; `manifest.json` lists every other file with its sha256):

  config.json                     the run's config (model, retrieval and eval settings: K, lengths,
                                  formatting, doc-score scale, decoding)
  model.json                      the towers' hyper-parameters (BertConfig x 2, Seq2SeqConfig)
  weights/{query_encoder,passage_encoder,generator}.safetensors   float32, "a/b/c" param paths
  tokenizers/{retriever,generator}.json                           `tokenizers` JSON
  passages/corpus/1.0.0/...       the passage store (TFDS array_record, `tfds_store.CorpusSource`)
  index/                          exact (`embeddings.npy`) or ScaNN index of the index version the
                                  checkpoint was trained with (`ragjax.retrieval.index`)
  manifest.json                   {"format_version", "checkpoint_step", "index_version",
                                   "index_embedded_step", "files": {path: sha256}, "eval",
                                   "versions": {"ragjax", "jax", ...}, "created_unix"}

The bundle is written into a temporary sibling and renamed into place (`fsutil.atomic_directory`),
manifest last: a killed export leaves only a `.B.tmp-*` directory, which does not load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tokenizers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from ragjax import config as config_lib
from ragjax.checkpoint import Checkpointer
from ragjax.data.tfds_store import CorpusSource, build_corpus_dataset
from ragjax.data.tokenize import WordPieceTokenizer
from ragjax.errors import BundleError, NotFoundError
from ragjax.fsutil import atomic_directory, write_json_atomic
from ragjax.joint import versions
from ragjax.models.bert import BertConfig
from ragjax.models.hf_import import sha256_file
from ragjax.models.rag import RagModel
from ragjax.models.retriever import Retriever
from ragjax.models.seq2seq import Seq2SeqConfig
from ragjax.retrieval.embed import corpus_fingerprint
from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.registry import load_index
from ragjax.retrieval.scann_index import ScannIndex
from ragjax.system import feed
from ragjax.system.build import RagSystem, build_system
from ragjax.system.inputs import GeneratorTokenizer, passage_tables
from ragjax.training.workdir import config_to_json

log = logging.getLogger("ragjax")
FORMAT_VERSION = 1
TOWERS = ("query_encoder", "passage_encoder", "generator")


# ---------------------------------------------------------------------------- (de)serialise

def _cfg_json(cfg) -> dict:
  return {k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v)
          for k, v in dataclasses.asdict(cfg).items()}


def _cfg_from_json(cls, d: dict, where: str):
  try:
    return cls(**{k: (jnp.dtype(v) if k in ("dtype", "param_dtype") else v) for k, v in d.items()})
  except (TypeError, ValueError) as e:
    raise BundleError(f"{where}: not a {cls.__name__}: {e}") from None


def save_tower(path, params: dict) -> None:
  """One tower's params as float32 safetensors keyed by their "a/b/c" paths."""
  flat = {"/".join(k): np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in traverse_util.flatten_dict(params).items()}
  save_file(flat, str(path))


def load_tower(path) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v
                                       for k, v in load_file(str(path)).items()})


def checkpoint_params(workdir, step: int | None = None) -> tuple[int, dict, dict]:
  """`(step, params, checkpoint metadata)` of a workdir's checkpoint (newest when `step` is
  None), params as host numpy `{"bi_encoder": {...}, "generator": {...}}`.

  Raises: NotFoundError when the workdir has no such checkpoint."""
  reader = Checkpointer.reader(pathlib.Path(workdir) / "checkpoints")
  steps = reader.all_steps()
  step = reader.latest_step() if step is None else int(step)
  if not steps:
    raise NotFoundError(f"{workdir}: no checkpoint yet (checkpoints/ holds no finished step); "
                        "train it first, or give a workdir whose run has saved one")
  if step not in steps:
    raise NotFoundError(f"{workdir}: no checkpoint at step {step} (steps: {steps})")
  reader.verify(step)  # a corrupt step is refused in one line, naming the file
  return step, reader.restore_subtree(step, ("params",)), reader.metadata(step)


def _last_eval(workdir, step: int) -> dict | None:
  """The newest `W/eval/step_N.json` with N <= step (the run's own evaluations)."""
  best = None
  for f in (pathlib.Path(workdir) / "eval").glob("step_*.json"):
    head = f.name[len("step_"):-len(".json")]
    if head.isdigit() and int(head) <= step and (best is None or int(head) > best[0]):
      best = (int(head), f)
  if best is None:
    return None
  report = json.loads(best[1].read_text())
  return {k: v for k, v in report.items() if not isinstance(v, list)}


def _versions() -> dict:
  import importlib.metadata as md
  out = {}
  for name in ("ragjax", "jax", "flax", "orbax-checkpoint", "scann"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


# ---------------------------------------------------------------------------------- export

def index_embeddings(workdir, system: RagSystem, params: dict, meta: dict, step: int
                     ) -> tuple[np.ndarray, int | None, int]:
  """`(embeddings [N, D] float32, index version or None, the step whose passage encoder embedded
  them)`: the published version the checkpoint was trained with, else (a frozen passage encoder:
  no versions) the corpus embedded now by the checkpoint's passage encoder."""
  version = meta.get("index_version")
  if version is not None:
    emb, manifest, _ = versions.load_version(
        workdir, int(version), expect_count=len(system.passages), expect_dim=system.retriever.dim,
        expect_corpus=corpus_fingerprint(system.passages))
    return emb, int(version), int(manifest["checkpoint_step"])
  return embed_corpus(system, params), None, step


def embed_corpus(system: RagSystem, params: dict) -> np.ndarray:
  """`system.passages` embedded by the passage encoder of `params` (a checkpoint's or a
  bundle's, holding `bi_encoder`): `[N, D]` float32."""
  ret = system.retriever
  ret.params = {t: params["bi_encoder"][t] for t in ("query_encoder", "passage_encoder")}
  emb = ret.encode_passages([p.title for p in system.passages], [p.text for p in system.passages],
                            batch_size=int(system.cfg.retriever.embed_batch_size))
  return np.asarray(emb, np.float32)


def export_bundle(workdir, out, step: int | None = None, passages=None) -> dict:
  """Write the serving bundle of `workdir`'s checkpoint `step` (newest by default) to `out`
  atomically and return its manifest (module docstring). `passages` replaces the run's corpus
  (index hot-swap, Lewis et al. 2020 §4.5): embedded by the checkpoint's passage encoder, no
  index version; a server of `out` picks it up on reload.

  Raises: NotFoundError (no checkpoint), ConfigError / DataError (the run's config or data),
  IndexFormatError (its index version does not match the corpus), BundleError (`passages` for a
  closed-book run).
  """
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  cfg = config_lib.load_workdir_config(workdir)
  step, params, meta = checkpoint_params(workdir, step)
  system = build_system(cfg)
  if passages is not None:
    if system.closed_book:
      raise BundleError(f"--corpus: {workdir} is closed-book (model.loss=closed_book); it reads "
                        "no passages")
    system = system.with_passages(passages)
    meta = {k: v for k, v in meta.items() if k != "index_version"}  # embedded here, below
  if system.closed_book:
    emb, version, embedded = np.zeros((0, system.retriever.dim), np.float32), None, step
  else:
    emb, version, embedded = index_embeddings(workdir, system, params, meta, step)
  kind = feed.choose_index_kind(cfg.index.kind, len(system.passages), system.retriever.dim,
                                int(cfg.index.device_max_bytes))
  ids = [p.id for p in system.passages]
  with atomic_directory(out) as tmp:
    (tmp / "weights").mkdir()
    towers = {"query_encoder": params["bi_encoder"]["query_encoder"],
              "passage_encoder": params["bi_encoder"]["passage_encoder"],
              "generator": params["generator"]}
    for name, tree in towers.items():
      save_tower(tmp / "weights" / f"{name}.safetensors", tree)
    model = system.model
    (tmp / "model.json").write_text(json.dumps({
        "query_encoder": _cfg_json(model.query_cfg),
        "passage_encoder": _cfg_json(model.passage_cfg or model.query_cfg),
        "generator": _cfg_json(model.generator_cfg),
        "doc_score_scale": float(model.doc_score_scale),
        "retriever_tokenizer": {"max_length": system.retriever.tokenizer.max_length,
                                "buckets": list(system.retriever.tokenizer.buckets)},
        "retriever_identity": system.retriever.identity}, indent=1, default=str))
    (tmp / "config.json").write_text(json.dumps(config_to_json(cfg), indent=1))
    (tmp / "tokenizers").mkdir()
    system.retriever.tokenizer._tok.save(str(tmp / "tokenizers" / "retriever.json"))
    system.gen_tok._tok.save(str(tmp / "tokenizers" / "generator.json"))
    build_corpus_dataset(system.passages, tmp / "passages", name="corpus")
    if len(ids):
      encoder = {"bundle_step": step, "index_version": version}
      index = (ScannIndex.build(emb, ids, encoder=encoder) if kind == "scann"
               else ExactIndex.build(emb, ids, encoder=encoder))
      index.save(tmp / "index")
      if kind == "scann":  # the host feeder also gathers the vectors of the retrieved rows
        np.save(tmp / "embeddings.npy", np.asarray(emb, np.float32))
    files = {str(f.relative_to(tmp)): sha256_file(f)
             for f in sorted(tmp.rglob("*")) if f.is_file()}
    manifest = {"format_version": FORMAT_VERSION, "checkpoint_step": int(step),
                "index_version": version, "index_embedded_step": int(embedded),
                "index_kind": "scann" if kind == "scann" else "exact",
                "num_passages": len(ids), "source_workdir": str(workdir.resolve()),
                "corpus_replaced": passages is not None,
                "eval": _last_eval(workdir, step), "versions": _versions(),
                "created_unix": time.time(), "files": files}
    write_json_atomic(tmp / "manifest.json", manifest)
  log.info("bundle %s: step %d, index version %s, %d files", out, step, version, len(files))
  return manifest


def export_hf(workdir, out, step: int | None = None) -> dict:
  """HuggingFace directories of a checkpoint's towers under `out`, published atomically:
  `query_encoder/` and `passage_encoder/` (`BertModel` + sentence-transformers modules, or
  `DPRQuestionEncoder` / `DPRContextEncoder` when projected) and `generator/` (BART, T5, or
  `EncoderDecoderModel` for BERT2BERT; `hf_export.seq2seq_hf_kind`). Returns
  `{"checkpoint_step", "towers": {name: HF class}}`, also written to `out/ragjax_export.json`.

  Raises: NotFoundError (no checkpoint), ExportError (a tower no HF class computes)."""
  from ragjax.serving import hf_export
  workdir = pathlib.Path(workdir)
  cfg = config_lib.load_workdir_config(workdir)
  step, params, _ = checkpoint_params(workdir, step)
  system = build_system(cfg)
  model, rtok = system.model, system.retriever.tokenizer
  towers = {}
  with atomic_directory(out) as tmp:
    for side, bcfg, kind in (("query_encoder", model.query_cfg, "dpr_question"),
                             ("passage_encoder", model.passage_cfg or model.query_cfg,
                              "dpr_context")):
      kind = kind if bcfg.projection_dim else "bert"
      hf_export.write_bert_dir(tmp / side, bcfg, params["bi_encoder"][side], rtok, kind=kind,
                               max_length=rtok.max_length)
      towers[side] = hf_export.bert_hf_config(bcfg, kind)["architectures"][0]
    gcfg = model.generator_cfg
    hf_export.write_seq2seq_dir(tmp / "generator", gcfg, params["generator"], system.gen_tok._tok,
                                max_length=int(cfg.model.context_max_length))
    towers["generator"] = hf_export.seq2seq_hf_config(gcfg)["architectures"][0]
    report = {"checkpoint_step": int(step), "source_workdir": str(workdir.resolve()),
              "towers": towers}
    write_json_atomic(tmp / "ragjax_export.json", report)
  return report


# ------------------------------------------------------------------------------------ load

@dataclasses.dataclass
class Bundle:
  """A loaded bundle: `system` (a RagSystem with no training questions), `params` (host numpy
  `{"bi_encoder": {"query_encoder", "passage_encoder"}, "generator"}`), `embeddings` `[N, D]`
  float32, `index` (the saved ExactIndex / ScannIndex, or None for closed_book), `manifest`."""
  path: pathlib.Path
  manifest: dict
  cfg: ml_collections.ConfigDict
  system: RagSystem
  params: dict
  embeddings: np.ndarray
  index: object

  @property
  def index_version(self):
    return self.manifest["index_version"]

  @property
  def checkpoint_step(self) -> int:
    return int(self.manifest["checkpoint_step"])


def read_manifest(path, verify: bool = True) -> dict:
  """`B/manifest.json`, with every listed file's sha256 checked when `verify`.

  Raises: BundleError naming the missing manifest, an unknown format version, or each file
  that is missing or whose sha256 disagrees."""
  path = pathlib.Path(path)
  f = path / "manifest.json"
  if not f.is_file():
    raise BundleError(f"{f}: missing: {path} is not a complete serving bundle (a killed export "
                      "leaves only a .tmp-* sibling)")
  try:
    manifest = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise BundleError(f"{f}:{e.lineno}: invalid JSON: {e.msg}") from None
  if manifest.get("format_version") != FORMAT_VERSION:
    raise BundleError(f"{f}: format_version {manifest.get('format_version')!r}, this ragjax "
                      f"reads {FORMAT_VERSION}")
  if verify:
    bad = []
    for rel, digest in manifest["files"].items():
      g = path / rel
      if not g.is_file():
        bad.append(f"{rel}: missing")
      elif sha256_file(g) != digest:
        bad.append(f"{rel}: sha256 differs from the manifest")
    if bad:
      raise BundleError(f"{path}: corrupt bundle: " + "; ".join(bad))
  return manifest


def load_bundle(path, verify: bool = True) -> Bundle:
  """Load a bundle written by `export_bundle` (every file's hash checked unless `verify=False`).

  Raises: BundleError (missing, corrupt or incompatible bundle)."""
  path = pathlib.Path(path)
  manifest = read_manifest(path, verify)
  cfg = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
  spec = json.loads((path / "model.json").read_text())
  qcfg = _cfg_from_json(BertConfig, spec["query_encoder"], f"{path}/model.json query_encoder")
  pcfg = _cfg_from_json(BertConfig, spec["passage_encoder"], f"{path}/model.json passage_encoder")
  gcfg = _cfg_from_json(Seq2SeqConfig, spec["generator"], f"{path}/model.json generator")
  towers = {t: load_tower(path / "weights" / f"{t}.safetensors") for t in TOWERS}
  params = {"bi_encoder": {t: towers[t] for t in ("query_encoder", "passage_encoder")},
            "generator": towers["generator"]}
  rt = spec["retriever_tokenizer"]
  rtok = WordPieceTokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizers" /
                                                               "retriever.json")),
                            max_length=int(rt["max_length"]), buckets=tuple(rt["buckets"]))
  gen_tok = GeneratorTokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizers" /
                                                                  "generator.json")), gcfg)
  passages = list(CorpusSource(path / "passages", name="corpus"))
  retriever = Retriever(qcfg, pcfg, dict(params["bi_encoder"]), rtok,
                        dict(spec.get("retriever_identity") or {}))
  model = RagModel(qcfg, gcfg, passage_cfg=pcfg, doc_score_scale=float(spec["doc_score_scale"]))
  tables = passage_tables(passages, gen_tok, int(cfg.model.context_max_length))
  system = RagSystem(cfg, model, retriever, gen_tok, None, passages, [], [], tables)
  index, emb = None, np.zeros((0, qcfg.output_dim), np.float32)
  if (path / "index").is_dir():
    index = load_index(path / "index", expect_dim=qcfg.output_dim, expect_count=len(passages))
    emb = (np.asarray(index.embeddings, np.float32) if isinstance(index, ExactIndex)
           else np.load(path / "embeddings.npy"))
  return Bundle(path, manifest, cfg, system, params, emb, index)


def load_published_version(bundle: Bundle, workdir, version: int) -> np.ndarray:
  """A training run's published index version `[N, D]` float32 for this bundle's corpus (live
  reload). Raises: IndexFormatError when it belongs to another corpus or dimension."""
  emb, _, _ = versions.load_version(workdir, int(version),
                                    expect_count=len(bundle.system.passages),
                                    expect_dim=bundle.system.retriever.dim,
                                    expect_corpus=corpus_fingerprint(bundle.system.passages))
  return emb


def jax_params(params: dict) -> dict:
  """Host params on the default device (serving keeps one copy)."""
  return jax.tree.map(jnp.asarray, params)
