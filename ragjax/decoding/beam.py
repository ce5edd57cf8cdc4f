"""Jitted, static-shape, batched greedy and beam search for the `Seq2Seq` generator.

Both follow HuggingFace `generate` (transformers 5) token for token: decoding starts from
`decoder_start_token_id`; `forced_bos_token_id` is forced as the first generated token and
`forced_eos_token_id` as the last one (at max length); a hypothesis ends at EOS and is padded
with `pad_token_id` after it. Beam search is HF's vectorised beam search (`_beam_search`): the
top 2 * num_beams continuations of all beams, the best num_beams unfinished ones continue, the
finished ones (EOS, or max length) compete for num_beams final slots by the length-penalised
score sum(log p) / generated_length**length_penalty (generated length counts EOS, not the start
token), with HF's `early_stopping` (True / False heuristic / "never"). Loops are
`lax.while_loop`s that stop when HF would; outputs have the static length 1 + max_new_tokens.

The searches are written over a step callback, `step_logprobs_fn(tokens_n, cache, step) ->
(logprobs_nv, cache)` with N = batch * beams, so that a RAG-Token decoder can pass its marginal
log-probabilities (Lewis et al. 2020, RAG eq. 2) through the same beam search.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ragjax.models.seq2seq import PER_SEQUENCE_CACHE, Seq2Seq, Seq2SeqConfig

Array = jax.Array
StepFn = Callable[[Array, Any, Array], tuple[Array, Any]]
_NEG = -1.0e9  # HF's "very large negative" for disabled beams (not -inf: it must stay finite)
FROM_CONFIG = "config"


class BeamSearchOutput(NamedTuple):
  """`sequences` `[B, L]` (best hypothesis, starting with the decoder start token) and its
  `scores` `[B]`; `beam_sequences` `[B, num_beams, L]` / `beam_scores` `[B, num_beams]` hold all
  finished hypotheses, best first. L = 1 + max_new_tokens; scores are length-penalised."""
  sequences: Array
  scores: Array
  beam_sequences: Array
  beam_scores: Array


def reorder_cache(cache, flat_indices_n: Array):
  """Gather the per-hypothesis cache leaves (`PER_SEQUENCE_CACHE`) along axis 0; the others
  (cross-attention keys/values, encoder bias, step index) are the same for every beam of an
  example and are left alone."""
  def gather(path, leaf):
    name = getattr(path[-1], "key", None)
    return jnp.take(leaf, flat_indices_n, axis=0) if name in PER_SEQUENCE_CACHE else leaf
  return jax.tree_util.tree_map_with_path(gather, cache)


def _force(logprobs_nv: Array, token: int | None, when: Array) -> Array:
  """HF `ForcedBOS/EOSTokenLogitsProcessor`: -inf everywhere but `token` (0) when `when`."""
  if token is None:
    return logprobs_nv
  forced = jnp.full_like(logprobs_nv, -jnp.inf).at[:, token].set(0.0)
  return jnp.where(when, forced, logprobs_nv)


def greedy_search_loop(step_logprobs_fn: StepFn, cache, batch_size: int, max_new_tokens: int, *,
                       decoder_start_token_id: int, eos_token_id: int, pad_token_id: int,
                       forced_bos_token_id: int | None = None,
                       forced_eos_token_id: int | None = None) -> Array:
  """Greedy decoding over a step callback; returns tokens `[B, 1 + max_new_tokens]` int32
  (start token, argmax tokens, pad after EOS). Trace it inside `jax.jit`."""
  length = 1 + max_new_tokens
  seq_bl = jnp.full((batch_size, length), pad_token_id, jnp.int32)
  seq_bl = seq_bl.at[:, 0].set(decoder_start_token_id)
  done_b = jnp.zeros((batch_size,), bool)

  def cond(state):
    t, _, done_b, _ = state
    return (t < max_new_tokens) & ~jnp.all(done_b)

  def body(state):
    t, seq_bl, done_b, cache = state
    logprobs_bv, cache = step_logprobs_fn(seq_bl[:, t], cache, t)
    logprobs_bv = _force(logprobs_bv, forced_bos_token_id, t == 0)
    logprobs_bv = _force(logprobs_bv, forced_eos_token_id, t == max_new_tokens - 1)
    next_b = jnp.argmax(logprobs_bv, axis=-1).astype(jnp.int32)
    next_b = jnp.where(done_b, pad_token_id, next_b)
    seq_bl = jax.lax.dynamic_update_slice(seq_bl, next_b[:, None], (0, t + 1))
    return t + 1, seq_bl, done_b | (next_b == eos_token_id), cache

  _, seq_bl, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), seq_bl, done_b, cache))
  return seq_bl


def beam_search_loop(step_logprobs_fn: StepFn, cache, batch_size: int, num_beams: int,
                     max_new_tokens: int, *, decoder_start_token_id: int, eos_token_id: int,
                     pad_token_id: int, length_penalty: float = 1.0,
                     early_stopping: bool | str = False, forced_bos_token_id: int | None = None,
                     forced_eos_token_id: int | None = None,
                     reorder_cache_fn: Callable = reorder_cache) -> BeamSearchOutput:
  """HF's vectorised beam search over a step callback (trace it inside `jax.jit`).

  `cache` holds N = batch_size * num_beams hypotheses, beams of one example adjacent;
  `step_logprobs_fn(tokens_n, cache, step)` returns next-token log-probabilities `[N, V]`
  float32 for the last tokens `[N]` int32 at 0-based decoder position `step`; after each step
  `reorder_cache_fn(cache, flat_indices_n)` makes hypothesis n continue from hypothesis
  `flat_indices_n[n]`.
  """
  b, k, length = batch_size, num_beams, 1 + max_new_tokens
  keep = 2 * k                      # HF: max(2, 1 + number of EOS ids) * num_beams
  top_k_mask = jnp.arange(keep) < k  # only the best num_beams may be finalised
  # length**length_penalty for generated lengths 1..max_new_tokens, in double on the host and
  # rounded once to float32, as HF's Python `int ** float` is.
  penalty = jnp.asarray(np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty,
                        jnp.float32)

  running_seq = jnp.full((b, k, length), pad_token_id, jnp.int32)
  running_seq = running_seq.at[:, :, 0].set(decoder_start_token_id)
  running_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG)
  state = dict(t=jnp.int32(0), running_seq=running_seq, running_scores=running_scores,
               seq=running_seq, scores=jnp.full((b, k), _NEG, jnp.float32),
               finished=jnp.zeros((b, k), bool), improvable=jnp.ones((b, 1), bool),
               all_hit=jnp.zeros((), bool), cache=cache)

  def cond(s):
    exists_open = ~(jnp.all(s["finished"]) & (early_stopping is True))
    return (s["t"] < max_new_tokens) & jnp.any(s["improvable"]) & exists_open & ~s["all_hit"]

  def body(s):
    t = s["t"]
    tokens_n = s["running_seq"][:, :, t].reshape(b * k)
    logprobs_nv, cache = step_logprobs_fn(tokens_n, s["cache"], t)
    logprobs_nv = _force(logprobs_nv.astype(jnp.float32), forced_bos_token_id, t == 0)
    logprobs_nv = _force(logprobs_nv, forced_eos_token_id, t == max_new_tokens - 1)
    vocab = logprobs_nv.shape[-1]
    acc_bx = (logprobs_nv.reshape(b, k, vocab) + s["running_scores"][:, :, None]).reshape(b, -1)
    # c. top 2k continuations over all beams x vocabulary.
    top_lp, top_idx = jax.lax.top_k(acc_bx, keep)
    top_beam, top_tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seq = jnp.take_along_axis(s["running_seq"], top_beam[:, :, None], axis=1)
    top_seq = top_seq.at[:, :, t + 1].set(top_tok)
    # d. which continuations stop (EOS or max length).
    hit = (top_tok == eos_token_id) | (t + 1 >= max_new_tokens)
    # e. the best k unfinished continue.
    run_lp = top_lp + hit.astype(jnp.float32) * _NEG
    _, next_idx = jax.lax.top_k(run_lp, k)
    running_seq = jnp.take_along_axis(top_seq, next_idx[:, :, None], axis=1)
    running_scores = jnp.take_along_axis(run_lp, next_idx, axis=1)
    src_beam = jnp.take_along_axis(top_beam, next_idx, axis=1)
    # f. finished continuations among the top k compete for the k final slots.
    just_done = hit & top_k_mask[None, :]
    fin_lp = top_lp / penalty[t]
    full = jnp.all(s["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    fin_lp = fin_lp + full.astype(jnp.float32) * _NEG
    fin_lp = fin_lp + (~s["improvable"]).astype(jnp.float32) * _NEG
    fin_lp = fin_lp + (~just_done).astype(jnp.float32) * _NEG
    merged_seq = jnp.concatenate([s["seq"], top_seq], axis=1)
    merged_scores = jnp.concatenate([s["scores"], fin_lp], axis=1)
    merged_fin = jnp.concatenate([s["finished"], just_done], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    seq = jnp.take_along_axis(merged_seq, best[:, :, None], axis=1)
    scores = jnp.take_along_axis(merged_scores, best, axis=1)
    finished = jnp.take_along_axis(merged_fin, best, axis=1)
    # g. reorder the cache; can a running beam still beat the worst finished one?
    flat_src_n = (src_beam + jnp.arange(b)[:, None] * k).reshape(b * k)
    cache = reorder_cache_fn(cache, flat_src_n)
    never = early_stopping == "never" and length_penalty > 0.0
    best_running = running_scores[:, :1] / penalty[max_new_tokens - 1 if never else t]
    worst_done = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
    improvable = s["improvable"] & jnp.any(best_running > worst_done, axis=-1, keepdims=True)
    return dict(t=t + 1, running_seq=running_seq, running_scores=running_scores, seq=seq,
                scores=scores, finished=finished, improvable=improvable, all_hit=jnp.all(hit),
                cache=cache)

  s = jax.lax.while_loop(cond, body, state)
  return BeamSearchOutput(s["seq"][:, 0], s["scores"][:, 0], s["seq"], s["scores"])


def init_decode_cache(model: Seq2Seq, params, encoded_nse: Array, encoder_mask_ns: Array,
                      max_length: int):
  """The "cache" collection for `max_length` decoder positions: empty self-attention caches
  and the cross-attention keys/values of `encoded_nse` (computed once). Under `jit` the
  creating forward pass is dead code except for those projections."""
  n = encoded_nse.shape[0]
  _, variables = model.apply({"params": params}, jnp.zeros((n, max_length), jnp.int32),
                             encoded_nse, encoder_mask_ns, decode=True, method=Seq2Seq.decode,
                             mutable=["cache"])
  return variables["cache"]


def seq2seq_step_fn(model: Seq2Seq, params) -> StepFn:
  """The step callback of a `Seq2Seq` generator: log_softmax of the next-token logits."""
  def step(tokens_n, cache, step):
    del step  # the cache counts positions itself
    logits, variables = model.apply({"params": params, "cache": cache}, tokens_n[:, None], None,
                                    None, decode=True, method=Seq2Seq.decode, mutable=["cache"])
    return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1), variables["cache"]
  return step


def check_generation(cfg: Seq2SeqConfig, max_new_tokens: int, num_beams: int = 1) -> None:
  """The one bound on a decode: `num_beams`, `max_new_tokens` >= 1, and for BART's learned
  positions `max_new_tokens <= max_position_embeddings` (the decoder reads positions 0 ..
  max_new_tokens - 1: the start token, then every generated token but the last; T5's relative
  positions have no bound).

  Raises: ValueError saying which bound is broken.
  """
  if num_beams < 1 or max_new_tokens < 1:
    raise ValueError(f"num_beams ({num_beams}) and max_new_tokens ({max_new_tokens}) must be >= 1")
  if cfg.arch == "bart" and max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"max_new_tokens {max_new_tokens} exceeds max_position_embeddings "
                     f"{cfg.max_position_embeddings}")


def resolve(value, default):
  """`default` (the generator config's value) when `value` is the `FROM_CONFIG` marker."""
  return default if isinstance(value, str) and value == FROM_CONFIG else value


def encode_inputs(model: Seq2Seq, params, input_ids, attention_mask):
  """Encoder states and mask of the generator's input: `[B, S]` -> `([B, S, E], [B, S])`, or
  Fusion-in-Decoder contexts `[B, K, L]` (Izacard & Grave 2021, §3): each of the B*K contexts
  encoded apart, then concatenated per example -> `([B, K*L, E], [B, K*L])`, so the decoder
  cross-attends over all K passages at once."""
  if input_ids.ndim == 2:
    return model.apply({"params": params}, input_ids, attention_mask,
                       method=Seq2Seq.encode), attention_mask
  b, k, length = input_ids.shape
  enc = model.apply({"params": params}, input_ids.reshape(b * k, length),
                    attention_mask.reshape(b * k, length), method=Seq2Seq.encode)
  return enc.reshape(b, k * length, -1), attention_mask.reshape(b, k * length)


@functools.lru_cache(maxsize=64)
def _greedy_fn(cfg: Seq2SeqConfig, max_new_tokens: int, forced_bos, forced_eos):
  model = Seq2Seq(cfg)

  def run(params, input_ids_bs, attention_mask_bs):
    encoded, attention_mask_bs = encode_inputs(model, params, input_ids_bs, attention_mask_bs)
    cache = init_decode_cache(model, params, encoded, attention_mask_bs, max_new_tokens)
    return greedy_search_loop(
        seq2seq_step_fn(model, params), cache, input_ids_bs.shape[0], max_new_tokens,
        decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, forced_bos_token_id=forced_bos,
        forced_eos_token_id=forced_eos)
  return jax.jit(run)


def greedy_search(model: Seq2Seq, params, input_ids, attention_mask, max_new_tokens: int, *,
                  forced_bos_token_id: int | None | str = FROM_CONFIG,
                  forced_eos_token_id: int | None | str = FROM_CONFIG) -> Array:
  """Greedy decoding (HF `generate(do_sample=False, num_beams=1)`).

  Args: `input_ids` / `attention_mask` `[B, S]`, or FiD contexts `[B, K, L]` (`encode_inputs`);
  forced token ids default to the model config's (None turns them off). Returns `[B, 1 + max_new_tokens]` int32: the decoder start token, then
  the generated tokens, `pad_token_id` after EOS. One compilation per (config, length, shapes).

  Raises:
    ValueError: max_new_tokens < 1, or beyond BART's position table.
  """
  cfg = model.cfg
  check_generation(cfg, max_new_tokens)
  fn = _greedy_fn(cfg, max_new_tokens, resolve(forced_bos_token_id, cfg.forced_bos_token_id),
                  resolve(forced_eos_token_id, cfg.forced_eos_token_id))
  return fn(params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))


