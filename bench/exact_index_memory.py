"""Resident memory of a host `ExactIndex` per corpus row, against the layout it replaced.

Each configuration runs in a fresh worker process over the same `.npy` corpus (`--num-vectors`
x `--dim` float32): the worker's resident set (`VmRSS` from /proc/self/status, bytes) is read
before building the index and after one search of `--num-queries` queries, and the growth is
divided by the row count. Two inputs, as callers hand them over:

  memmap  `np.load(path, mmap_mode="r")` given to the index and not held elsewhere (as
          `load_index` does); its page cache counts while it is mapped
  array   an in-memory float32 array given to the index, the caller's reference dropped (as
          the host feeders and bundle export do with freshly computed embeddings)

and two layouts:

  exact_index    `ExactIndex`: blocked once on the host (`topk.block_corpus_host`, 64-byte
                 aligned) and put on the CPU device with `may_alias=True`, so the device corpus
                 and `embeddings` share one buffer
  former_layout  the code before 2026-12-07, reproduced: `np.asarray(data, float32)` held as
                 `embeddings`, and `topk.block_corpus(jnp.asarray(...))` on the device

Both run the same jitted `topk_blocks` search; its working set (about 2.5 x `query_batch` x
`chunk` float32 scores, 160 MiB at the defaults) does not grow with the corpus. Raw float32 is
`4 * dim` bytes per row. The top-10 rows of every configuration are compared.

  python bench/exact_index_memory.py                 # 400,000 x 384
  python bench/exact_index_memory.py --num-vectors 100000 --no-write
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import _results  # noqa: E402

_WORKER = r'''
import sys
import numpy as np
layout, given, corpus_path, num_queries, out = sys.argv[1:6]
num_queries = int(num_queries)

def rss():
  f = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
  return int(f["VmRSS"].split()[0]) * 1024

import jax, jax.numpy as jnp
from ragjax.retrieval.index import ExactIndex
from ragjax.retrieval.topk import block_corpus, topk_blocks
n, d = np.load(corpus_path, mmap_mode="r").shape
q = np.random.default_rng(1).standard_normal((num_queries, d), dtype=np.float32)
ids = [str(i) for i in range(n)]
jnp.zeros(1).block_until_ready()


class FormerExactIndex:  # ExactIndex before 2026-12-07: a host array and a padded device copy
  def __init__(self, data):
    self.embeddings = np.asarray(data, np.float32)
    self.device = block_corpus(jnp.asarray(self.embeddings), 65536)
    self.fn = jax.jit(lambda a, c: topk_blocks(a, c, n, 10))

  def search_rows(self, queries, k):
    rows = []
    for s in range(0, len(queries), 256):
      block = np.zeros((256, d), np.float32)
      block[:len(queries[s:s + 256])] = queries[s:s + 256]
      rows.append(np.asarray(self.fn(jnp.asarray(block), self.device)[1])[:len(queries[s:s + 256])])
    return None, np.concatenate(rows)


def make(data):
  return ExactIndex.build(data, ids) if layout == "exact_index" else FormerExactIndex(data)


before = rss()
if given == "memmap":
  index = make(np.load(corpus_path, mmap_mode="r"))
else:
  data = np.array(np.load(corpus_path, mmap_mode="r"))
  before = rss() - data.nbytes  # the array counts as the index's, as a caller's hand-over
  index = make(data)
  del data
rows = index.search_rows(q, 10)[1]
after = rss()
np.save(out, np.asarray(rows, np.int64))
print(after - before)
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
  configs = [(layout, given) for given in ("memmap", "array")
             for layout in ("exact_index", "former_layout")]
  growth, rows = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    rng = np.random.default_rng(0)
    np.save(tmp / "corpus.npy", rng.standard_normal((n, d), dtype=np.float32))
    (tmp / "worker.py").write_text(_WORKER)
    for layout, given in configs:
      out = tmp / f"{layout}_{given}.npy"
      res = subprocess.run([sys.executable, str(tmp / "worker.py"), layout, given,
                            str(tmp / "corpus.npy"), str(args.num_queries), str(out)],
                           capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
      if res.returncode != 0:
        raise RuntimeError(f"{layout}/{given} worker exited {res.returncode}:\n"
                           f"{res.stderr[-3000:]}")
      growth[layout, given] = int(res.stdout.strip().splitlines()[-1])
      rows[layout, given] = np.load(out)
      print(f"{layout} {given}: {growth[layout, given] / n:,.0f} bytes per row", flush=True)
  first = rows[configs[0]]
  if not all(np.array_equal(r, first) for r in rows.values()):
    raise RuntimeError("the configurations returned different top-10 rows")
  raw = 4 * d
  per_row = {c: g / n for c, g in growth.items()}
  table_rows = [[given, layout, f"{per_row[layout, given]:,.0f}",
                 f"{per_row[layout, given] / raw:.2f}"] for layout, given in configs]
  ratios = ", ".join(f"{given} {per_row['exact_index', given] / per_row['former_layout', given]:.2f}"
                     for given in ("memmap", "array"))
  body = "\n\n".join([
      _results.table(["input", "layout", "RSS growth, bytes per row", "x raw float32"],
                     table_rows),
      f"Ratio exact_index / former_layout: **{ratios}** (the same top-10 rows for all "
      f"{args.num_queries} queries in every configuration).",
  ])
  print(body)
  if not args.no_write:
    setup = {"versions": _results.versions("jax", "jaxlib", "numpy"),
             "workload": f"{n:,} x {d} float32 (raw {raw:,} bytes per row), one .npy; "
                         f"{args.num_queries} queries, k = 10; each configuration in a fresh "
                         "process"}
    text = _results.section("exact_index_memory", "exact_index_memory.py: host ExactIndex "
                            "resident memory per row", setup, body)
    print(f"wrote {_results.write_section('exact_index_memory', text)}")


if __name__ == "__main__":
  main()
