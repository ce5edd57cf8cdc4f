"""EM and answer recall@k against step for several `ragjax train` workdirs, as one PNG.

  python bench/plot_runs.py --out bench/rag2_documents.png --k 2 runs/docs_frozen runs/docs_query_ft

Reads each workdir's `eval/step_N.json` reports (written every `train.eval_every` steps) and
draws exact match (left) and answer recall@k (right) per row, labelled by the workdir's name.
`--recorded 'LABEL=STEP:EM[:RECALL],...'` adds a row whose workdir is gone from numbers recorded
earlier (README), drawn dashed; a point without RECALL is left out of the recall panel.
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


def parse_recorded(spec: str) -> tuple[str, list[tuple[int, float, float]]]:
  """`'LABEL=STEP:EM[:RECALL],...'` -> `(label, [(step, em, recall or nan)])`, by step.

  Raises: ValueError naming the spec when it is not of that form."""
  label, sep, points = spec.partition("=")
  out = []
  try:
    for point in points.split(","):
      parts = point.split(":")
      if not sep or not label or len(parts) not in (2, 3):
        raise ValueError
      out.append((int(parts[0]), float(parts[1]), float(parts[2]) if len(parts) == 3
                  else float("nan")))
  except ValueError:
    raise ValueError(f"--recorded {spec!r}: expected LABEL=STEP:EM[:RECALL],...") from None
  return label, sorted(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdirs", nargs="*", type=pathlib.Path)
  ap.add_argument("--out", type=pathlib.Path, required=True)
  ap.add_argument("--k", type=int, default=2, help="answer recall@k to plot")
  ap.add_argument("--recorded", action="append", default=[],
                  help="LABEL=STEP:EM[:RECALL],... of a row measured earlier (drawn dashed)")
  ap.add_argument("--title", default="", help="a title over both panels")
  args = ap.parse_args(argv)
  recorded = [parse_recorded(r) for r in args.recorded]
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_em, ax_r) = plt.subplots(1, 2, figsize=(10, 5))
  for w in args.workdirs:
    steps, em, rec = zip(*eval_curve(w, args.k))
    ax_em.plot(steps, em, marker="o", label=w.name)
    ax_r.plot(steps, rec, marker="o", label=w.name)
  for label, curve in recorded:
    ax_em.plot([s for s, _, _ in curve], [e for _, e, _ in curve], marker="s", linestyle="--",
               label=label)
    with_recall = [(s, r) for s, _, r in curve if r == r]  # nan: not recorded
    ax_r.plot([s for s, _ in with_recall], [r for _, r in with_recall], marker="s",
              linestyle="--", label=label)
  if args.title:
    fig.suptitle(args.title, fontsize=10)
  ax_em.set(xlabel="step", ylabel="exact match", title="EM (held-out questions)")
  ax_r.set(xlabel="step", ylabel=f"answer recall@{args.k}", title=f"answer recall@{args.k}")
  for ax in (ax_em, ax_r):
    ax.grid(alpha=0.3)
  # one legend for both panels, below them (inside, it hides points)
  handles, labels = ax_em.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
  fig.savefig(args.out, dpi=100)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
