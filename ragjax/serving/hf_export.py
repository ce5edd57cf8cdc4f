"""Export ragjax towers as HuggingFace directories that transformers loads offline.

The inverse of `ragjax.models.hf_import` / `seq2seq_import`: the same name tables (Flax path ->
(HF tensor name, kind)) read backwards, so an import followed by an export gives back the
tensors it read. Every Flax parameter must have a name; an unmapped one fails the export
(MaxText's `to_huggingface.py` rule), and nothing is written before every tensor is mapped.

  write_bert_dir(out, cfg, params, tokenizer)       # BertModel / DPRQuestionEncoder / ...Context...
  write_seq2seq_dir(out, cfg, params, tokenizer)    # Bart / T5 ForConditionalGeneration, or
                                                    # EncoderDecoderModel (BERT2BERT)

The BERT2BERT generator (`warm_start_from_bert`: BART layout, positions from 0, LM head tied to
the word embeddings with no transform) is exactly HF's `EncoderDecoderModel` of a
`BertGenerationEncoder` and a `BertGenerationDecoder` (Rothe et al. 2020's classes): BERT's
token-type embedding was folded into the position table on import, and `BertGeneration` has none.
Weights are float32 safetensors; configs are written as JSON without importing transformers.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from ragjax.errors import ExportError
from ragjax.models.bert import BertConfig
from ragjax.models.hf_import import _bert_name_map
from ragjax.models.seq2seq import Seq2SeqConfig
from ragjax.models.seq2seq_import import seq2seq_name_map

BERT_KINDS = ("bert", "dpr_question", "dpr_context")


def _from_flax(kind: str, leaf: np.ndarray) -> np.ndarray:
  """The HF tensor of one Flax leaf (inverse of `hf_import._to_flax`, kinds as `_hf_shape`)."""
  leaf = np.asarray(leaf, np.float32)
  if kind == "same":
    return leaf
  if kind == "row":
    return leaf[None]
  if kind == "flat":
    return leaf.reshape(-1)
  n_in = int(kind[-1])
  return leaf.reshape(int(np.prod(leaf.shape[:n_in])), int(np.prod(leaf.shape[n_in:]))).T


def export_tensors(params: dict, names: dict, *, what: str) -> dict[str, np.ndarray]:
  """HF tensors `{name: float32 array}` from a Flax param tree and its name table.

  Raises:
    ExportError: listing every parameter path the table does not map.
  """
  flat = traverse_util.flatten_dict(params)
  unmapped = sorted("/".join(p) for p in flat if p not in names)
  if unmapped:
    raise ExportError(f"cannot export {what}: no HuggingFace name for "
                      f"{', '.join(unmapped)}")
  return {names[p][0]: np.ascontiguousarray(_from_flax(names[p][1], v))
          for p, v in flat.items()}


def _write(out: pathlib.Path, tensors: dict, config: dict) -> pathlib.Path:
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
  return out


def write_tokenizer(out, tokenizer, *, specials: dict, max_length: int) -> None:
  """`tokenizer.json` + `tokenizer_config.json` (a `PreTrainedTokenizerFast` for transformers'
  `AutoTokenizer`) of a `tokenizers.Tokenizer`; `specials` e.g. `{"pad_token": "[PAD]"}`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(out / "tokenizer.json"))
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_length),
         "clean_up_tokenization_spaces": False, **specials}
  (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")


def _special_names(tokenizer, ids: dict) -> dict:
  """`{"pad_token": "[PAD]", ...}` for the ids that exist in `tokenizer`."""
  out = {}
  for key, tid in ids.items():
    if tid is not None and tokenizer.id_to_token(int(tid)) is not None:
      out[key] = tokenizer.id_to_token(int(tid))
  return out


# ------------------------------------------------------------------------------------- BERT

def bert_hf_config(cfg: BertConfig, kind: str = "bert", pad_token_id: int = 0) -> dict:
  """The HF `config.json` dict of a BERT / DPR encoder."""
  if kind not in BERT_KINDS:
    raise ExportError(f"BERT export kind {kind!r}: expected one of {BERT_KINDS}")
  arch = {"bert": "BertModel", "dpr_question": "DPRQuestionEncoder",
          "dpr_context": "DPRContextEncoder"}[kind]
  return {"architectures": [arch], "model_type": "bert" if kind == "bert" else "dpr",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "num_hidden_layers": cfg.num_hidden_layers,
          "num_attention_heads": cfg.num_attention_heads,
          "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
          "max_position_embeddings": cfg.max_position_embeddings,
          "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
          "hidden_dropout_prob": cfg.dropout_rate, "attention_probs_dropout_prob": cfg.dropout_rate,
          "position_embedding_type": "absolute", "pad_token_id": int(pad_token_id),
          "projection_dim": cfg.projection_dim, "torch_dtype": "float32"}


def bert_tensors(cfg: BertConfig, params: dict, kind: str = "bert") -> dict[str, np.ndarray]:
  """HF tensors of a `BertEncoder` for `BertModel` (with an identity pooler, which ragjax's
  pooling does not use) or DPR's question / context encoder (`encode_proj` when projected)."""
  prefix, proj = {"bert": ("", ""), "dpr_question": ("question_encoder.bert_model.",
                                                     "question_encoder."),
                  "dpr_context": ("ctx_encoder.bert_model.", "ctx_encoder.")}[kind]
  if cfg.projection_dim and kind == "bert":
    raise ExportError("a BERT encoder with a DPR projection (projection_dim="
                      f"{cfg.projection_dim}) exports as dpr_question or dpr_context, not bert")
  out = export_tensors(params, _bert_name_map(cfg, prefix, proj),
                       what=f"BERT ({cfg.num_hidden_layers} layers) as {kind}")
  if kind == "bert":  # BertModel's pooler: identity, so nothing is left randomly initialised
    out["pooler.dense.weight"] = np.eye(cfg.hidden_size, dtype=np.float32)
    out["pooler.dense.bias"] = np.zeros(cfg.hidden_size, np.float32)
  return out


def write_bert_dir(out, cfg: BertConfig, params: dict, tokenizer, kind: str = "bert",
                   max_length: int = 512) -> pathlib.Path:
  """A HF encoder directory: `config.json`, `model.safetensors`, the tokenizer, and for
  `kind="bert"` the sentence-transformers modules (`modules.json`, `1_Pooling`, `2_Normalize`)
  so `SentenceTransformer(out)` embeds as ragjax does (`cfg.pooling`, `cfg.normalize`).

  `tokenizer` is a `ragjax.data.tokenize.WordPieceTokenizer`.
  Raises: ExportError (unmapped parameter, bad kind).
  """
  out = pathlib.Path(out)
  tok = tokenizer._tok
  config = bert_hf_config(cfg, kind, pad_token_id=tokenizer.pad_id)
  _write(out, bert_tensors(cfg, params, kind), config)
  specials = _special_names(tok, {"pad_token": tokenizer.pad_id,
                                  "cls_token": tok.token_to_id("[CLS]"),
                                  "sep_token": tok.token_to_id("[SEP]"),
                                  "unk_token": tok.token_to_id("[UNK]"),
                                  "mask_token": tok.token_to_id("[MASK]")})
  write_tokenizer(out, tok, specials=specials, max_length=max_length)
  if kind == "bert":
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": cfg.hidden_size,
        "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=1))
    if cfg.normalize:
      (out / "2_Normalize").mkdir(exist_ok=True)
      modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                      "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules, indent=1))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": int(max_length), "do_lower_case": False}))
  return out


