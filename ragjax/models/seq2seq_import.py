"""Import HuggingFace BART / T5 safetensors checkpoints into `Seq2Seq` params; BERT2BERT start.

`load_seq2seq_dir` reads a local directory (`config.json`, optional `generation_config.json`,
`model.safetensors` or a sharded index; nothing is downloaded) of a `BartForConditionalGeneration`,
a bare `BartModel`, or a `T5ForConditionalGeneration` / `T5Model` (v1.0 relu or v1.1
gated-gelu, tied or untied head). Every tensor is checked against the shapes `Seq2Seq` expects;
all missing and mis-shaped tensors are listed in one `WeightImportError`.

`warm_start_from_bert` is the BERT2BERT initialisation of Rothe et al. 2020 ("Leveraging
Pre-trained Checkpoints for Sequence Generation Tasks", sec. 3): encoder and decoder both start
from one BERT checkpoint, the decoder's cross-attention is freshly initialised, and the LM head is
tied to the word embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from ragjax.errors import WeightImportError
from ragjax.models.bert import BertConfig
from ragjax.models.hf_import import load_safetensors, map_tensors, read_config
from ragjax.models.seq2seq import ACTIVATIONS, Seq2Seq, Seq2SeqConfig

# Generation settings that our decoding does not implement; a checkpoint that sets them is
# imported with a warning (pass equivalent settings to transformers when comparing).
_UNSUPPORTED_GENERATION = ("no_repeat_ngram_size", "min_length", "min_new_tokens",
                           "repetition_penalty", "bad_words_ids", "suppress_tokens",
                           "begin_suppress_tokens")


def seq2seq_config_from_hf(hf: dict, **overrides) -> Seq2SeqConfig:
  """A `Seq2SeqConfig` from a HuggingFace BART or T5 `config.json` dict (optionally merged with
  `generation_config.json`). `overrides` set fields (e.g. `dtype=jnp.bfloat16`).

  Raises:
    WeightImportError: a model type other than bart/t5/mt5, or a BART config whose encoder and
      decoder differ in heads or FFN width (not supported by `Seq2SeqConfig`).
  """
  model_type = hf.get("model_type")
  if model_type == "bart":
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):
      if hf.get(enc, 16) != hf.get(dec, hf.get(enc, 16)):
        raise WeightImportError(f"config: {enc}={hf.get(enc)} differs from {dec}={hf.get(dec)}; "
                                "Seq2SeqConfig needs them equal")
    kw = dict(
        arch="bart", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
        encoder_layers=hf["encoder_layers"], decoder_layers=hf["decoder_layers"],
        num_heads=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"],
        activation=hf.get("activation_function", "gelu"),
        max_position_embeddings=hf["max_position_embeddings"], position_offset=2,
        layer_norm_eps=1e-5, pad_token_id=hf.get("pad_token_id", 1),
        bos_token_id=hf.get("bos_token_id", 0), eos_token_id=hf.get("eos_token_id", 2),
        decoder_start_token_id=hf.get("decoder_start_token_id", 2),
        forced_bos_token_id=hf.get("forced_bos_token_id"),
        forced_eos_token_id=hf.get("forced_eos_token_id"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        scale_embedding=bool(hf.get("scale_embedding", False)),
        init_std=hf.get("init_std", 0.02), dropout_rate=hf.get("dropout", 0.1),
        attention_dropout_rate=hf.get("attention_dropout", 0.0),
        activation_dropout_rate=hf.get("activation_dropout", 0.0))
  elif model_type in ("t5", "mt5"):
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise WeightImportError(f"config: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # as HF T5Config does
    tied = hf.get("tie_word_embeddings", True)
    rate = hf.get("dropout_rate", 0.1)
    kw = dict(
        arch="t5", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
        encoder_layers=hf["num_layers"],
        decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        num_heads=hf["num_heads"], head_dim=hf["d_kv"], d_ff=hf["d_ff"], activation=act,
        gated_mlp=len(parts) == 2,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6), pad_token_id=hf.get("pad_token_id", 0),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id", 1),
        decoder_start_token_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)),
        forced_bos_token_id=hf.get("forced_bos_token_id"),
        forced_eos_token_id=hf.get("forced_eos_token_id"), tie_word_embeddings=tied,
        # transformers >= 5 writes `scale_decoder_outputs`; older configs scale iff tied.
        scale_decoder_outputs=hf.get("scale_decoder_outputs", tied),
        init_std=hf.get("initializer_factor", 1.0), dropout_rate=rate,
        attention_dropout_rate=rate, activation_dropout_rate=rate)
  else:
    raise WeightImportError(f"config: model_type {model_type!r} is not supported "
                            "(expected 'bart', 't5' or 'mt5')")
  if kw["activation"] not in ACTIVATIONS:
    raise WeightImportError(f"config: activation {kw['activation']!r} is not one of "
                            f"{sorted(ACTIVATIONS)}")
  for name in ("eos_token_id", "forced_eos_token_id"):  # lists of EOS ids: keep the first
    if isinstance(kw[name], (list, tuple)):
      kw[name] = kw[name][0]
  kw.update(overrides)
  return Seq2SeqConfig(**kw)


def abstract_seq2seq_params(cfg: Seq2SeqConfig, boxed: bool = False):
  """Shapes of `Seq2Seq(cfg)` parameters, without allocating them (unboxed unless `boxed`)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: Seq2Seq(cfg).init(jax.random.key(0), ids, jnp.ones_like(ids),
                                                    ids))
  return shapes["params"] if boxed else meta.unbox(shapes)["params"]


