"""Joint retriever training: what the asynchronous indexer costs the trainer, against the
synchronous in-process refresh, on one machine in one invocation.

Three `ragjax train` runs of the same joint-training job (`experiments/bios.py` with both
encoders training, the K passages re-encoded in the step, MiniLM retriever, 2,000 biographies),
the same number of steps each, run one after the other (`--rounds` repeats the three):

  none   `index.refresh.mode=async` with no indexer started: the index never refreshes (the
         step's own cost, the peer both others are divided by)
  async  the trainer starts `ragjax indexer` (nice `--indexer-nice`), which re-embeds the corpus
         from each exported checkpoint while training goes on (`schedule=asap`)
  sync   the trainer re-embeds the corpus itself every `--sync-every` steps, training paused

Throughput = examples / training-loop seconds, from each run's `metrics.jsonl` (the first log
interval, which holds the compilation, is left out). Also recorded: re-embedding throughput
(passages/s) and checkpoint-to-published seconds of every version the async indexer published,
and the distribution of `index_staleness_steps` over the async run.

  python bench/indexer.py                      # writes its section of bench/RESULTS.md
  python bench/indexer.py --steps 40 --no-write   # a quick try
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _results  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_train(workdir: pathlib.Path, mode: str, args) -> dict:
  over = {"optim.freeze": "()", "model.reencode_passages": "true",
          "optim.lr_multipliers.query_encoder": 0.05,
          "optim.lr_multipliers.passage_encoder": 0.05,
          "index.refresh.mode": "sync" if mode == "sync" else "async",
          "index.refresh.spawn_indexer": str(mode == "async").lower(),
          "index.refresh.schedule": (f"0-{args.steps}:{args.sync_every}" if mode == "sync"
                                     else "asap"),
          "index.refresh.indexer_nice": args.indexer_nice,
          "index.refresh.poll_seconds": 0.5,
          "train.total_steps": args.steps, "train.log_every": args.log_every,
          "train.checkpoint_every": 10 * args.steps, "train.eval_every": 0,
          "train.progress_bar": "false", "train.tensorboard": "false",
          "data.max_eval_questions": 50}
  cmd = [sys.executable, "-m", "ragjax.cli", "train", "--config", "experiments/bios.py",
         "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in over.items())]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  timed = records[1:]  # the first interval holds the compilation
  seconds = sum(args.log_every * 8 / r["examples_per_second"] for r in timed)
  out = {"mode": mode, "wall": wall, "loop_seconds": seconds,
         "examples_per_second": len(timed) * args.log_every * 8 / seconds,
         "staleness": [r["index_staleness_steps"] for r in records],
         "versions": sorted({r["index_version"] for r in records})}
  summary = json.loads((workdir / "index_refresh.json").read_text())
  out["sync_seconds"] = summary["sync_seconds"]
  manifests = []
  for d in sorted((workdir / "index").iterdir()):
    if d.name.isdigit() and (d / "manifest.json").is_file():
      manifests.append(json.loads((d / "manifest.json").read_text()))
  out["published"] = [m for m in manifests if m.get("published_by") != "trainer"]
  return out


def percentiles(xs, qs=(50, 90, 100)):
  import numpy as np
  return [float(np.percentile(xs, q)) for q in qs] if len(xs) else [float("nan")] * len(qs)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--sync-every", type=int, default=50)
  p.add_argument("--indexer-nice", type=int, default=10)
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--no-write", action="store_true")
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  results = {m: [] for m in ("none", "async", "sync")}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for mode in results:
        res = run_train(pathlib.Path(tmp) / f"{mode}-{r}", mode, args)
        results[mode].append(res)
        print(f"round {r} {mode}: {res['examples_per_second']:.2f} examples/s, loop "
              f"{res['loop_seconds']:.1f} s, wall {res['wall']:.1f} s, versions "
              f"{res['versions']}", flush=True)
  import numpy as np
  eps = {m: float(np.median([x["examples_per_second"] for x in v])) for m, v in results.items()}
  rows = [[m, f"{eps[m]:.2f}", ", ".join(f"{x['examples_per_second']:.2f}" for x in v),
           ", ".join(f"{x['loop_seconds']:.1f}" for x in v),
           ", ".join(str(len(x["versions"])) for x in v),
           ", ".join(f"{x['sync_seconds']:.1f}" for x in v)] for m, v in results.items()]
  body = [_results.table(["run", "examples/s (median)", "per round", "loop s per round",
                          "index versions used", "in-step re-embedding s"], rows), "",
          f"**async / none: {eps['async'] / eps['none']:.3f}**; **sync / none: "
          f"{eps['sync'] / eps['none']:.3f}** (throughput ratios; 1.0 = no cost)", ""]
  pub = [m for x in results["async"] for m in x["published"]]
  if pub:
    rate = [m["count"] / m["embed_seconds"] for m in pub if m.get("embed_seconds")]
    c2p = [m["checkpoint_to_publish_seconds"] for m in pub]
    body.append(_results.table(
        ["async indexer", "versions", "passages/s re-embedding (median)",
         "checkpoint -> published s (p50 / p90 / max)"],
        [["worker 0 of 1", len(pub), f"{np.median(rate):.1f}",
          " / ".join(f"{x:.1f}" for x in percentiles(c2p))]]))
    body.append("")
  st = [s for x in results["async"] for s in x["staleness"]]
  hist = np.bincount(np.minimum(np.asarray(st) // 10, 10))
  body.append("index_staleness_steps over the async run(s), per logged step: p50 / p90 / max = "
              + " / ".join(f"{x:.0f}" for x in percentiles(st)) + "; histogram (10-step bins, "
              "last = 100+): " + ", ".join(str(int(h)) for h in hist))
  sync = results["sync"][0]
  body.append(f"\nSync re-embedding: {sync['sync_seconds']:.1f} s of {sync['loop_seconds']:.1f} "
              f"s loop ({args.steps // args.sync_every - (args.steps % args.sync_every == 0)} "
              "refreshes, plus the initial embedding before the loop).")
  text = _results.section(
      "indexer", "indexer.py: joint training with the asynchronous indexer vs synchronous "
      "refresh (CPU)",
      {"versions": _results.versions("jax", "jaxlib", "flax", "orbax-checkpoint"),
       "threads": f"trainer and indexer: XLA CPU default (all cores each, {os.cpu_count()} "
                  f"here), indexer at nice {args.indexer_nice}; {_results.thread_env()}",
       "workload": f"experiments/bios.py, both encoders training (lr x 0.05), REALM re-encoding "
                   f"of the K=2 passages, batch 8, {args.steps} steps, log every "
                   f"{args.log_every}; 2,000 passages of <= 128 tokens; sync refresh every "
                   f"{args.sync_every} steps; {args.rounds} round(s), runs in the order none, "
                   "async, sync"},
      "\n".join(body))
  print(text)
  if not args.no_write:
    _results.write_section("indexer", text)


if __name__ == "__main__":
  main()
