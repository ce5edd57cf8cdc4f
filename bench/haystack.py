"""Biographies needle-in-a-haystack (Contextual AI's RAG 2.0 benchmark): exact match of trained
RAG models as the same 100 needle questions hide in haystacks of 2K to 2M tokens.

Haystacks: `ragjax make-haystack --out H` (`ragjax.data.haystack`: 20 held-out people of the
trained world as needles, non-repeated filler biographies from outside it, MiniLM tokens). Each
`--workdir` is a trained run on the same world (the main job, `experiments/bios.py`); its
checkpoint is loaded once and each haystack becomes its corpus (`ragjax.serving.suite
.with_corpus`: embedded by its passage encoder, exact MIPS), then `ragjax evaluate --task qa`'s
scoring runs on the needle questions. Rows per run and size: EM, F1, answer recall@1/@2 (the
reader reads K = 2), passages, seconds to embed the haystack and to answer.

No long-context reader row: no model that reads 2M tokens runs offline on this CPU machine.

  ragjax make-haystack --out runs/haystack
  python bench/haystack.py --haystack runs/haystack runs/bios_seed1 runs/bios_seed0
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _results  # noqa: E402
from ragjax.data.corpus import read_passages  # noqa: E402
from ragjax.serving import suite  # noqa: E402

RECALL_KS = (1, 2, 5)


def measure(workdir: pathlib.Path, haystack: pathlib.Path, sizes: list[int]) -> list[dict]:
  base, source = suite.load_system(workdir=workdir)
  questions = haystack / "needle_questions.jsonl"
  loaded = suite.load_examples("qa", questions)
  rows = []
  for s in sizes:
    passages = read_passages(haystack / f"haystack_{s}.jsonl")
    t0 = time.perf_counter()
    b = suite.with_corpus(base, passages)
    t_embed = time.perf_counter() - t0
    scorer = suite.engine_scorer(b, source, batch_size=50, max_retrieve_k=max(RECALL_KS))
    t0 = time.perf_counter()
    result, _ = suite.run_loaded(loaded, scorer, RECALL_KS)
    m = result["metrics"]
    rows.append({"run": workdir.name, "tokens": s, "passages": len(passages),
                 "exact_match": m["exact_match"], "f1": m["f1"],
                 "recall": m.get("answer_recall", {}), "embed_s": t_embed,
                 "answer_s": time.perf_counter() - t0})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for run in dict.fromkeys(r["run"] for r in rows):
    rs = [r for r in rows if r["run"] == run]
    ax.plot([r["tokens"] for r in rs], [r["exact_match"] for r in rs], "o-", label=f"{run} EM")
    ax.plot([r["tokens"] for r in rs], [r["recall"].get("1", float("nan")) for r in rs], "x--",
            label=f"{run} answer recall@1")
  ax.set_xscale("log")
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("haystack size (MiniLM tokens)")
  ax.set_ylabel("fraction of 100 needle questions")
  ax.set_title("Biographies needle-in-a-haystack: frozen-retriever RAG-Token")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("workdirs", nargs="+", type=pathlib.Path)
  ap.add_argument("--haystack", type=pathlib.Path, required=True)
  ap.add_argument("--sizes", default="", help="a subset of the haystack's sizes (default: all)")
  ap.add_argument("--png", type=pathlib.Path,
                  default=pathlib.Path(__file__).parent / "haystack.png")
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args(argv)
  manifest = json.loads((args.haystack / "manifest.json").read_text())
  sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes
           else sorted(int(s) for s in manifest["sizes"]))
  rows = [r for w in args.workdirs for r in measure(w, args.haystack, sizes)]
  table = _results.table(
      ["run", "haystack tokens", "passages", "EM", "F1", "answer recall@1", "@2", "@5",
       "embed s", "answer s"],
      [[r["run"], f"{r['tokens']:,}", f"{r['passages']:,}", f"{r['exact_match']:.3f}",
        f"{r['f1']:.3f}", *(f"{r['recall'].get(str(k), float('nan')):.3f}" for k in RECALL_KS),
        f"{r['embed_s']:.1f}", f"{r['answer_s']:.1f}"] for r in rows])
  if args.no_write:
    print(table)
    return
  plot(rows, args.png)
  body = "\n\n".join([table, (
      f"Plot: `{args.png.name}`. The same {manifest['num_questions']} questions about "
      f"{manifest.get('num_needles')} held-out people at every size; the retriever is the frozen "
      "MiniLM of the main job, so EM against size measures what the hay does to retrieval (and "
      "to the reader's K = 2 passages). No jointly trained or long-context row: see "
      "bench/haystack.py.")])
  setup = {"versions": _results.versions("jax", "flax"),
           "workload": f"haystack {args.haystack} (sizes {sizes}); runs "
                       f"{[str(w) for w in args.workdirs]}; exact MIPS, greedy RAG-Token"}
  text = _results.section("haystack", "haystack.py: Biographies needle-in-a-haystack, 2K-2M "
                          "tokens", setup, body)
  print(f"wrote {_results.write_section('haystack', text)}")


if __name__ == "__main__":
  main()