def _layer_map(cfg: Seq2SeqConfig, hf: str, ours: tuple, decoder: bool) -> dict:
  """Flax path -> (HF name, kind) for one layer (kinds as in `hf_import._hf_shape`)."""
  m = {}
  if cfg.arch == "bart":
    subs = [("self_attn", "self_attn.", "self_attn_layer_norm.")]
    if decoder:
      subs.append(("cross_attn", "encoder_attn.", "encoder_attn_layer_norm."))
    for name, attn, norm in subs:
      for ours_p, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        m[ours + (name, ours_p, "kernel")] = (f"{hf}{attn}{theirs}.weight", "lin1")
        m[ours + (name, ours_p, "bias")] = (f"{hf}{attn}{theirs}.bias", "flat")
      m[ours + (name, "out", "kernel")] = (f"{hf}{attn}out_proj.weight", "lin2")
      m[ours + (name, "out", "bias")] = (f"{hf}{attn}out_proj.bias", "same")
      m[ours + (f"{name}_norm", "scale")] = (f"{hf}{norm}weight", "same")
      m[ours + (f"{name}_norm", "bias")] = (f"{hf}{norm}bias", "same")
    for ours_p, theirs in (("wi", "fc1"), ("wo", "fc2")):
      m[ours + ("mlp", ours_p, "kernel")] = (f"{hf}{theirs}.weight", "lin1")
      m[ours + ("mlp", ours_p, "bias")] = (f"{hf}{theirs}.bias", "same")
    m[ours + ("mlp_norm", "scale")] = (f"{hf}final_layer_norm.weight", "same")
    m[ours + ("mlp_norm", "bias")] = (f"{hf}final_layer_norm.bias", "same")
    return m
  subs = [("self_attn", "layer.0.SelfAttention.", "layer.0.layer_norm.")]
  if decoder:
    subs.append(("cross_attn", "layer.1.EncDecAttention.", "layer.1.layer_norm."))
  for name, attn, norm in subs:
    for ours_p, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      m[ours + (name, ours_p, "kernel")] = (f"{hf}{attn}{theirs}.weight", "lin1")
    m[ours + (name, "out", "kernel")] = (f"{hf}{attn}o.weight", "lin2")
    m[ours + (f"{name}_norm", "scale")] = (f"{hf}{norm}weight", "same")
  ff = f"{hf}layer.{2 if decoder else 1}."
  for ours_p in ("wi", "wi_0", "wi_1", "wo"):
    m[ours + ("mlp", ours_p, "kernel")] = (f"{ff}DenseReluDense.{ours_p}.weight", "lin1")
  m[ours + ("mlp_norm", "scale")] = (f"{ff}layer_norm.weight", "same")
  return m


