"""A corpus host-sharded over 2 processes vs held whole by 1: memory per process, queries/s,
re-embedding passages/s, and the merged top-k against the single-process top-k.

Data: `--num-vectors` clustered unit vectors (`bench/_vectors.py`, the data of `bench/mips.py`),
written once to a `.npy` file that every worker memmaps. Each configuration runs as fresh worker
processes (`jax.distributed` on 127.0.0.1 for 2): each reads only its rows `[lo, hi)`
(`retrieval.multihost.process_rows`), builds an `ExactIndex` and then a `ScannIndex` over them,
and searches `--num-queries` shared queries through `ProcessShardedIndex` (local top-k, all-gather
of the candidates, merge). Memory is the worker's resident set (`VmRSS` / peak `VmHWM` from
/proc/self/status) after each stage. Re-embedding is `Retriever.encode_passages` (MiniLM, 128
tokens) over `--embed-passages` synthetic biography passages split between the workers, timed
per process: the indexer's `--shard i --num-shards P` work on this machine's cores.

  python bench/sharded_host_index.py                 # 1,000,000 x 384, 1,000 queries
  python bench/sharded_host_index.py --quick --no-write

The section ends with a projection to 21M and 100M passages (BERT-base, 768 dims, 128 tokens)
from these per-row measurements; accelerator re-embedding times there are FLOP counts at an
assumed MFU, not measurements (no accelerator was used).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import _results  # noqa: E402
from _vectors import make_data, numpy_topk, recall  # noqa: E402

_WORKER = r'''
import json, os, socket, sys, time
import numpy as np
port, pid, nproc, corpus_path, queries_path, out = sys.argv[1:7]
k, reps, embed_n = int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
pid, nproc = int(pid), int(nproc)

def rss():
  f = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
  return {m: int(f[m].split()[0]) / 1024 for m in ("VmRSS", "VmHWM")}   # MiB

import jax
if nproc > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.multihost import ProcessShardedIndex, process_rows
from ragjax.retrieval.scann_index import ScannIndex
res = {"imported": rss()}
corpus = np.load(corpus_path, mmap_mode="r")
q = np.load(queries_path)
n = corpus.shape[0]
lo, hi = process_rows(n)
mine = np.array(corpus[lo:hi])                    # this process's rows only
res.update(lo=lo, hi=hi, loaded=rss())
ids = [str(i) for i in range(lo, hi)]
for kind, build in (("exact", lambda: ExactIndex.build(mine, ids)),
                    ("scann", lambda: ScannIndex.build(mine, ids, threads=1))):
  t0 = time.perf_counter()
  index = ProcessShardedIndex(build(), lo, n)
  res[kind + "_build_s"] = time.perf_counter() - t0
  index.search_rows(q[:8], k)                     # compile / warm
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    _, rows = index.search_rows(q, k)
    times.append(time.perf_counter() - t0)
  res[kind + "_seconds"] = times
  res[kind] = rss()
  if pid == 0:
    np.save(out + f".{kind}.npy", rows)
  del index
if embed_n:
  from ragjax.data.synthetic import iter_bio_passages
  from ragjax.models.retriever import load_retriever
  ps = list(iter_bio_passages(embed_n))[:embed_n]
  a, b = embed_n * pid // nproc, embed_n * (pid + 1) // nproc
  ret = load_retriever("minilm", max_length=128)
  ret.encode_passages([p.title for p in ps[a:a + 32]], [p.text for p in ps[a:a + 32]])  # compile
  t0 = time.perf_counter()
  ret.encode_passages([p.title for p in ps[a:b]], [p.text for p in ps[a:b]])
  res["embed_passages"], res["embed_s"] = b - a, time.perf_counter() - t0
res["final"] = rss()
json.dump(res, open(out, "w"))
'''


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num-vectors", type=int, default=None, help="default 1,000,000")
  ap.add_argument("--num-queries", type=int, default=None, help="default 1,000")
  ap.add_argument("--quick", action="store_true",
                  help="a try-out: 100,000 vectors, 200 queries, 64 passages embedded")
  ap.add_argument("--dim", type=int, default=384)
  ap.add_argument("--clusters", type=int, default=2_000)
  ap.add_argument("--noise", type=float, default=0.05)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--embed-passages", type=int, default=None, help="default 512 (quick: 64)")
  ap.add_argument("--timeout-s", type=float, default=1800, help="per configuration")
  ap.add_argument("--no-write", action="store_true", help="print; do not touch RESULTS.md")
  args = ap.parse_args(argv)
  args.num_vectors = args.num_vectors or (100_000 if args.quick else 1_000_000)
  args.num_queries = args.num_queries or (200 if args.quick else 1_000)
  if args.embed_passages is None:
    args.embed_passages = 64 if args.quick else 512
  return args


def run_workers(tmp: pathlib.Path, nproc: int, args) -> list[dict]:
  """Start `nproc` workers (one jax.distributed job when 2+), wait, return their JSON."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  outs = [tmp / f"p{nproc}_{i}.json" for i in range(nproc)]
  procs = [subprocess.Popen([sys.executable, str(tmp / "worker.py"), str(port), str(i),
                             str(nproc), str(tmp / "corpus.npy"), str(tmp / "queries.npy"),
                             str(outs[i]), str(args.k), str(args.reps),
                             str(args.embed_passages)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(nproc)]
  try:
    logs = [p.communicate(timeout=args.timeout_s)[0].decode()[-3000:] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    if p.returncode != 0:
      raise RuntimeError(f"worker exited {p.returncode}:\n{log}")
  return [json.loads(o.read_text()) for o in outs]


def projection(per_row_bytes: dict[str, float], embed_rate: float) -> str:
  """Memory and re-embedding time at paper scale from this run's per-row measurements."""
  flops_minilm = 2 * 6 * 12 * 384 ** 2 * 128 + 2 * 2 * 6 * 128 ** 2 * 384   # per passage
  flops_base = 2 * 12 * 12 * 768 ** 2 * 128 + 2 * 2 * 12 * 128 ** 2 * 768
  rows = []
  for n in (21_000_000, 100_000_000):
    emb_gb = n * 768 * 4 / 1e9
    for hosts in (1, 4, 16, 32):
      rows.append([f"{n / 1e6:.0f}M", hosts, f"{emb_gb / hosts:.1f}",
                   f"{n * per_row_bytes['exact'] * 2 / hosts / 1e9:.1f}",
                   f"{n * per_row_bytes['scann'] * 2 / hosts / 1e9:.1f}"])
  mem = _results.table(["passages", "hosts", "float32 embeddings per host (GB)",
                        "exact index per host (GB, measured bytes/row x 2 for 768 dims)",
                        "ScaNN index per host (GB, likewise)"], rows)
  cpu_base = embed_rate * flops_minilm / flops_base
  peaks = {"TPU v5e chip (197 TFLOP/s bf16)": 197e12, "TPU v5p chip (459)": 459e12,
           "H100 / H200 (989 dense bf16)": 989e12}
  trows = [["this CPU, one process (measured MiniLM rate x FLOP ratio)",
            f"{cpu_base:.2f}", f"{21e6 / cpu_base / 86400:.0f} days",
            f"{100e6 / cpu_base / 86400:.0f} days"]]
  for name, peak in peaks.items():
    rate = 0.4 * peak / flops_base
    for chips, label in ((16, "v5e-16"), (32, "v5p-32"), (8, "8 GPUs")):
      if (label == "v5e-16") != ("v5e" in name) or (label == "v5p-32") != ("v5p" in name):
        continue
      trows.append([f"{label}, {name}, at an assumed 40% MFU", f"{rate * chips:,.0f}",
                    f"{21e6 / rate / chips / 60:.1f} min", f"{100e6 / rate / chips / 60:.1f} min"])
  emb = _results.table(["re-embedding BERT-base, 128 tokens", "passages/s",
                        "21M passages", "100M passages"], trows)
  return (f"{mem}\n\nPer-row bytes are this run's resident-set growth per row held at 384 dims "
          f"(exact {per_row_bytes['exact']:.0f} B, ScaNN {per_row_bytes['scann']:.0f} B, "
          "counted from the loaded rows); 768 dims doubles them. A BERT-base passage of 128 "
          f"tokens costs {flops_base / 1e9:.1f} GFLOP forward against MiniLM's "
          f"{flops_minilm / 1e9:.2f} (2 x layers x 12 d^2 x tokens + attention).\n\n{emb}")


def main(argv=None):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="sharded_host_index.") as d:
    tmp = pathlib.Path(d)
    (tmp / "worker.py").write_text(_WORKER)
    data_nd, queries_qd = make_data(args)
    np.save(tmp / "corpus.npy", data_nd)
    np.save(tmp / "queries.npy", queries_qd)
    truth = numpy_topk(data_nd, queries_qd, args.k)
    del data_nd
    one = run_workers(tmp, 1, args)
    two = run_workers(tmp, 2, args)
    got = {(p, kind): np.load(tmp / f"p{p}_0.json.{kind}.npy") for p in (1, 2)
           for kind in ("exact", "scann")}
  exact_equal = bool(np.array_equal(got[1, "exact"], got[2, "exact"]))
  rows = []
  for p, res in ((1, one), (2, two)):
    for i, r in enumerate(res):
      row = [p, i, f"{r['hi'] - r['lo']:,}", f"{r['imported']['VmRSS']:.0f}",
             f"{r['loaded']['VmRSS']:.0f}", f"{r['exact']['VmRSS']:.0f}",
             f"{r['scann']['VmRSS']:.0f}", f"{r['final']['VmHWM']:.0f}",
             f"{args.num_queries / _results.median(r['exact_seconds']):,.0f}",
             f"{args.num_queries / _results.median(r['scann_seconds']):,.0f}",
             f"{r['scann_build_s']:.0f}"]
      row.append(f"{r['embed_passages'] / r['embed_s']:.1f}" if args.embed_passages else "-")
      rows.append(row)
  body = _results.table(
      ["processes", "process", "rows held", "RSS after import (MiB)", "after loading its rows",
       "with ExactIndex", "after ScaNN (exact freed)", "peak RSS", "exact queries/s (merged)",
       "ScaNN queries/s (merged)", "ScaNN build (s)", "re-embedding passages/s (this process)"],
      rows)
  r1, r2 = one[0], two
  peak_ratio = max(r["final"]["VmHWM"] for r in r2) / r1["final"]["VmHWM"]
  n = args.num_vectors
  per_row = {"exact": (r1["exact"]["VmRSS"] - r1["imported"]["VmRSS"]) * 2**20 / n,
             "scann": (r1["scann"]["VmRSS"] - r1["imported"]["VmRSS"]) * 2**20 / n}
  embed_rate = (r1["embed_passages"] / r1["embed_s"]) if args.embed_passages else 0.0
  body += (f"\n\nMerged top-{args.k} of the 2-process exact search equals the 1-process one: "
           f"**{exact_equal}**; recall@{args.k} against numpy brute force: exact 1 / 2 processes "
           f"{recall(got[1, 'exact'], truth):.4f} / {recall(got[2, 'exact'], truth):.4f}, ScaNN "
           f"{recall(got[1, 'scann'], truth):.4f} / {recall(got[2, 'scann'], truth):.4f}. Peak "
           f"RSS of the larger 2-process worker / the 1-process worker: {peak_ratio:.2f}.\n\n")
  if args.embed_passages:
    body += projection(per_row, embed_rate)
  text = _results.section(
      "sharded_host_index", "sharded_host_index.py: a corpus host-sharded over 2 processes",
      {"data": f"{n:,} x {args.dim} clustered unit vectors, {args.num_queries:,} queries, "
               f"k = {args.k}, {args.reps} timed searches per index",
       "versions": _results.versions("jax", "scann", "numpy")}, body)
  print(text)
  if not args.no_write:
    _results.write_section("sharded_host_index", text)


if __name__ == "__main__":
  main()
