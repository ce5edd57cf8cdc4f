"""BERT-family encoder and the DPR-style bi-encoder, as pure-functional Flax (linen) modules.

Architecture: Devlin et al. 2019 (BERT), post-LayerNorm Transformer encoder with learned absolute
position embeddings; the bi-encoder and its inner-product relevance are Karpukhin et al. 2020
(DPR), eq. (1): sim(q, p) = E_Q(q)^T E_P(p).

Every parameter carries logical axis names (see `ragjax.sharding`), and the main activations are
constrained to `[batch, length, embed]`, so one `axis_rules` table in the config shards the model.
Parameter names follow HuggingFace's `BertModel` closely so import is a rename, not a rewrite.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ragjax import sharding as sh

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (names as in HuggingFace `BertConfig`).

  `pooling` is `"cls"` (DPR: the [CLS] hidden state) or `"mean"` (sentence-transformers: the
  attention-masked mean of the last hidden states); `normalize` L2-normalises the pooled vector
  (all-MiniLM-L6-v2 does); `projection_dim > 0` adds DPR's optional `encode_proj` linear layer.
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pooling: str = "mean"
  normalize: bool = False
  projection_dim: int = 0
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32        # compute dtype (bfloat16 for speed on accelerators)
  param_dtype: Any = jnp.float32  # storage dtype of parameters

  def __post_init__(self):
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"BertConfig.pooling: expected 'cls' or 'mean', got {self.pooling!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def output_dim(self) -> int:
    return self.projection_dim or self.hidden_size


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _dense_init(std=0.02):
  return nn.initializers.normal(stddev=std)


def _param(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      scale_init=_param(nn.initializers.ones, (sh.EMBED,)),
      bias_init=_param(nn.initializers.zeros, (sh.EMBED,)), name=name)


class Projection(nn.Module):
  """`y = einsum(x, kernel) + bias` with an explicitly shaped, logically annotated kernel.

  (flax's `DenseGeneral` initialises multi-axis kernels flat and reshapes them, which breaks
  logical sharding constraints under a mesh; this keeps the kernel's rank throughout.)
  `equation` contracts `x` with a kernel of shape `kernel_shape` (logical axes `kernel_axes`).
  """
  equation: str
  kernel_shape: tuple
  kernel_axes: tuple
  bias_axes: tuple
  cfg: BertConfig

  @nn.compact
  def __call__(self, x):
    nb = len(self.bias_axes)
    kernel = self.param("kernel", _param(_dense_init(), self.kernel_axes), self.kernel_shape,
                        self.cfg.param_dtype)
    bias = self.param("bias", _param(nn.initializers.zeros, self.bias_axes),
                      self.kernel_shape[-nb:], self.cfg.param_dtype)
    y = jnp.einsum(self.equation, x.astype(self.cfg.dtype), kernel.astype(self.cfg.dtype))
    return y + bias.astype(self.cfg.dtype)


class BertEmbeddings(nn.Module):
  """Token + absolute position + token type embeddings, LayerNorm, dropout.

  Returns: `[B, L, E]` in `cfg.dtype`.
  """
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_bl, token_type_ids_bl, deterministic: bool):
    cfg = self.cfg
    embed = lambda n, rows, axes: nn.Embed(
        rows, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=_param(_dense_init(), axes), name=n)
    length = input_ids_bl.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    x_ble = embed("word_embeddings", cfg.vocab_size, (sh.VOCAB, sh.EMBED))(input_ids_bl)
    x_ble += embed("position_embeddings", cfg.max_position_embeddings,
                   (None, sh.EMBED))(jnp.arange(length)[None, :])
    x_ble += embed("token_type_embeddings", cfg.type_vocab_size,
                   (None, sh.EMBED))(token_type_ids_bl)
    x_ble = _layer_norm(cfg, "LayerNorm")(x_ble)
    x_ble = nn.Dropout(cfg.dropout_rate)(x_ble, deterministic=deterministic)
    return nn.with_logical_constraint(x_ble, (sh.BATCH, sh.LENGTH, sh.EMBED))


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention (Vaswani et al. 2017, eq. 1).

  `bias_bl` is an additive mask `[B, L]` (0 for tokens, a large negative number for padding).
  """
  cfg: BertConfig

  @nn.compact
  def __call__(self, x_ble, bias_bl, deterministic: bool):
    cfg = self.cfg
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    proj = lambda n: Projection("ble,ehd->blhd", (cfg.hidden_size, heads, head_dim),
                                (sh.EMBED, sh.HEADS, sh.HEAD_DIM), (sh.HEADS, sh.HEAD_DIM), cfg,
                                name=n)
    # Heads-major [B, H, L, Dh] for the two attention matmuls: on XLA:CPU this layout runs the
    # encoder 1.6x faster than contracting in [B, L, H, Dh] (bench/RESULTS.md, embed_throughput).
    q_bhld, k_bhld, v_bhld = (proj(n)(x_ble).transpose(0, 2, 1, 3)
                              for n in ("query", "key", "value"))
    logits_bhqk = jnp.einsum("bhqd,bhkd->bhqk", q_bhld, k_bhld) / jnp.sqrt(
        jnp.asarray(cfg.head_dim, cfg.dtype))
    logits_bhqk = logits_bhqk + bias_bl[:, None, None, :].astype(logits_bhqk.dtype)
    probs_bhqk = jax.nn.softmax(logits_bhqk.astype(jnp.float32), axis=-1).astype(cfg.dtype)
    probs_bhqk = nn.Dropout(cfg.dropout_rate)(probs_bhqk, deterministic=deterministic)
    ctx_blhd = jnp.einsum("bhqk,bhkd->bhqd", probs_bhqk, v_bhld).transpose(0, 2, 1, 3)
    return Projection("blhd,hde->ble", (heads, head_dim, cfg.hidden_size),
                      (sh.HEADS, sh.HEAD_DIM, sh.EMBED), (sh.EMBED,), cfg,
                      name="output")(ctx_blhd)


class BertLayer(nn.Module):
  """One post-LN Transformer encoder layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x_ble, bias_bl, deterministic: bool):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    attn_ble = BertSelfAttention(cfg, name="attention")(x_ble, bias_bl, deterministic)
    x_ble = _layer_norm(cfg, "attention_norm")(x_ble + drop(attn_ble))
    x_ble = nn.with_logical_constraint(x_ble, (sh.BATCH, sh.LENGTH, sh.EMBED))
    h_blm = nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     kernel_init=_param(_dense_init(), (sh.EMBED, sh.MLP)),
                     bias_init=_param(nn.initializers.zeros, (sh.MLP,)),
                     name="intermediate")(x_ble)
    h_blm = nn.with_logical_constraint(_ACTIVATIONS[cfg.hidden_act](h_blm),
                                       (sh.BATCH, sh.LENGTH, sh.MLP))
    out_ble = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       kernel_init=_param(_dense_init(), (sh.MLP, sh.EMBED)),
                       bias_init=_param(nn.initializers.zeros, (sh.EMBED,)),
                       name="output")(h_blm)
    x_ble = _layer_norm(cfg, "output_norm")(x_ble + drop(out_ble))
    return nn.with_logical_constraint(x_ble, (sh.BATCH, sh.LENGTH, sh.EMBED))


def mean_pool(hidden_ble: Array, mask_bl: Array) -> Array:
  """Attention-masked mean over positions, `[B, L, E] -> [B, E]` (sentence-transformers' pooling:
  sum(h * m) / max(sum(m), 1e-9)); computed in float32."""
  m_bl1 = mask_bl[..., None].astype(jnp.float32)
  total_be = jnp.sum(hidden_ble.astype(jnp.float32) * m_bl1, axis=1)
  return total_be / jnp.maximum(jnp.sum(m_bl1, axis=1), 1e-9)


def l2_normalize(x_bd: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) along the last axis (torch.nn.functional.normalize)."""
  return x_bd / jnp.maximum(jnp.linalg.norm(x_bd, axis=-1, keepdims=True), eps)


class BertEncoder(nn.Module):
  """Text -> one vector: BERT, then pooling, optional projection and L2 normalisation.

  Call with `input_ids_bl` `[B, L]` int32, `attention_mask_bl` `[B, L]` (1 = token, 0 = padding)
  and optional `token_type_ids_bl` `[B, L]`; returns `[B, D]` float32 with D = `cfg.output_dim`.
  `return_hidden=True` also returns the last hidden states `[B, L, E]`.
  """
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids_bl, attention_mask_bl, token_type_ids_bl=None, *,
               deterministic: bool = True, return_hidden: bool = False):
    cfg = self.cfg
    if token_type_ids_bl is None:
      token_type_ids_bl = jnp.zeros_like(input_ids_bl)
    input_ids_bl = nn.with_logical_constraint(input_ids_bl, (sh.BATCH, sh.LENGTH))
    bias_bl = jnp.where(attention_mask_bl > 0, 0.0, jnp.finfo(jnp.float32).min)
    x_ble = BertEmbeddings(cfg, name="embeddings")(input_ids_bl, token_type_ids_bl, deterministic)
    for i in range(cfg.num_hidden_layers):
      x_ble = BertLayer(cfg, name=f"layer_{i}")(x_ble, bias_bl, deterministic)
    if cfg.pooling == "cls":
      pooled_be = x_ble[:, 0, :].astype(jnp.float32)
    else:
      pooled_be = mean_pool(x_ble, attention_mask_bl)
    if cfg.projection_dim:
      pooled_be = nn.Dense(cfg.projection_dim, dtype=jnp.float32, param_dtype=cfg.param_dtype,
                           kernel_init=_param(_dense_init(), (sh.EMBED, None)),
                           bias_init=_param(nn.initializers.zeros, (None,)),
                           name="encode_proj")(pooled_be)
    if cfg.normalize:
      pooled_be = l2_normalize(pooled_be)
    pooled_bd = nn.with_logical_constraint(pooled_be, (sh.BATCH, None))
    return (pooled_bd, x_ble) if return_hidden else pooled_bd