def seq2seq_name_map(cfg: Seq2SeqConfig, prefix: str = "") -> dict:
  """Flax param path -> (HF tensor name, kind). `prefix` is `model.` for BART-for-generation."""
  m = {("shared", "embedding"): (f"{prefix}shared.weight", "same"),
       ("final_logits_bias",): ("final_logits_bias", "row"),
       ("lm_head", "kernel"): ("lm_head.weight", "lin1")}
  for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
    hf_stack = f"{prefix}{stack}."
    if cfg.arch == "bart":
      m[(stack, "embed_positions", "embedding")] = (f"{hf_stack}embed_positions.weight", "same")
      m[(stack, "layernorm_embedding", "scale")] = (f"{hf_stack}layernorm_embedding.weight", "same")
      m[(stack, "layernorm_embedding", "bias")] = (f"{hf_stack}layernorm_embedding.bias", "same")
      layer = lambda i: f"{hf_stack}layers.{i}."
    else:
      m[(stack, "relative_attention_bias", "embedding")] = (
          f"{hf_stack}block.0.layer.0.SelfAttention.relative_attention_bias.weight", "same")
      m[(stack, "final_layer_norm", "scale")] = (f"{hf_stack}final_layer_norm.weight", "same")
      layer = lambda i: f"{hf_stack}block.{i}."
    for i in range(n):
      m.update(_layer_map(cfg, layer(i), (stack, f"layer_{i}"), stack == "decoder"))
  return m


def _embedding_name(tensors: dict, prefix: str) -> str | None:
  """The shared token embedding's name: `shared`, else a stack's `embed_tokens` (tied copies)."""
  for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    if prefix + name in tensors:
      return prefix + name
  return None


def import_seq2seq(tensors: dict[str, np.ndarray], cfg: Seq2SeqConfig,
                   where: str = "checkpoint") -> dict:
  """HF BART/T5 tensors -> `Seq2Seq(cfg)` params (numpy, `cfg.param_dtype`).

  A missing BART `final_logits_bias` is zeros (as in HF). Tensors we do not use (e.g. T5's
  unused `EncDecAttention.relative_attention_bias`) are ignored.

  Raises:
    WeightImportError: lists every missing tensor and every shape mismatch.
  """
  prefix = "model." if cfg.arch == "bart" and any(k.startswith("model.") for k in tensors) else ""
  names = seq2seq_name_map(cfg, prefix)
  emb = _embedding_name(tensors, prefix)
  if emb is not None:
    names[("shared", "embedding")] = (emb, "same")
  expected = traverse_util.flatten_dict(abstract_seq2seq_params(cfg))
  flat = map_tensors(
      tensors, expected, names, where=where,
      what=f"{cfg.arch.upper()} ({cfg.encoder_layers}+{cfg.decoder_layers} layers, d_model "
           f"{cfg.d_model}, vocab {cfg.vocab_size})",
      defaults={("final_logits_bias",): np.zeros(expected[("final_logits_bias",)].shape)}
      if ("final_logits_bias",) in expected else None)
  return traverse_util.unflatten_dict(flat)