@functools.lru_cache(maxsize=64)
def _beam_fn(cfg: Seq2SeqConfig, num_beams: int, max_new_tokens: int, length_penalty: float,
             early_stopping, forced_bos, forced_eos):
  model = Seq2Seq(cfg)

  def run(params, input_ids_bs, attention_mask_bs):
    encoded, attention_mask_bs = encode_inputs(model, params, input_ids_bs, attention_mask_bs)
    # Beams of one example adjacent (HF `_expand_inputs_for_generation`).
    encoded_nse = jnp.repeat(encoded, num_beams, axis=0)
    mask_ns = jnp.repeat(attention_mask_bs, num_beams, axis=0)
    cache = init_decode_cache(model, params, encoded_nse, mask_ns, max_new_tokens)
    return beam_search_loop(
        seq2seq_step_fn(model, params), cache, input_ids_bs.shape[0], num_beams, max_new_tokens,
        decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, length_penalty=length_penalty,
        early_stopping=early_stopping, forced_bos_token_id=forced_bos,
        forced_eos_token_id=forced_eos)
  return jax.jit(run)


def beam_search(model: Seq2Seq, params, input_ids, attention_mask, num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, *,
                forced_bos_token_id: int | None | str = FROM_CONFIG,
                forced_eos_token_id: int | None | str = FROM_CONFIG) -> BeamSearchOutput:
  """Beam search (HF `generate(do_sample=False, num_beams=num_beams)`; HF's defaults
  length_penalty=1.0, early_stopping=False).

  Args: `input_ids` / `attention_mask` `[B, S]`, or FiD contexts `[B, K, L]` (`encode_inputs`);
  `early_stopping` True (stop an example when
  num_beams hypotheses are finished), False (stop when the best running beam, at its current
  length, cannot beat the worst finished one) or "never" (same, at the best possible length);
  forced token ids default to the model config's. Returns a `BeamSearchOutput`; sequences are
  `[.., 1 + max_new_tokens]` int32, pad after EOS.

  Raises:
    ValueError: num_beams < 1, max_new_tokens < 1 or beyond BART's position table.
  """
  cfg = model.cfg
  check_generation(cfg, max_new_tokens)
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  fn = _beam_fn(cfg, num_beams, max_new_tokens, float(length_penalty), early_stopping,
                resolve(forced_bos_token_id, cfg.forced_bos_token_id),
                resolve(forced_eos_token_id, cfg.forced_eos_token_id))
  return fn(params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32))
