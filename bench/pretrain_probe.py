"""Does a pretraining query retrieve a passage that holds its masked answer? (issue 11 probe)

  python bench/pretrain_probe.py --config experiments/bios_documents.py:row=pretrain --limit 400

Builds the run's corpus and pretraining examples as `ragjax.system.build` does (the config's
corpus, `pretraining_examples_from_config` of its `data.pretrain`), embeds the corpus and the
first `--limit` queries with the frozen MiniLM retriever, searches exactly with each example's
own passage (or document) excluded, and prints the fraction of examples whose answer string
occurs (case-insensitively) in one of the top-k passages, for k = 1, 2, 4, 50. A masked span that no retrieved passage
contains gives PDist a target with no signal (every passage explains it equally badly). The
substring test over-counts common answers (a year that many passages mention). Trailing
`--config.KEY=VALUE` arguments override the config as in `ragjax train`.

Measured 2026-12-07 (2-core AMD EPYC, AVX2; ~1 min each), answer string in the top-1/2/4/50:
  row=pretrain,pretrain_corpus=benchmark  (the benchmark's corpus, each fact told once; the
                                           query the whole masked passage)   3.0 / 5.2 / 9.2 / 57.0 %
  row=pretrain                            (400 other people, every attribute told in both
                                           documents, no distractors, title + masked sentence)
                                                                          44.0 / 56.5 / 69.0 / 87.7 %
  row=pretrain --config.data.bios_docs.distractors=1                     18.0 / 30.0 / 41.0 / 65.0 %
  row=pretrain --config.data.bios_docs.distractors=4                      7.2 / 15.0 / 24.2 / 68.2 %
It also prints the share of queries whose mask lies past the query encoder's window
(`model.query_max_length`) and, on the biographies, of masked spans stated in another (not
excluded) passage of the same person. First 400 examples, 2026-12-07: the benchmark's corpus
0.672 past the 24-wordpiece window and 0.043 stated elsewhere; row=pretrain 0.028 and 0.860
(its unrestated spans are the news leads' events and dates).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from ragjax import config as config_lib  # noqa: E402
from ragjax.data.sources import load_data  # noqa: E402
from ragjax.models.retriever import load_retriever  # noqa: E402
from ragjax.objectives.pretraining import pretraining_examples_from_config  # noqa: E402


def _redundancy(passages, examples, tokenizer, mask_token: str, query_max_length: int):
  """Lines: the share of masks cut off by the query encoder's window (`[CLS]` + wordpieces
  before the mask >= `query_max_length` - 1), and, for the biographies' ids
  (`bio-<person>-<doc>-<i>`), the share of masked spans that occur in a passage of the same
  person outside the excluded ones (a retrievable statement of the fact)."""
  before = [e.question.split(mask_token)[0] for e in examples]
  n_before = tokenizer.lengths(before) - 1  # [CLS] + the wordpieces before the mask
  cut = float(np.mean(n_before >= query_max_length - 1))
  out = [f"mask past the query encoder's {query_max_length} wordpieces: {cut:.3f}"]
  person = lambda pid: pid.split("-")[1] if pid.startswith("bio-") else None
  if all(person(p.id) for p in passages):
    by_person = {}
    for p in passages:
      by_person.setdefault(person(p.id), []).append(p)
    found = [any(e.answers[0].lower() in f"{p.title} {p.text}".lower()
                 for p in by_person[person(e.exclude_passage_ids[0])]
                 if p.id not in e.exclude_passage_ids) for e in examples]
    out.append(f"masked span stated in another passage of the same person: "
               f"{np.mean(found):.3f}")
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--limit", type=int, default=400)
  args, overrides = ap.parse_known_args(argv)
  cfg = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  passages, _, _ = load_data(cfg)
  pre = cfg.data.pretrain
  examples = pretraining_examples_from_config(passages, pre)[:args.limit]
  retriever = load_retriever("minilm")
  for line in _redundancy(passages, examples, retriever.tokenizer, pre.mask_token,
                          int(cfg.model.query_max_length)):
    print(line)
  p_nd = np.asarray(retriever.encode_passages([p.title for p in passages],
                                              [p.text for p in passages]))
  q_bd = np.asarray(retriever.encode_queries([e.question for e in examples]))
  row = {p.id: i for i, p in enumerate(passages)}
  scores = q_bd @ p_nd.T
  for b, e in enumerate(examples):
    scores[b, [row[i] for i in e.exclude_passage_ids]] = -np.inf
  order = np.argsort(-scores, axis=1)[:, :50]
  text = [f"{p.title} {p.text}".lower() for p in passages]
  hit = np.array([[e.answers[0].lower() in text[j] for j in order[b]]
                  for b, e in enumerate(examples)])
  print(f"{len(examples)} {pre.objective} examples (exclude={pre.exclude}) of {len(passages)} "
        f"passages; frozen MiniLM, exact search")
  for k in (1, 2, 4, 50):
    print(f"answer string in the top-{k}: {hit[:, :k].any(axis=1).mean():.3f}")
  some = [f"{e.question[:90]!r} -> {e.answers[0]!r}" for e in examples[:3]]
  print("examples:\n  " + "\n  ".join(some))


if __name__ == "__main__":
  main()
