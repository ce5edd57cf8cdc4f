"""Anatomy of a retriever collapse: how a trained query encoder's vectors moved.

  python bench/collapse_anatomy.py --workdir runs/control_random_S0 [--step N] [--questions 200]

Loads the run's config and checkpoint, embeds its eval questions with the initial query encoder
(the one the index was built with) and with the checkpoint's, and prints (and writes to
`<workdir>/collapse_anatomy.json`):
  * common_share: ||mean_i dq_i|| / mean_i ||dq_i||, dq_i = q_i(trained) - q_i(initial): 1 when
    every query moved by the same vector (a shared offset), ~1/sqrt(n) when they moved apart;
  * query_cosine: the mean pairwise cosine of the query vectors, initial and trained (how much
    the queries look alike);
  * hub_alignment: the cosine of the common move with the direction from the mean query to the
    most-retrieved (top-1) passage of the trained encoder;
  * relative_change per parameter kind (bias, LayerNorm scale, kernel, embedding):
    ||theta - theta_0|| / ||theta_0|| over all query-encoder parameters of that kind.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ragjax import config as config_lib  # noqa: E402
from ragjax.models.rag import RagModel  # noqa: E402
from ragjax.training.loop import Run  # noqa: E402


def _kind(path) -> str:
  names = [str(getattr(k, "key", k)) for k in path]
  leaf, parent = names[-1], names[-2] if len(names) > 1 else ""
  if "embed" in "/".join(names).lower():
    return "embedding"
  if "norm" in parent.lower() or "layernorm" in parent.lower():
    return "layernorm_" + leaf
  return leaf


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--step", type=int, default=0)
  ap.add_argument("--questions", type=int, default=200)
  a = ap.parse_args(argv)
  w = pathlib.Path(a.workdir)
  cfg = config_lib.load_workdir_config(w)
  run = Run(cfg, w)
  step = a.step or run.ckpt.latest_step()
  state = run.ckpt.restore(step, run.shapes.state)[0]
  sys_ = run.system
  qs = sys_.eval_questions[:a.questions]
  host = sys_.question_batch(qs)
  enc = jax.jit(lambda p, i, m: run.model.apply({"params": p}, i, m,
                                                method=RagModel.encode_query))
  params1 = jax.device_get(state.params)
  params0 = {**params1, "bi_encoder": {**params1["bi_encoder"],
                                       "query_encoder": sys_.host_towers()["query_encoder"]}}
  q0 = np.asarray(enc(params0, host["query_input_ids"], host["query_attention_mask"]))
  q1 = np.asarray(enc(params1, host["query_input_ids"], host["query_attention_mask"]))
  dq = q1 - q0
  common = dq.mean(0)
  cos = lambda x: float(np.mean((x / np.linalg.norm(x, axis=1, keepdims=True)) @
                                (x / np.linalg.norm(x, axis=1, keepdims=True)).T))
  corpus = run.corpus_embeddings(params0)
  top1 = np.argmax(q1 @ corpus.T, axis=1)
  hub = np.bincount(top1).argmax()
  to_hub = corpus[hub] - q1.mean(0)
  rel = {}
  t0 = jax.tree_util.tree_flatten_with_path(params0["bi_encoder"]["query_encoder"])[0]
  t1 = jax.tree.leaves(params1["bi_encoder"]["query_encoder"])
  acc = {}
  for (path, x0), x1 in zip(t0, t1):
    d = acc.setdefault(_kind(path), [0.0, 0.0])
    d[0] += float(np.sum((np.asarray(x1, np.float64) - np.asarray(x0, np.float64)) ** 2))
    d[1] += float(np.sum(np.asarray(x0, np.float64) ** 2))
  rel = {k: round(np.sqrt(a_) / max(np.sqrt(b_), 1e-12), 5) for k, (a_, b_) in sorted(acc.items())}
  out = {"workdir": str(w), "step": int(step), "questions": len(qs),
         "common_share": round(float(np.linalg.norm(common) / np.mean(np.linalg.norm(dq, axis=1))),
                               4),
         "mean_move_norm": round(float(np.mean(np.linalg.norm(dq, axis=1))), 4),
         "query_cosine": {"initial": round(cos(q0), 4), "trained": round(cos(q1), 4)},
         "hub_top1_share": round(float(np.mean(top1 == hub)), 4),
         "hub_alignment": round(float(common @ to_hub / (np.linalg.norm(common) *
                                                          np.linalg.norm(to_hub))), 4),
         "relative_change": rel}
  print(json.dumps(out, indent=1))
  (w / "collapse_anatomy.json").write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  main()
