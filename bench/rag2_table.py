"""The RAG 2.0 table's columns from `ragjax train` workdirs, as Markdown rows.

  python bench/rag2_table.py --k 2 runs/docs_r_frozen runs/docs_r_joint ...

Per workdir: the last eval report's EM, F1 and answer recall@1 / @k (with the EM of every eval,
to show the curve), the median examples/s of its `metrics.jsonl` records, and the index versions
it installed with their median staleness in steps (`index_version`, `index_staleness_steps` in
the records; none for a frozen index). Wall time is the caller's (e.g. the queue's log).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics


def summarize(workdir: pathlib.Path, k: int) -> dict:
  """The table's numbers of one workdir (module docstring). Raises: FileNotFoundError (no eval
  reports or no metrics.jsonl)."""
  evals = sorted((json.loads(f.read_text()) for f in (workdir / "eval").glob("step_*.json")
                  if re.fullmatch(r"step_\d+\.json", f.name)), key=lambda r: r["step"])
  if not evals:
    raise FileNotFoundError(f"{workdir / 'eval'}: no step_N.json reports")
  recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
  last = evals[-1]
  rate = [r["examples_per_second"] for r in recs if "examples_per_second" in r]
  versions = sorted({r["index_version"] for r in recs if r.get("index_version") is not None})
  stale = [r["index_staleness_steps"] for r in recs if "index_staleness_steps" in r]
  recall = last.get("answer_recall", {})
  return {"step": last["step"], "exact_match": last["exact_match"], "f1": last["f1"],
          "recall@1": recall.get("1"), f"recall@{k}": recall.get(str(k)),
          "em_curve": [(r["step"], r["exact_match"]) for r in evals],
          "recall_curve": [(r["step"], r.get("answer_recall", {}).get(str(k))) for r in evals],
          "examples_per_second": statistics.median(rate) if rate else None,
          "index_versions": len(versions),
          "median_staleness": statistics.median(stale) if stale else None}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdirs", nargs="+", type=pathlib.Path)
  ap.add_argument("--k", type=int, default=2)
  args = ap.parse_args(argv)
  fmt = lambda x: "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)
  for w in args.workdirs:
    s = summarize(w, args.k)
    curve = " / ".join(f"{em:.3f}" for _, em in s["em_curve"])
    rcurve = " / ".join(fmt(r) for _, r in s["recall_curve"])
    print(f"| {w.name} | {fmt(s['exact_match'])} | {fmt(s['f1'])} | {fmt(s['recall@1'])} / "
          f"{fmt(s[f'recall@{args.k}'])} | EM {curve}; recall@{args.k} {rcurve} | "
          f"{fmt(s['examples_per_second'])} | {s['index_versions']} | "
          f"{fmt(s['median_staleness'])} |")


if __name__ == "__main__":
  main()