def load_seq2seq_dir(path, **overrides) -> tuple[Seq2SeqConfig, dict]:
  """(config, params) from a HF BART / T5 checkpoint directory.

  The head is untied when the checkpoint holds an `lm_head.weight` that differs from the shared
  embedding (what transformers does too, whatever `tie_word_embeddings` says).

  Raises:
    WeightImportError: bad config, or missing / mis-shaped tensors (all listed).
  """
  path = pathlib.Path(path)
  hf = read_config(path)
  gen_file = path / "generation_config.json"
  if gen_file.is_file():
    gen = json.loads(gen_file.read_text())
    for key in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
                "eos_token_id", "pad_token_id", "bos_token_id"):
      if gen.get(key) is not None:
        hf[key] = gen[key]
    unsupported = {k: gen[k] for k in _UNSUPPORTED_GENERATION if gen.get(k) not in (None, 0, 1.0)}
    if unsupported:
      logging.warning("%s: generation settings not implemented by ragjax.decoding: %s",
                      gen_file, unsupported)
  tensors = load_safetensors(path)
  cfg = seq2seq_config_from_hf(hf)
  emb = _embedding_name(tensors, "model." if cfg.arch == "bart" and
                        any(k.startswith("model.") for k in tensors) else "")
  if ("lm_head.weight" in tensors and emb is not None and cfg.tie_word_embeddings
      and not np.array_equal(tensors["lm_head.weight"], tensors[emb])):
    cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
  cfg = dataclasses.replace(cfg, **overrides)
  return cfg, import_seq2seq(tensors, cfg, where=str(path))


