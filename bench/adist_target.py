"""How sharp is the ADist target of a reader that reads? (issue: ADist collapses the retriever.)

  python bench/adist_target.py --workdir runs/docs_r_frozen [--questions 64] [--k-r 4]

Loads a FiD run's newest checkpoint (a reader trained with a frozen retriever), retrieves K_r
passages for its eval questions, runs the reader over all of them with the cross-attention sown,
and prints (and writes to `<workdir>/adist_target.json`), per target temperature T_t:

  * entropy: the mean entropy of the ADist target softmax(s_k / T_t) (`aggregate_cross_attention`,
    Atlas's "normssum": alpha * ||v|| summed over passage tokens, / (256 * layers * tokens));
    ln K_r means a flat target, which the retriever can only match by scoring all K_r alike;
  * target_picks_answer: the fraction of questions whose highest-target passage contains an
    answer, against `prior_picks_answer` (the retriever's own top passage) and the fraction with
    an answer anywhere in the K_r;
  * the spread of s_k itself (max - min per question) and of the attention mass alone.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ragjax import config as config_lib  # noqa: E402
from ragjax.data.answers import has_answer  # noqa: E402
from ragjax.models.fid import cross_attention_of, fid_logits  # noqa: E402
from ragjax.models.rag import batch_targets  # noqa: E402
from ragjax.objectives.retriever_losses import aggregate_cross_attention  # noqa: E402
from ragjax.serving.bundle import checkpoint_params  # noqa: E402
from ragjax.training.loop import Run  # noqa: E402


def entropy(logits_bk: np.ndarray) -> float:
  p = np.exp(logits_bk - logits_bk.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return float(np.mean(-np.sum(p * np.log(np.maximum(p, 1e-30)), axis=1)))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--questions", type=int, default=64)
  ap.add_argument("--k-r", type=int, default=4)
  a = ap.parse_args(argv)
  w = pathlib.Path(a.workdir)
  cfg = config_lib.load_workdir_config(w)
  cfg.model.retriever_k, cfg.model.retriever_loss = a.k_r, "adist"
  cfg.init.from_workdir = ""
  step, params, _ = checkpoint_params(w)
  with tempfile.TemporaryDirectory() as tmp:
    run = Run(cfg, tmp)
  params = jax.tree.map(jnp.asarray, params)
  run.feeder.set_corpus(run.corpus_embeddings(params))
  sys_, size = run.system, int(cfg.eval.batch_size)
  qs = sys_.eval_questions[:a.questions]
  pad = run.model.generator_cfg.pad_token_id
  targets, masses, picks, prior_picks, any_hit = [], [], [], [], []
  fwd = jax.jit(lambda p, i, m, d: run.model.apply({"params": p}, i, m, d, method=fid_logits,
                                                    mutable=["intermediates"]))
  for s in range(0, len(qs), size):
    chunk = qs[s:s + size]
    chunk = chunk + [chunk[-1]] * (size - len(chunk))
    with run.feeder._mesh_context():
      batch = run.feeder.batch(params, chunk)
      dec, _, tmask = batch_targets(batch, pad)
      ids, cmask = batch["context_input_ids"], batch["context_attention_mask"]
      _, sown = fwd(params, ids, cmask, dec)
    b, k, length = ids.shape
    attn, vnorm = cross_attention_of(sown["intermediates"], k, length)
    s_bk = np.asarray(aggregate_cross_attention(attn, cmask, tmask, value_norm_nbhkl=vnorm))
    m_bk = np.asarray(aggregate_cross_attention(attn, cmask, tmask))  # attention mass only
    rows = np.asarray(batch["doc_ids"])
    n = min(size, len(qs) - s)
    for i in range(n):
      hits = [has_answer(sys_.passages[r].text, chunk[i].answers) for r in rows[i]]
      picks.append(hits[int(np.argmax(s_bk[i]))])
      prior_picks.append(hits[0])
      any_hit.append(any(hits))
    targets.append(s_bk[:n])
    masses.append(m_bk[:n])
  s_bk, m_bk = np.concatenate(targets), np.concatenate(masses)
  out = {"workdir": str(w), "step": int(step), "questions": len(qs), "k_r": a.k_r,
         "ln_k_r": round(float(np.log(a.k_r)), 4),
         "target_spread_max_minus_min": round(float(np.mean(s_bk.max(1) - s_bk.min(1))), 6),
         "attention_mass_spread": round(float(np.mean(m_bk.max(1) - m_bk.min(1))), 6),
         "entropy_by_target_temperature": {str(t): round(entropy(s_bk / t), 4)
                                           for t in (0.01, 0.001, 0.0002, 0.00005)},
         "target_picks_answer": round(float(np.mean(picks)), 4),
         "prior_picks_answer": round(float(np.mean(prior_picks)), 4),
         "answer_in_k_r": round(float(np.mean(any_hit)), 4)}
  print(json.dumps(out, indent=1))
  (w / "adist_target.json").write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
