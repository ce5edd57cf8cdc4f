"""Resident memory of a host `ExactIndex` per corpus row, against the layout it replaced.

Each configuration runs in a fresh worker process over the same `.npy` corpus (`--num-vectors`
x `--dim` float32, opened as a memmap as `ragjax index` / the feeder load it): the worker's
resident set (`VmRSS` from /proc/self/status, bytes) is read before and after building the index
and running one search of `--num-queries` queries, and the growth is divided by the row count.

  exact_index    `ExactIndex.build(memmap)` + `search_rows`: blocked once in numpy (64-byte
                 aligned) and put on the CPU device with `may_alias=True`, so the host
                 embeddings and the device corpus share one buffer.
  former_layout  the layout before 2026-12-07, as its code ran: `np.asarray` of the memmap (a
                 host copy), `jnp.asarray` (a device copy) padded and reshaped by
                 `topk.block_corpus` (a third), then the same jitted `topk_blocks` search.

The search's working set (`query_batch` x `chunk` float32 scores, ~160 MiB at the defaults)
does not grow with the corpus and is in both rows; so are the memmap's page-cache pages that the
copy read (resident while mapped). Raw float32 is `4 * dim` bytes per row.

  python bench/exact_index_memory.py                 # 400,000 x 384
  python bench/exact_index_memory.py --num-vectors 100000 --no-write
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

_WORKER = r'''
import json, sys
import numpy as np
kind, corpus_path, num_queries = sys.argv[1], sys.argv[2], int(sys.argv[3])

def rss():
  f = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
  return int(f["VmRSS"].split()[0]) * 1024

import jax, jax.numpy as jnp
from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.topk import block_corpus, topk_blocks
corpus = np.load(corpus_path, mmap_mode="r")
n, d = corpus.shape
q = np.random.default_rng(1).standard_normal((num_queries, d), dtype=np.float32)
ids = [str(i) for i in range(n)]
jnp.zeros(1).block_until_ready()
before = rss()
if kind == "exact_index":
  index = ExactIndex.build(corpus, ids)
  rows = index.search_rows(q, 10)[1]
else:
  host = np.asarray(corpus, np.float32).copy()   # ExactIndex._build's np.asarray, then held
  dev = block_corpus(jnp.asarray(host), 65536)
  fn = jax.jit(lambda a, c: topk_blocks(a, c, n, 10))
  rows = np.concatenate([np.asarray(fn(jnp.asarray(q[s:s + 256]), dev)[1])
                         for s in range(0, num_queries, 256)])
after = rss()
print(json.dumps({"kind": kind, "growth_bytes": after - before, "rows_checksum":
                  int(np.asarray(rows, np.int64).sum())}))
'''


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num-vectors", type=int, default=400_000)
  ap.add_argument("--dim", type=int, default=384)
  ap.add_argument("--num-queries", type=int, default=256)
  ap.add_argument("--no-write", action="store_true", help="print; do not touch RESULTS.md")
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  n, d = args.num_vectors, args.dim
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    rng = np.random.default_rng(0)
    np.save(tmp / "corpus.npy", rng.standard_normal((n, d), dtype=np.float32))
    (tmp / "worker.py").write_text(_WORKER)
    out = {}
    for kind in ("exact_index", "former_layout"):
      res = subprocess.run([sys.executable, str(tmp / "worker.py"), kind, str(tmp / "corpus.npy"),
                            str(args.num_queries)], capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
      if res.returncode != 0:
        raise RuntimeError(f"{kind} worker exited {res.returncode}:\n{res.stderr[-3000:]}")
      out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
      print(json.dumps(out[kind]), flush=True)
  if out["exact_index"]["rows_checksum"] != out["former_layout"]["rows_checksum"]:
    raise RuntimeError("the two layouts returned different top-10 rows")
  raw = 4 * d
  per_row = {k: v["growth_bytes"] / n for k, v in out.items()}
  rows = [[k, f"{v:,.0f}", f"{v / raw:.2f}"] for k, v in per_row.items()]
  body = "\n\n".join([
      _results.table(["layout", "RSS growth, bytes per row", "x raw float32"], rows),
      f"Ratio exact_index / former_layout: **{per_row['exact_index'] / per_row['former_layout']:.2f}"
      f"** (same top-10 rows for all {args.num_queries} queries).",
  ])
  print(body)
  if not args.no_write:
    setup = {"versions": _results.versions("jax", "jaxlib", "numpy"),
             "workload": f"{n:,} x {d} float32 (raw {raw:,} bytes per row), memmapped .npy; "
                         f"{args.num_queries} queries, k = 10; each layout in a fresh process"}
    text = _results.section("exact_index_memory", "exact_index_memory.py: host ExactIndex "
                            "resident memory per row", setup, body)
    print(f"wrote {_results.write_section('exact_index_memory', text)}")


if __name__ == "__main__":
  main()