def warm_start_from_bert(bert_cfg: BertConfig, bert_params: dict, *, seed: int = 0,
                         pad_token_id: int = 0, bos_token_id: int = 101, eos_token_id: int = 102,
                         decoder_start_token_id: int | None = None,
                         cross_attention: str = "random", **overrides
                         ) -> tuple[Seq2SeqConfig, dict]:
  """BERT2BERT (Rothe et al. 2020): a BART-architecture `Seq2Seq` started from BERT weights.

  `bert_params` are `ragjax.models.bert.BertEncoder` params (`hf_import.load_bert_dir`). The
  mapping is exact for the encoder (its hidden states equal BERT's last hidden states):
  position_offset 0 and BERT's `token_type_embeddings[0]` folded into the position table
  (segment A everywhere), BERT's embedding LayerNorm as `layernorm_embedding`, BERT layer i as
  encoder layer i. Decoder layer i takes BERT layer i's self-attention and FFN (causally
  masked); cross-attention (Rothe et al. sec. 3: the only weights not from BERT) is freshly
  initialised from `seed` (normal, std `init_std` = 0.02 as BERT's), its LayerNorm to 1/0; the
  LM head is tied to the word embeddings, `final_logits_bias` is zero.
  Token ids default to bert-base-uncased's ([PAD]=0, [CLS]=101 as BOS and decoder start,
  [SEP]=102 as EOS). `overrides` set further `Seq2SeqConfig` fields.

  `cross_attention="self_attention"` instead starts decoder layer i's cross-attention (and its
  LayerNorm) from BERT layer i's self-attention: its query/key projections already match a
  decoder token to related encoder tokens, so reading (copying) the input is learned in far fewer
  steps than from random weights (measured on the synthetic biographies: see
  experiments/bios.py). This departs from Rothe et al.'s recipe, which keeps it random.

  Raises:
    ValueError: BERT with a projection layer, an unknown `cross_attention`.

  """
  if cross_attention not in ("random", "self_attention"):
    raise ValueError(f"cross_attention {cross_attention!r}: expected 'random' or "
                     "'self_attention'")
  if bert_cfg.projection_dim:
    raise ValueError("warm_start_from_bert: BERT's encode_proj has no place in a seq2seq model")
  kw = dict(
      arch="bart", vocab_size=bert_cfg.vocab_size, d_model=bert_cfg.hidden_size,
      encoder_layers=bert_cfg.num_hidden_layers, decoder_layers=bert_cfg.num_hidden_layers,
      num_heads=bert_cfg.num_attention_heads, d_ff=bert_cfg.intermediate_size,
      activation=bert_cfg.hidden_act, max_position_embeddings=bert_cfg.max_position_embeddings,
      position_offset=0, layer_norm_eps=bert_cfg.layer_norm_eps, pad_token_id=pad_token_id,
      bos_token_id=bos_token_id, eos_token_id=eos_token_id,
      decoder_start_token_id=(bos_token_id if decoder_start_token_id is None
                              else decoder_start_token_id),
      tie_word_embeddings=True, scale_embedding=False, dropout_rate=bert_cfg.dropout_rate,
      attention_dropout_rate=bert_cfg.dropout_rate, dtype=bert_cfg.dtype,
      param_dtype=bert_cfg.param_dtype)
  kw.update(overrides)
  cfg = Seq2SeqConfig(**kw)
  bert = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, bert_params))
  emb = lambda n: bert[("embeddings", n, "embedding")]
  params = {("shared", "embedding"): emb("word_embeddings"),
            ("final_logits_bias",): np.zeros((cfg.vocab_size,), np.float32)}
  positions = emb("position_embeddings") + emb("token_type_embeddings")[0][None, :]
  for stack in ("encoder", "decoder"):
    params[(stack, "embed_positions", "embedding")] = positions
    for n in ("scale", "bias"):
      params[(stack, "layernorm_embedding", n)] = bert[("embeddings", "LayerNorm", n)]
    for i in range(bert_cfg.num_hidden_layers):
      ours, theirs = (stack, f"layer_{i}"), f"layer_{i}"
      pairs = [(("self_attn", p), ("attention", p)) for p in ("query", "key", "value")]
      pairs += [(("self_attn", "out"), ("attention", "output")),
                (("self_attn_norm",), ("attention_norm",)), (("mlp", "wi"), ("intermediate",)),
                (("mlp", "wo"), ("output",)), (("mlp_norm",), ("output_norm",))]
      for dst, src in pairs:
        for leaf in (("kernel", "bias") if dst[0] in ("self_attn", "mlp") else ("scale", "bias")):
          params[ours + dst + (leaf,)] = bert[(theirs,) + src + (leaf,)]
  expected = traverse_util.flatten_dict(abstract_seq2seq_params(cfg))
  # Fresh cross-attention (Rothe et al. sec. 3): kernels ~ N(0, init_std), biases 0, LayerNorm
  # 1/0; drawn on the host (no compilation) in a fixed path order from `seed`.
  rng = np.random.default_rng(seed)
  for path in sorted(k for k in expected if k[0] == "decoder" and k[2] == "cross_attn"):
    shape = expected[path].shape
    params[path] = (rng.normal(0.0, cfg.init_std, shape).astype(np.float32)
                    if path[-1] == "kernel" else np.zeros(shape, np.float32))
  for i in range(cfg.decoder_layers):
    params[("decoder", f"layer_{i}", "cross_attn_norm", "scale")] = np.ones(cfg.d_model, np.float32)
    params[("decoder", f"layer_{i}", "cross_attn_norm", "bias")] = np.zeros(cfg.d_model, np.float32)
    if cross_attention == "self_attention":
      ours = ("decoder", f"layer_{i}")
      for p in ("query", "key", "value", "out"):
        for leaf in ("kernel", "bias"):
          params[ours + ("cross_attn", p, leaf)] = params[ours + ("self_attn", p, leaf)]
      for leaf in ("scale", "bias"):
        params[ours + ("cross_attn_norm", leaf)] = params[ours + ("self_attn_norm", leaf)]
  wrong = sorted("/".join(k) for k in set(expected) ^ set(params))
  wrong += ["/".join(k) for k in expected if k in params
            and tuple(params[k].shape) != tuple(expected[k].shape)]
  if wrong:
    raise ValueError(f"warm_start_from_bert: parameters do not match Seq2Seq: {wrong}")
  dtype = jnp.dtype(cfg.param_dtype)
  return cfg, traverse_util.unflatten_dict({k: np.asarray(v, dtype) for k, v in params.items()})