# ---------------------------------------------------------------------------------- seq2seq

def seq2seq_hf_kind(cfg: Seq2SeqConfig) -> str:
  """"t5", "bart" or "bert2bert" (`EncoderDecoderModel` of BertGeneration): what `cfg` exports as.

  Raises: ExportError when no HF class computes what `cfg` does (e.g. BART positions from 0 with
  scaled embeddings, or BART's LayerNorm eps other than 1e-5, which HF BART hard-codes).
  """
  if cfg.arch == "t5":
    return "t5"
  if cfg.position_offset == 0:
    if cfg.scale_embedding or cfg.head_dim * cfg.num_heads != cfg.d_model:
      raise ExportError("a BART-layout generator with positions from 0 exports as BERT2BERT "
                        "(BertGeneration), which has no scaled embeddings or head_dim override")
    return "bert2bert"
  if cfg.position_offset != 2 or abs(cfg.layer_norm_eps - 1e-5) > 1e-12:
    raise ExportError(f"BART export: position_offset {cfg.position_offset} and layer_norm_eps "
                      f"{cfg.layer_norm_eps}; HF BART has offset 2 and eps 1e-5")
  return "bart"


def _bert2bert_name_map(cfg: Seq2SeqConfig) -> dict:
  """Flax path -> (HF name, kind) for `EncoderDecoderModel(BertGenerationEncoder, ...Decoder)`."""
  m = {("shared", "embedding"): ("encoder.embeddings.word_embeddings.weight", "same"),
       ("final_logits_bias",): ("decoder.lm_head.bias", "same"),
       ("lm_head", "kernel"): ("decoder.lm_head.decoder.weight", "lin1")}
  for stack, hf, n in (("encoder", "encoder.", cfg.encoder_layers),
                       ("decoder", "decoder.bert.", cfg.decoder_layers)):
    m[(stack, "embed_positions", "embedding")] = (f"{hf}embeddings.position_embeddings.weight",
                                                  "same")
    for leaf, theirs in (("scale", "weight"), ("bias", "bias")):
      m[(stack, "layernorm_embedding", leaf)] = (f"{hf}embeddings.LayerNorm.{theirs}", "same")
    for i in range(n):
      ours, layer = (stack, f"layer_{i}"), f"{hf}encoder.layer.{i}."
      subs = [("self_attn", "attention.")] + ([("cross_attn", "crossattention.")]
                                             if stack == "decoder" else [])
      for name, att in subs:
        for p in ("query", "key", "value"):
          m[ours + (name, p, "kernel")] = (f"{layer}{att}self.{p}.weight", "lin1")
          m[ours + (name, p, "bias")] = (f"{layer}{att}self.{p}.bias", "flat")
        m[ours + (name, "out", "kernel")] = (f"{layer}{att}output.dense.weight", "lin2")
        m[ours + (name, "out", "bias")] = (f"{layer}{att}output.dense.bias", "same")
        for leaf, theirs in (("scale", "weight"), ("bias", "bias")):
          m[ours + (f"{name}_norm", leaf)] = (f"{layer}{att}output.LayerNorm.{theirs}", "same")
      for p, theirs in (("wi", "intermediate"), ("wo", "output")):
        m[ours + ("mlp", p, "kernel")] = (f"{layer}{theirs}.dense.weight", "lin1")
        m[ours + ("mlp", p, "bias")] = (f"{layer}{theirs}.dense.bias", "same")
      for leaf, theirs in (("scale", "weight"), ("bias", "bias")):
        m[ours + ("mlp_norm", leaf)] = (f"{layer}output.LayerNorm.{theirs}", "same")
  return m


