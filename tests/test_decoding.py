"""Greedy and beam search: token-for-token equal to transformers' `generate` on tiny BARTs, and
the step-callback beam search against exhaustive search."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ragjax.decoding import beam as decoding
from ragjax.models.seq2seq import Seq2Seq
from ragjax.models.seq2seq_import import load_seq2seq_dir

MAX_NEW = 12


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_generating_bart(path, seed):
  """A random tiny BART whose greedy/beam outputs differ across rows and stop at EOS at
  various steps: small token embeddings (so the tied head does not just echo the input
  token), a slight EOS bias. The config carries BART's `forced_eos_token_id=2`."""
  torch.manual_seed(seed)
  cfg = transformers.BartConfig(
      vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
      decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
      max_position_embeddings=40, init_std=0.1)
  net = transformers.BartForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    net.model.shared.weight.mul_(0.1)
    net.final_logits_bias[0, cfg.eos_token_id] = 0.05
  net.save_pretrained(path, safe_serialization=True)
  return net


@pytest.fixture(scope="module", params=[1, 2])
def bart(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(f"gen_bart{request.param}")
  net = write_generating_bart(path, request.param)
  cfg, params = load_seq2seq_dir(path)
  assert cfg.forced_eos_token_id == 2 and cfg.forced_bos_token_id is None
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 64, (4, 9))
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = cfg.pad_token_id
  return net, Seq2Seq(cfg), params, ids, mask, request.param


def _hf(net, ids, mask, **kw):
  with torch.no_grad():
    out = net.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       max_new_tokens=MAX_NEW, do_sample=False, return_dict_in_generate=True,
                       output_scores=True, **kw)
  seq = out.sequences.numpy()
  padded = np.full((seq.shape[0], 1 + MAX_NEW), net.config.pad_token_id)
  padded[:, :seq.shape[1]] = seq  # HF crops to the longest output; ours has a static length
  return padded, out


def _check_padding(seq, cfg):
  for row in np.asarray(seq):
    ends = np.flatnonzero(row[1:] == cfg.eos_token_id)
    if ends.size:
      assert (row[2 + ends[0]:] == cfg.pad_token_id).all(), row


# (forced_bos_token_id, forced_eos_token_id): the config's (EOS forced at max length), or a
# forced BOS and no forced EOS -- given to both implementations.
FORCED = [dict(), dict(forced_bos_token_id=0, forced_eos_token_id=None)]


@pytest.mark.parametrize("forced", FORCED)
def test_greedy_matches_transformers(bart, forced):
  net, model, params, ids, mask, seed = bart
  ours = np.asarray(decoding.greedy_search(model, params, ids, mask, MAX_NEW, **forced))
  ref, _ = _hf(net, ids, mask, num_beams=1, **forced)
  assert ours.shape == (4, 1 + MAX_NEW) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, ref)
  _check_padding(ours, model.cfg)
  if seed == 1 and not forced:  # both endings: EOS before max length, and forced EOS at it
    early = (ours[:, 1:-1] == model.cfg.eos_token_id).any(axis=1)
    assert early.any() and not early.all(), ours
    assert (ours[~early, -1] == model.cfg.eos_token_id).all()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,forced", [
    (3, 1.0, False, FORCED[0]),
    (4, 0.6, True, FORCED[1]),
    (3, 2.0, "never", dict(forced_eos_token_id=None)),
])
def test_beam_search_matches_transformers(bart, num_beams, length_penalty, early_stopping,
                                          forced):
  net, model, params, ids, mask, seed = bart
  out = decoding.beam_search(model, params, ids, mask, num_beams, MAX_NEW, length_penalty,
                             early_stopping, **forced)
  ref, hf = _hf(net, ids, mask, num_beams=num_beams, length_penalty=length_penalty,
                early_stopping=early_stopping, **forced)
  np.testing.assert_array_equal(np.asarray(out.sequences), ref)
  np.testing.assert_allclose(np.asarray(out.scores), hf.sequences_scores.numpy(), atol=1e-5)
  assert out.beam_sequences.shape == (4, num_beams, 1 + MAX_NEW)
  assert (np.diff(np.asarray(out.beam_scores), axis=1) <= 0).all()  # best first
  _check_padding(out.sequences, model.cfg)


def test_beam_search_loop_over_a_step_callback_equals_exhaustive_search():
  """A toy stateful scorer through `beam_search_loop`: with enough beams, length_penalty 0 and
  early_stopping="never" the result is the best of all sequences (EOS-terminated or full)."""
  vocab, steps, eos, pad, start, beams = 4, 4, 3, 0, 0, 64
  table = jax.random.normal(jax.random.key(0), (7, vocab))  # log-probs depend on the history
  logp_table = np.asarray(jax.nn.log_softmax(table))

  def step_fn(tokens_n, cache_n, step):  # cache: running token sum, reordered by the search
    cache_n = cache_n + tokens_n
    return jnp.asarray(logp_table)[cache_n % 7], cache_n

  out = jax.jit(lambda c: decoding.beam_search_loop(
      step_fn, c, 1, beams, steps, decoder_start_token_id=start, eos_token_id=eos,
      pad_token_id=pad, length_penalty=0.0, early_stopping="never",
      reorder_cache_fn=lambda cache, idx: cache[idx]))(jnp.zeros((beams,), jnp.int32))

  best, best_seq = -np.inf, None
  for n in range(1, steps + 1):
    for toks in itertools.product(range(vocab), repeat=n):
      if (eos in toks[:-1]) or (n < steps and toks[-1] != eos):
        continue
      total, score = start, 0.0
      for tok in toks:
        score += logp_table[total % 7, tok]
        total += tok
      if score > best:
        best, best_seq = score, list(toks)
  expect = [start] + best_seq + [pad] * (steps - len(best_seq))
  np.testing.assert_array_equal(np.asarray(out.sequences)[0], expect)
  np.testing.assert_allclose(float(out.scores[0]), best, atol=1e-5)


def test_argument_errors(bart):
  _, model, params, ids, mask, _ = bart
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.greedy_search(model, params, ids, mask, 0)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    decoding.beam_search(model, params, ids, mask, 2, 41)
  with pytest.raises(ValueError, match="early_stopping"):
    decoding.beam_search(model, params, ids, mask, 2, 4, early_stopping="sometimes")