class BiEncoder(nn.Module):
  """DPR bi-encoder: a query encoder E_Q and a passage encoder E_P (shared or separate towers).

  Parameters live under `query_encoder` and `passage_encoder`, or under `query_encoder` alone
  when `shared=True`. Relevance is the inner product (DPR eq. 1).
  """
  query_cfg: BertConfig
  passage_cfg: BertConfig | None = None
  shared: bool = False

  def setup(self):
    self.query_encoder = BertEncoder(self.query_cfg)
    if self.shared:
      self.passage_encoder = self.query_encoder
    else:
      self.passage_encoder = BertEncoder(self.passage_cfg or self.query_cfg)

  def encode_query(self, input_ids_bl, attention_mask_bl, token_type_ids_bl=None, *,
                   deterministic: bool = True):
    """Query vectors `[B, D]` float32."""
    return self.query_encoder(input_ids_bl, attention_mask_bl, token_type_ids_bl,
                              deterministic=deterministic)

  def encode_passage(self, input_ids_bl, attention_mask_bl, token_type_ids_bl=None, *,
                     deterministic: bool = True):
    """Passage vectors `[B, D]` float32."""
    return self.passage_encoder(input_ids_bl, attention_mask_bl, token_type_ids_bl,
                                deterministic=deterministic)

  def __call__(self, query, passage, *, deterministic: bool = True):
    """In-batch relevance scores `[Bq, Bp]` = E_Q(q) E_P(p)^T (DPR eq. 1).

    `query` and `passage` are `(input_ids, attention_mask)` tuples of `[B, L]` arrays.
    """
    q_bd = self.encode_query(*query, deterministic=deterministic)
    p_nd = self.encode_passage(*passage, deterministic=deterministic)
    return jnp.einsum("bd,nd->bn", q_bd, p_nd)