def _feed_forward_proj(cfg: Seq2SeqConfig) -> str:
  act = "gelu" if cfg.activation == "gelu_new" and cfg.gated_mlp else cfg.activation
  return f"gated-{act}" if cfg.gated_mlp else act


def seq2seq_hf_config(cfg: Seq2SeqConfig) -> dict:
  """The HF `config.json` dict of a generator (see `seq2seq_hf_kind`)."""
  kind = seq2seq_hf_kind(cfg)
  ids = {"pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
         "bos_token_id": cfg.bos_token_id, "decoder_start_token_id": cfg.decoder_start_token_id}
  if kind == "t5":
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            "is_encoder_decoder": True, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "d_kv": cfg.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.encoder_layers,
            "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance,
            "feed_forward_proj": _feed_forward_proj(cfg), "layer_norm_epsilon": cfg.layer_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "scale_decoder_outputs": bool(cfg.scale_decoder_outputs),
            "dropout_rate": cfg.dropout_rate, "initializer_factor": cfg.init_std, **ids}
  if kind == "bart":
    return {"architectures": ["BartForConditionalGeneration"], "model_type": "bart",
            "is_encoder_decoder": True, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
            "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
            "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
            "activation_function": cfg.activation,
            "max_position_embeddings": cfg.max_position_embeddings,
            "scale_embedding": cfg.scale_embedding, "tie_word_embeddings": cfg.tie_word_embeddings,
            "forced_bos_token_id": cfg.forced_bos_token_id,
            "forced_eos_token_id": cfg.forced_eos_token_id, "init_std": cfg.init_std,
            "dropout": cfg.dropout_rate, "attention_dropout": cfg.attention_dropout_rate,
            "activation_dropout": cfg.activation_dropout_rate, **ids}
  side = dict(model_type="bert-generation", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
              hidden_act=cfg.activation, max_position_embeddings=cfg.max_position_embeddings,
              layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.dropout_rate,
              attention_probs_dropout_prob=cfg.attention_dropout_rate,
              position_embedding_type="absolute", **ids)
  return {"architectures": ["EncoderDecoderModel"], "model_type": "encoder-decoder",
          "is_encoder_decoder": True, "tie_encoder_decoder": False,
          "tie_word_embeddings": cfg.tie_word_embeddings,
          "encoder": {**side, "num_hidden_layers": cfg.encoder_layers,
                      "architectures": ["BertGenerationEncoder"]},
          "decoder": {**side, "num_hidden_layers": cfg.decoder_layers, "is_decoder": True,
                      "add_cross_attention": True, "tie_word_embeddings": cfg.tie_word_embeddings,
                      "architectures": ["BertGenerationDecoder"]},
          "vocab_size": cfg.vocab_size, **ids}


