"""Encoder-decoder Transformers (BART, T5) as pure-functional Flax (linen) modules.

One module, `Seq2Seq(cfg)`, two architectures chosen by `cfg.arch`:

- `"bart"`: Lewis et al. 2020 (BART), the generator of Lewis et al. 2020 (RAG). Post-LayerNorm
  layers (Vaswani et al. 2017, sec. 3.1: x = LN(x + Sublayer(x))), learned absolute positions
  looked up at `position + position_offset` (fairseq's offset of 2), `layernorm_embedding` after
  the embedding sum, optional sqrt(d_model) embedding scale, a tied LM head plus
  `final_logits_bias`, scaled dot-product attention (Vaswani et al. eq. 1) with biases.
- `"t5"`: Raffel et al. 2020 (T5), the generator of Izacard & Grave 2021 (FiD) and Atlas.
  Pre-norm layers (x = x + Sublayer(RMSNorm(x)), Zhang & Sennrich 2019 RMSNorm without bias or
  mean subtraction), no biases, unscaled dot-product attention plus a learned relative position
  bias (Shaw et al. 2018; T5 sec. 2.1: log-spaced buckets) owned by the first layer of each stack
  and shared by all its layers, relu FFN (v1.0) or gated-gelu FFN (T5 v1.1, Shazeer 2020 GEGLU),
  a head tied to the embeddings and applied to d_model**-0.5 * h, or an untied `lm_head`.

Every parameter carries logical axis names (`ragjax.sharding`); activations are constrained to
`[batch, length, embed]`, FFN activations to `[batch, length, mlp]`, logits to
`[batch, length, vocab]`. Masks are additive float32 biases and softmax runs in float32.

Incremental decoding (`decode=True`) keeps keys/values in the flax `"cache"` collection, as in the
Flax examples and t5x: the first call (with no cache yet) creates a static-length cache from the
shape of its `[B, T_max]` decoder input and projects the encoder states to cross-attention
keys/values once; each later call feeds one token `[B, 1]` and may omit the encoder states.
`PER_SEQUENCE_CACHE` names the cache leaves that follow a hypothesis when beams are reordered.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ragjax import sharding as sh

Array = jax.Array
ARCHS = ("bart", "t5")
NEG_INF = float(jnp.finfo(jnp.float32).min)
# Cache leaves indexed by hypothesis (reordered by beam search); the others (cross-attention
# keys/values, encoder bias, step index, positions) are identical across the beams of an example.
PER_SEQUENCE_CACHE = ("cached_key", "cached_value")

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # HF "gelu": exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation (T5 v1.1)
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """Hyper-parameters of an encoder-decoder Transformer (BART or T5 architecture).

  `head_dim` defaults to d_model // num_heads (T5 sets it: `d_kv`). `scale_decoder_outputs`
  multiplies the decoder output by d_model**-0.5 before the head; by default it is on for a tied
  T5 head (HF `T5ForConditionalGeneration`) and off otherwise. `position_offset` is added to
  positions before the learned position lookup (2 for BART; 0 for a BERT warm start).
  `forced_bos_token_id` / `forced_eos_token_id` are the generation defaults from the checkpoint
  (HF `ForcedBOSTokenLogitsProcessor` / `ForcedEOSTokenLogitsProcessor`).

  Raises:
    ValueError: unknown `arch` or `activation`, or d_model not divisible by num_heads.
  """
  arch: str = "bart"
  vocab_size: int = 50265
  d_model: int = 768
  encoder_layers: int = 6
  decoder_layers: int = 6
  num_heads: int = 12
  head_dim: int | None = None
  d_ff: int = 3072
  activation: str = "gelu"
  gated_mlp: bool = False
  max_position_embeddings: int = 1024
  position_offset: int = 2
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int | None = 0
  eos_token_id: int = 2
  decoder_start_token_id: int = 2
  forced_bos_token_id: int | None = None
  forced_eos_token_id: int | None = None
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool | None = None
  scale_embedding: bool = False
  init_std: float = 0.02
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  activation_dropout_rate: float = 0.0
  dtype: Any = jnp.float32        # compute dtype (bfloat16 for speed on accelerators)
  param_dtype: Any = jnp.float32  # storage dtype of parameters

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"Seq2SeqConfig.arch: expected one of {ARCHS}, got {self.arch!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Seq2SeqConfig.activation: {self.activation!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"Seq2SeqConfig: d_model {self.d_model} is not divisible by num_heads "
                         f"{self.num_heads}")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs",
                         self.arch == "t5" and self.tie_word_embeddings)

  @property
  def use_bias(self) -> bool:
    return self.arch == "bart"


def _p(init, axes):
  return nn.with_logical_partitioning(init, axes)


def relative_position_buckets(q_len: int, k_len: int, bidirectional: bool, num_buckets: int,
                              max_distance: int, q_offset: int = 0) -> np.ndarray:
  """T5's relative position bucket of every (query, key) pair, `[q_len, k_len]` int32.

  Exact buckets for |distance| < max_exact, log-spaced buckets up to `max_distance` beyond
  (T5 sec. 2.1; Mesh TensorFlow `_relative_position_bucket`), computed in float32 and truncated
  exactly as HF does, on the host: the shapes are static, so this is a constant of the graph.
  """
  rel = np.arange(k_len)[None, :] - (np.arange(q_len)[:, None] + q_offset)
  buckets = np.zeros_like(rel)
  n = num_buckets
  if bidirectional:
    n //= 2
    buckets += (rel > 0).astype(rel.dtype) * n
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = n // 2
  ratio = np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact)
  large = max_exact + (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
                       * np.float32(n - max_exact)).astype(np.int64)
  buckets += np.where(rel < max_exact, rel, np.minimum(large, n - 1))
  return buckets.astype(np.int32)


class Dense(nn.Module):
  """`y = einsum(equation, x, kernel) (+ bias)` with an explicit-rank, logically named kernel.

  Like `ragjax.models.bert.Projection` (flax's DenseGeneral reshapes multi-axis kernels, which
  breaks logical constraints under a mesh), with an optional bias over the last `n_out` kernel
  axes and a per-layer init std.
  """
  equation: str
  kernel_shape: tuple
  kernel_axes: tuple
  n_out: int
  cfg: Seq2SeqConfig
  std: float
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kernel = self.param("kernel", _p(nn.initializers.normal(self.std), self.kernel_axes),
                        self.kernel_shape, cfg.param_dtype)
    y = jnp.einsum(self.equation, x.astype(cfg.dtype), kernel.astype(cfg.dtype))
    if self.use_bias:
      bias = self.param("bias", _p(nn.initializers.zeros, self.kernel_axes[-self.n_out:]),
                        self.kernel_shape[-self.n_out:], cfg.param_dtype)
      y = y + bias.astype(cfg.dtype)
    return y


class Norm(nn.Module):
  """LayerNorm (BART: (x - mean) / sqrt(var + eps) * scale + bias, Ba et al. 2016) or T5's
  RMSNorm (x / sqrt(mean(x^2) + eps) * scale). Statistics in float32; `[..., E]` -> cfg.dtype."""
  cfg: Seq2SeqConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    scale = self.param("scale", _p(nn.initializers.ones, (sh.EMBED,)), (cfg.d_model,),
                       cfg.param_dtype).astype(jnp.float32)
    x = x.astype(jnp.float32)
    if cfg.arch == "t5":
      var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
      return (scale * (x * jax.lax.rsqrt(var + cfg.layer_norm_eps))).astype(cfg.dtype)
    bias = self.param("bias", _p(nn.initializers.zeros, (sh.EMBED,)), (cfg.d_model,),
                      cfg.param_dtype).astype(jnp.float32)
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
    return (xc * jax.lax.rsqrt(var + cfg.layer_norm_eps) * scale + bias).astype(cfg.dtype)


def _stds(cfg: Seq2SeqConfig) -> dict:
  """Init stds: BART's `init_std` everywhere; T5's fan-in scaled init (HF `_init_weights`)."""
  if cfg.arch == "bart":
    return dict(q=cfg.init_std, kv=cfg.init_std, o=cfg.init_std, wi=cfg.init_std,
                wo=cfg.init_std, embed=cfg.init_std, rel=cfg.init_std)
  e, inner = cfg.d_model, cfg.num_heads * cfg.head_dim
  return dict(q=(e * cfg.head_dim) ** -0.5, kv=e ** -0.5, o=inner ** -0.5, wi=e ** -0.5,
              wo=cfg.d_ff ** -0.5, embed=1.0, rel=e ** -0.5)


class Attention(nn.Module):
  """Multi-head attention, softmax(q k^T * scale + bias) v (Vaswani et al. 2017, eq. 1).

  scale = head_dim**-0.5 for BART, 1 for T5 (whose init absorbs it). `bias` is additive
  (padding, causality and T5's relative position bias), broadcastable to `[B, H, Tq, Tk]`.
  Self-attention when `context` is None and `cross=False`; cross-attention over `context`
  `[B, S, E]` otherwise. With `decode=True` keys/values live in the "cache" collection.
  Cross-attention sows its float32 probabilities `cross_attention` `[B, H, Tq, S]` and the
  per-head value norms `value_norm` ||v_h|| `[B, H, S]` into "intermediates" (Atlas's ADist
  inputs) when that collection is mutable. Returns `[B, Tq, E]`.
  """
  cfg: Seq2SeqConfig
  cross: bool = False

  @nn.compact
  def __call__(self, x_bte, bias, context_bse=None, *, decode=False, cache_index=None,
               deterministic=True):
    cfg = self.cfg
    e, h, d = cfg.d_model, cfg.num_heads, cfg.head_dim
    stds = _stds(cfg)
    proj = lambda n, std: Dense("bte,ehd->bthd", (e, h, d), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), 2,
                                cfg, std, cfg.use_bias, name=n)
    q_bthd = proj("query", stds["q"])(x_bte)
    if self.cross:
      if decode and self.has_variable("cache", "cross_key"):
        k_bshd = self.get_variable("cache", "cross_key")
        v_bshd = self.get_variable("cache", "cross_value")
      else:
        k_bshd = proj("key", stds["kv"])(context_bse)
        v_bshd = proj("value", stds["kv"])(context_bse)
        if decode:  # computed once, when the cache is created
          self.put_variable("cache", "cross_key", k_bshd)
          self.put_variable("cache", "cross_value", v_bshd)
    else:
      k_bshd, v_bshd = proj("key", stds["kv"])(x_bte), proj("value", stds["kv"])(x_bte)
      if decode:
        ready = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k_bshd.shape, k_bshd.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v_bshd.shape, v_bshd.dtype)
        if ready:
          start = (0, cache_index, 0, 0)
          ck.value = jax.lax.dynamic_update_slice(ck.value, k_bshd.astype(ck.value.dtype), start)
          cv.value = jax.lax.dynamic_update_slice(cv.value, v_bshd.astype(cv.value.dtype), start)
          k_bshd, v_bshd = ck.value, cv.value
    # Heads-major contractions ([B, H, T, Dh]): XLA:CPU lowers `bhqk,bkhd->bqhd` to a GEMM
    # contracting both operands on their minor axis, ~3x slower (bench/RESULTS.md, notes).
    q_bhqd, k_bhkd, v_bhkd = (x.transpose(0, 2, 1, 3) for x in (q_bthd, k_bshd, v_bshd))
    logits_bhqk = jnp.einsum("bhqd,bhkd->bhqk", q_bhqd, k_bhkd)
    if cfg.arch == "bart":
      logits_bhqk = logits_bhqk * (d ** -0.5)
    logits_bhqk = logits_bhqk.astype(jnp.float32) + bias
    probs_bhqk = jax.nn.softmax(logits_bhqk, axis=-1)
    if self.cross:  # ADist reads these (apply with mutable=["intermediates"]; else a no-op)
      self.sow("intermediates", "cross_attention", probs_bhqk)               # [B, H, Tq, S]
      self.sow("intermediates", "value_norm", jnp.transpose(jnp.linalg.norm(
          v_bshd.astype(jnp.float32), axis=-1), (0, 2, 1)))                  # [B, H, S]
    probs_bhqk = probs_bhqk.astype(cfg.dtype)
    probs_bhqk = nn.Dropout(cfg.attention_dropout_rate)(probs_bhqk, deterministic=deterministic)
    ctx_bhqd = jnp.einsum("bhqk,bhkd->bhqd", probs_bhqk, v_bhkd)
    return Dense("bhtd,hde->bte", (h, d, e), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), 1, cfg, stds["o"],
                 cfg.use_bias, name="out")(ctx_bhqd)


class Mlp(nn.Module):
  """Position-wise FFN: wo(act(wi x)) (Vaswani et al. eq. 2), or wo(act(wi_0 x) * wi_1 x)
  (gated, T5 v1.1 / Shazeer 2020 GEGLU). `[B, T, E]` -> `[B, T, E]`."""
  cfg: Seq2SeqConfig

  @nn.compact
  def __call__(self, x_bte, deterministic=True):
    cfg = self.cfg
    stds = _stds(cfg)
    up = lambda n: Dense("bte,ef->btf", (cfg.d_model, cfg.d_ff), (sh.EMBED, sh.MLP), 1, cfg,
                         stds["wi"], cfg.use_bias, name=n)
    act = ACTIVATIONS[cfg.activation]
    if cfg.gated_mlp:
      h_btf = act(up("wi_0")(x_bte)) * up("wi_1")(x_bte)
    else:
      h_btf = act(up("wi")(x_bte))
    h_btf = nn.Dropout(cfg.activation_dropout_rate)(h_btf, deterministic=deterministic)
    h_btf = nn.with_logical_constraint(h_btf, (sh.BATCH, sh.LENGTH, sh.MLP))
    return Dense("btf,fe->bte", (cfg.d_ff, cfg.d_model), (sh.MLP, sh.EMBED), 1, cfg, stds["wo"],
                 cfg.use_bias, name="wo")(h_btf)


class Layer(nn.Module):
  """One Transformer layer: self-attention, cross-attention (decoder), FFN; each sublayer is
  post-LN for BART (x = LN(x + drop(f(x)))) and pre-LN for T5 (x = x + drop(f(LN(x))))."""
  cfg: Seq2SeqConfig
  is_decoder: bool

  @nn.compact
  def __call__(self, x_bte, self_bias, context_bse, cross_bias, *, decode, cache_index,
               deterministic):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)

    def sublayer(x, name, fn):
      norm = Norm(cfg, name=f"{name}_norm")
      if cfg.arch == "t5":
        return x + drop(fn(norm(x)))
      return norm(x + drop(fn(x)))

    x_bte = sublayer(x_bte, "self_attn", lambda y: Attention(cfg, name="self_attn")(
        y, self_bias, decode=decode, cache_index=cache_index, deterministic=deterministic))
    if self.is_decoder:
      x_bte = sublayer(x_bte, "cross_attn", lambda y: Attention(cfg, cross=True, name="cross_attn")(
          y, cross_bias, context_bse, decode=decode, deterministic=deterministic))
    x_bte = sublayer(x_bte, "mlp", lambda y: Mlp(cfg, name="mlp")(y, deterministic))
    return nn.with_logical_constraint(x_bte, (sh.BATCH, sh.LENGTH, sh.EMBED))


def _padding_bias(mask_bs):
  """`[B, S]` (1 = token) -> additive `[B, 1, 1, S]` float32 (0 or float32 min)."""
  return jnp.where(mask_bs[:, None, None, :] > 0, 0.0, NEG_INF).astype(jnp.float32)


class Stack(nn.Module):
  """Encoder or decoder stack over embedded tokens `[B, T, E]` -> hidden states `[B, T, E]`.

  BART: + learned positions (looked up at position + offset), layernorm_embedding, dropout,
  post-LN layers. T5: dropout, pre-LN layers with the stack's relative position bias, final
  RMSNorm, dropout. The decoder adds causal masking and cross-attention to `context_bse`.
  """
  cfg: Seq2SeqConfig
  is_decoder: bool

  @nn.compact
  def __call__(self, x_bte, mask_bt, context_bse=None, context_mask_bs=None, *, decode=False,
               deterministic=True):
    cfg = self.cfg
    length = x_bte.shape[1]
    incremental, cache_index, cross_bias = False, None, None
    if self.is_decoder:
      if decode:
        incremental = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        key_pos = self.variable("cache", "positions", lambda: jnp.arange(length, dtype=jnp.int32))
        enc_bias = self.variable("cache", "encoder_bias", lambda: _padding_bias(context_mask_bs))
        cross_bias = enc_bias.value
        if incremental:
          if length != 1:
            raise ValueError(f"decode=True feeds one token per call, got length {length}")
          cache_index = index.value
          index.value = cache_index + 1
      else:
        cross_bias = _padding_bias(context_mask_bs)
    # Positions of the queries `[T]` and the additive self-attention bias.
    if incremental:
      q_pos = cache_index[None]
      self_bias = jnp.where(key_pos.value <= cache_index, 0.0, NEG_INF)[None, None, None, :]
      k_len = key_pos.value.shape[0]
    else:
      q_pos = jnp.arange(length)
      self_bias = jnp.zeros((1, 1, 1, length), jnp.float32)
      if mask_bt is not None:
        self_bias = self_bias + _padding_bias(mask_bt)
      if self.is_decoder:
        causal = np.where(np.tril(np.ones((length, length), bool)), 0.0, NEG_INF)
        self_bias = self_bias + jnp.asarray(causal, jnp.float32)[None, None]
      k_len = length
    stds = _stds(cfg)
    if cfg.arch == "bart":
      table = nn.Embed(cfg.max_position_embeddings + cfg.position_offset, cfg.d_model,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       embedding_init=_p(nn.initializers.normal(stds["embed"]), (None, sh.EMBED)),
                       name="embed_positions")
      if not incremental and length > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
      x_bte = x_bte + table(q_pos + cfg.position_offset)[None]
      x_bte = Norm(cfg, name="layernorm_embedding")(x_bte)
    else:
      buckets = relative_position_buckets(k_len, k_len, not self.is_decoder,
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
      buckets_qk = (jnp.take(jnp.asarray(buckets), q_pos, axis=0) if incremental
                    else jnp.asarray(buckets))
      rel = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                     param_dtype=cfg.param_dtype,
                     embedding_init=_p(nn.initializers.normal(stds["rel"]), (None, sh.HEADS)),
                     name="relative_attention_bias")
      self_bias = self_bias + jnp.transpose(rel(buckets_qk), (2, 0, 1))[None]
    x_bte = nn.Dropout(cfg.dropout_rate)(x_bte, deterministic=deterministic)
    x_bte = nn.with_logical_constraint(x_bte.astype(cfg.dtype), (sh.BATCH, sh.LENGTH, sh.EMBED))
    n_layers = cfg.decoder_layers if self.is_decoder else cfg.encoder_layers
    for i in range(n_layers):
      x_bte = Layer(cfg, self.is_decoder, name=f"layer_{i}")(
          x_bte, self_bias, context_bse, cross_bias, decode=decode, cache_index=cache_index,
          deterministic=deterministic)
    if cfg.arch == "t5":
      x_bte = Norm(cfg, name="final_layer_norm")(x_bte)
      x_bte = nn.Dropout(cfg.dropout_rate)(x_bte, deterministic=deterministic)
    return nn.with_logical_constraint(x_bte, (sh.BATCH, sh.LENGTH, sh.EMBED))


class Seq2Seq(nn.Module):
  """Encoder-decoder Transformer with an LM head (BART or T5 by `cfg.arch`).

  Parameters: `shared` (token embeddings, used by both stacks and by a tied head), `encoder`,
  `decoder`, and `final_logits_bias` (BART) or `lm_head` (untied head).
  """
  cfg: Seq2SeqConfig

  def setup(self):
    cfg = self.cfg
    self.shared = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=_p(nn.initializers.normal(_stds(cfg)["embed"]), (sh.VOCAB, sh.EMBED)))
    self.encoder = Stack(self.cfg, is_decoder=False)
    self.decoder = Stack(self.cfg, is_decoder=True)
    if cfg.arch == "bart":
      self.final_logits_bias = self.param("final_logits_bias", _p(nn.initializers.zeros,
                                                                  (sh.VOCAB,)),
                                          (cfg.vocab_size,), cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense("bte,ev->btv", (cfg.d_model, cfg.vocab_size), (sh.EMBED, sh.VOCAB), 1,
                           cfg, 1.0 if cfg.arch == "t5" else cfg.init_std, use_bias=False)

  def _embed(self, ids_bt):
    x_bte = self.shared(nn.with_logical_constraint(ids_bt, (sh.BATCH, sh.LENGTH)))
    if self.cfg.scale_embedding:
      x_bte = x_bte * math.sqrt(self.cfg.d_model)
    return x_bte

  def encode(self, input_ids_bs, attention_mask_bs, *, deterministic: bool = True):
    """Encoder hidden states `[B, S, E]` (cfg.dtype) of token ids `[B, S]` int32 with
    `attention_mask_bs` `[B, S]` (1 = token, 0 = padding)."""
    return self.encoder(self._embed(input_ids_bs), attention_mask_bs, deterministic=deterministic)

  def decode(self, decoder_input_ids_bt, encoded_bse, encoder_mask_bs, decoder_mask_bt=None, *,
             decode: bool = False, deterministic: bool = True):
    """Next-token logits `[B, T, V]` float32 of decoder inputs `[B, T]` (teacher forcing: the
    targets shifted right behind `decoder_start_token_id`), attending causally to themselves
    (and to `decoder_mask_bt` `[B, T]` if given) and to the encoder states `[B, S, E]` where
    `encoder_mask_bs` is 1.

    `decode=True` (apply with `mutable=["cache"]`): the first call, with no cache yet, creates
    it with capacity T and stores the cross-attention keys/values of `encoded_bse` and the
    encoder mask (both required then); each later call takes one token `[B, 1]` at the next
    position and uses the cached encoder keys/values and mask (pass None for them;
    `decoder_mask_bt` is ignored: a hypothesis attends to all of its earlier positions).

    Raises:
      ValueError: an incremental call with more than one token, or T beyond BART's positions.
    """
    h_bte = self.decoder(self._embed(decoder_input_ids_bt), decoder_mask_bt, encoded_bse,
                         encoder_mask_bs, decode=decode, deterministic=deterministic)
    cfg = self.cfg
    if cfg.scale_decoder_outputs:
      h_bte = h_bte * (cfg.d_model ** -0.5)
    if cfg.tie_word_embeddings:
      logits_btv = self.shared.attend(h_bte)
    else:
      logits_btv = self.lm_head(h_bte)
    logits_btv = logits_btv.astype(jnp.float32)
    if cfg.arch == "bart":
      logits_btv = logits_btv + self.final_logits_bias.astype(jnp.float32)
    return nn.with_logical_constraint(logits_btv, (sh.BATCH, sh.LENGTH, sh.VOCAB))

  def __call__(self, input_ids_bs, attention_mask_bs, decoder_input_ids_bt, decoder_mask_bt=None,
               *, deterministic: bool = True):
    """Teacher-forced logits `[B, T, V]` float32: `decode(.., encode(..), ..)`."""
    encoded_bse = self.encode(input_ids_bs, attention_mask_bs, deterministic=deterministic)
    return self.decode(decoder_input_ids_bt, encoded_bse, attention_mask_bs, decoder_mask_bt,
                       deterministic=deterministic)


def shift_right(labels_bt, cfg: Seq2SeqConfig):
  """Decoder inputs from targets `[B, T]`: decoder_start_token_id, then labels[:, :-1], with
  -100 (ignored labels) replaced by pad (HF `shift_tokens_right`)."""
  start = jnp.full((labels_bt.shape[0], 1), cfg.decoder_start_token_id, labels_bt.dtype)
  shifted = jnp.concatenate([start, labels_bt[:, :-1]], axis=1)
  return jnp.where(shifted == -100, cfg.pad_token_id, shifted)
