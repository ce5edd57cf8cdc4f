"""EM and answer recall@k against step for several `ragjax train` workdirs, as one PNG.

  python bench/plot_runs.py --out bench/rag2_documents.png --k 2 runs/docs_frozen runs/docs_query_ft

Reads each workdir's `eval/step_N.json` reports (written every `train.eval_every` steps) and
draws exact match (left) and answer recall@k (right) per row, labelled by the workdir's name.
Needs matplotlib (`pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re


def eval_curve(workdir: pathlib.Path, k: int) -> list[tuple[int, float, float]]:
  """`[(step, exact_match, answer recall@k)]` of a workdir's eval reports, by step.

  Raises: FileNotFoundError when the workdir has no `eval/step_N.json`."""
  out = []
  for f in (workdir / "eval").glob("step_*.json"):
    if not re.fullmatch(r"step_\d+\.json", f.name):
      continue
    r = json.loads(f.read_text())
    out.append((int(r["step"]), float(r["exact_match"]),
                float(r.get("answer_recall", {}).get(str(k), float("nan")))))
  if not out:
    raise FileNotFoundError(f"{workdir / 'eval'}: no step_N.json reports")
  return sorted(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdirs", nargs="+", type=pathlib.Path)
  ap.add_argument("--out", type=pathlib.Path, required=True)
  ap.add_argument("--k", type=int, default=2, help="answer recall@k to plot")
  args = ap.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_em, ax_r) = plt.subplots(1, 2, figsize=(10, 4))
  for w in args.workdirs:
    steps, em, rec = zip(*eval_curve(w, args.k))
    ax_em.plot(steps, em, marker="o", label=w.name)
    ax_r.plot(steps, rec, marker="o", label=w.name)
  ax_em.set(xlabel="step", ylabel="exact match", title="EM (held-out questions)")
  ax_r.set(xlabel="step", ylabel=f"answer recall@{args.k}", title=f"answer recall@{args.k}")
  for ax in (ax_em, ax_r):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