def seq2seq_tensors(cfg: Seq2SeqConfig, params: dict) -> dict[str, np.ndarray]:
  """HF tensors of a `Seq2Seq` for the class `seq2seq_hf_kind(cfg)` names; tied copies of the
  word embeddings (and BERT2BERT's tied LM-head bias) are written out in full."""
  kind = seq2seq_hf_kind(cfg)
  names = (seq2seq_name_map(cfg, "model." if kind == "bart" else "") if kind != "bert2bert"
           else _bert2bert_name_map(cfg))
  out = export_tensors(params, names, what=f"{kind} generator")
  emb = out[names[("shared", "embedding")][0]]
  if kind == "bart":
    out["model.encoder.embed_tokens.weight"] = out["model.decoder.embed_tokens.weight"] = emb
  elif kind == "t5":
    out["encoder.embed_tokens.weight"] = out["decoder.embed_tokens.weight"] = emb
  else:
    out["decoder.bert.embeddings.word_embeddings.weight"] = emb
    out["decoder.lm_head.decoder.bias"] = out["decoder.lm_head.bias"]
  if cfg.tie_word_embeddings:  # the head is the embedding table
    out["decoder.lm_head.decoder.weight" if kind == "bert2bert" else "lm_head.weight"] = emb
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_seq2seq_dir(out, cfg: Seq2SeqConfig, params: dict, tokenizer=None,
                      max_length: int = 512) -> pathlib.Path:
  """A HF generator directory (`config.json`, `generation_config.json`, `model.safetensors`
  and, given the `tokenizers.Tokenizer`, the tokenizer).

  Raises: ExportError (no matching HF class, unmapped parameter).
  """
  out = pathlib.Path(out)
  config = seq2seq_hf_config(cfg)
  _write(out, seq2seq_tensors(cfg, params), config)
  gen = {k: v for k, v in {"decoder_start_token_id": cfg.decoder_start_token_id,
                           "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                           "pad_token_id": cfg.pad_token_id,
                           "forced_bos_token_id": cfg.forced_bos_token_id,
                           "forced_eos_token_id": cfg.forced_eos_token_id}.items()
         if v is not None}
  (out / "generation_config.json").write_text(json.dumps(gen, indent=1, sort_keys=True) + "\n")
  if tokenizer is not None:
    specials = _special_names(tokenizer, {"pad_token": cfg.pad_token_id,
                                          "eos_token": cfg.eos_token_id,
                                          "bos_token": cfg.bos_token_id})
    write_tokenizer(out, tokenizer, specials=specials, max_length=max_length)
  return out
