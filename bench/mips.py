"""MIPS at 1M x 384: our ExactIndex (JAX) vs ScannIndex vs faiss HNSW, queries/s at recall@10.

Data: `--clusters` Gaussian centres on the unit sphere; each vector is a random centre plus
N(0, noise^2) per dimension, L2-normalised; queries are held-out vectors drawn the same way (all
seeded). Ground truth top-k is a chunked numpy matmul. Each approximate method sweeps its search
knob upward until recall@k reaches `--target-recall`, then bisects the last step (ScaNN:
`leaves_to_search` for each `reorder_k`; HNSW: `efSearch`, and if no efSearch reaches the target,
a rebuild with doubled `efConstruction` while the build budget allows). The fastest qualifying
setting of each is then re-timed, with the exact index, `--reps` times interleaved, and the
medians compared.

  python bench/mips.py                       # 1,000,000 x 384, 1,000 queries (HNSW build: minutes)
  python bench/mips.py --quick --no-write    # 50,000 vectors, 200 queries: a try-out
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import faiss  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import _results  # noqa: E402
from _vectors import make_data, numpy_topk, recall  # noqa: E402
from ragjax.retrieval.index import ExactIndex  # noqa: E402
from ragjax.retrieval.scann_index import ScannIndex  # noqa: E402

SCANN_LEAVES = (2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SCANN_REORDER = (20, 50, 100, 150, 250, 500)
HNSW_EF = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num-vectors", type=int, default=None, help="default 1,000,000")
  ap.add_argument("--num-queries", type=int, default=None, help="default 1,000")
  ap.add_argument("--quick", action="store_true",
                  help="a try-out: defaults of 50,000 vectors, 200 queries, 2 reps")
  ap.add_argument("--dim", type=int, default=384)
  ap.add_argument("--clusters", type=int, default=2_000)
  ap.add_argument("--noise", type=float, default=0.05,
                  help="per-dimension std of the noise around a centre (norm ~ noise*sqrt(dim))")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--k", type=int, default=10)
  ap.add_argument("--target-recall", type=float, default=0.95)
  ap.add_argument("--reps", type=int, default=None,
                  help="interleaved timed runs of the winners (default 5)")
  ap.add_argument("--threads", type=int, default=2,
                  help="faiss OpenMP threads and ScaNN build threads")
  ap.add_argument("--hnsw-m", type=int, default=32)
  ap.add_argument("--ef-construction", type=int, default=40,
                  help="first HNSW build; doubled and rebuilt while the target recall is not "
                       "reached and the next build fits in --hnsw-budget-s")
  ap.add_argument("--hnsw-budget-s", type=float, default=1800,
                  help="total seconds for HNSW builds (a doubled efConstruction is assumed to "
                       "take 2x the last build)")
  ap.add_argument("--skip-hnsw", action="store_true")
  ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
  args = ap.parse_args(argv)
  defaults = (50_000, 200, 2) if args.quick else (1_000_000, 1_000, 5)
  for name, value in zip(("num_vectors", "num_queries", "reps"), defaults):
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sweep(name, values, search, truth, target, nq, refine: int = 3):
  """Raise an integer knob through `values` (increasing cost) until recall >= target, or until
  recall stops improving; then bisect up to `refine` times between the last value that missed the
  target and the first that reached it. `search(value) -> rows`; each value is timed twice, the
  faster run counts. Returns the list of (value, recall, qps) in the order run."""
  points = []

  def run(value):
    (rows, sec), (_, sec2) = (_results.timed(lambda: search(value)) for _ in range(2))
    points.append((value, recall(rows, truth), nq / min(sec, sec2)))
    log(f"{name} {value}: recall {points[-1][1]:.4f}, {points[-1][2]:,.0f} q/s")
    return points[-1][1] >= target

  lo = None
  for value in values:
    if run(value):
      break
    if len(points) >= 2 and points[-1][1] - points[-2][1] < 0.002:
      return points  # plateau: limited by another knob (e.g. reorder_k)
    lo = value
  else:
    return points
  hi = points[-1][0]
  for _ in range(refine if lo is not None else 0):
    mid = (lo + hi) // 2
    if mid in (lo, hi):
      break
    if run(mid):
      hi = mid
    else:
      lo = mid
  return points


def best_point(points, target):
  ok = [p for p in points if p[1] >= target]
  return max(ok, key=lambda p: p[2]) if ok else None


@dataclasses.dataclass
class Method:
  """One contender at its chosen setting: `search() -> rows [Q, k]`."""
  label: str
  build_s: float
  setting: str
  search: Callable[[], np.ndarray]
  recall: float = float("nan")


def run_exact(data_nd, ids, queries_qd, truth_qk, k) -> tuple[Method, str]:
  exact = ExactIndex.build(data_nd, ids)
  # The first call compiles and copies the corpus to the device.
  _, first_s = _results.timed(lambda: exact.search_rows(queries_qd, k))
  prm = exact.manifest["params"]
  m = Method("ragjax ExactIndex (JAX chunked matmul + top-k, XLA CPU threads)",
             exact.manifest["build_seconds"],
             f"chunk {prm['chunk']}, query_batch {prm['query_batch']}, {prm['dtype']}",
             lambda: exact.search_rows(queries_qd, k)[1])
  rows, sec = _results.timed(m.search)
  log(f"exact: recall {recall(rows, truth_qk):.4f}, {len(queries_qd) / sec:,.0f} q/s (first call "
      f"{first_s:.1f} s)")
  return m, f"exact: first search (compile + copy to device) {first_s:.1f} s"


def run_scann(data_nd, ids, queries_qd, truth_qk, args) -> tuple[list[Method], str, list]:
  """Our ScannIndex (`search_rows`, as the library calls ScaNN) at the fastest swept setting, and
  the same searcher's single-threaded `search_batched` at that setting (what threads buy)."""
  k, nq = args.k, len(queries_qd)
  scann = ScannIndex.build(data_nd, ids, threads=args.threads)
  p = scann.manifest["params"]
  note = (f"ScaNN: num_leaves {p['num_leaves']}, training sample {p['training_sample_size']:,}, "
          f"dims_per_block {p['dims_per_block']}, anisotropic threshold "
          f"{p['anisotropic_threshold']}, {p['threads']} build threads")
  log(f"scann built in {scann.manifest['build_seconds']:.1f} s ({note})")
  leaves = [x for x in SCANN_LEAVES if x < p["num_leaves"]]
  leaves += [p["num_leaves"]] if p["num_leaves"] <= max(SCANN_LEAVES) else []
  points = []
  for reorder in SCANN_REORDER:
    points += [((lv, reorder), r, q) for lv, r, q in sweep(
        f"scann reorder_k {reorder}, leaves_to_search", leaves,
        lambda lv: scann.search_rows(queries_qd, k, leaves_to_search=lv, reorder_k=reorder)[1],
        truth_qk, args.target_recall, nq)]
  rows, sec = _results.timed(lambda: scann.search_rows(queries_qd, k)[1])
  rows, sec2 = _results.timed(lambda: scann.search_rows(queries_qd, k)[1])
  sweep_rows = [["ScaNN", f"leaves {s[0]}, reorder {s[1]}", f"{r:.4f}", f"{q:,.0f}"]
                for s, r, q in points]
  sweep_rows.append(["ScaNN", f"default_params: leaves {p['leaves_to_search']}, reorder "
                     f"{p['reorder_k']}", f"{recall(rows, truth_qk):.4f}",
                     f"{nq / min(sec, sec2):,.0f}"])
  best = best_point(points, args.target_recall)
  if best is None:
    return [], note + "; target recall not reached", sweep_rows
  lv, ro = best[0]
  setting = f"leaves_to_search {lv}, reorder_k {ro}"
  build_s = scann.manifest["build_seconds"]
  return [
      Method("ragjax ScannIndex.search_rows", build_s, setting,
             lambda: scann.search_rows(queries_qd, k, leaves_to_search=lv, reorder_k=ro)[1]),
      Method("same ScaNN searcher, single-threaded search_batched", build_s, setting,
             lambda: np.asarray(scann.searcher.search_batched(
                 queries_qd, k, max(k, ro), lv)[0], np.int64)),
  ], note, sweep_rows


def build_hnsw(data_nd, args, ef_construction):
  hnsw = faiss.IndexHNSWFlat(args.dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
  hnsw.hnsw.efConstruction = ef_construction
  t0 = time.perf_counter()
  step = max(len(data_nd) // 10, 1)
  for s in range(0, len(data_nd), step):
    hnsw.add(data_nd[s:s + step])
    log(f"hnsw (efConstruction {ef_construction}) added {min(s + step, len(data_nd)):,}/"
        f"{len(data_nd):,} ({time.perf_counter() - t0:.0f} s)")
  return hnsw, time.perf_counter() - t0


def run_hnsw(data_nd, queries_qd, truth_qk, args) -> tuple[list[Method], str, list]:
  """faiss HNSW, efSearch swept; while the target is not reached, rebuild with a doubled
  efConstruction if that fits in the build budget."""
  k, nq = args.k, len(queries_qd)
  ef_c, spent, notes, sweep_rows = args.ef_construction, 0.0, [], []
  while True:
    hnsw, build_s = build_hnsw(data_nd, args, ef_c)
    spent += build_s

    def search(ef, hnsw=hnsw):
      hnsw.hnsw.efSearch = ef
      return hnsw.search(queries_qd, k)[1]
    points = sweep(f"hnsw efC {ef_c} efSearch", HNSW_EF, search, truth_qk, args.target_recall, nq)
    sweep_rows += [[f"HNSW efConstruction {ef_c}", f"efSearch {s}", f"{r:.4f}", f"{q:,.0f}"]
                   for s, r, q in points]
    best = best_point(points, args.target_recall)
    notes.append(f"efConstruction {ef_c}: built in {build_s:.0f} s, best recall "
                 f"{max(p[1] for p in points):.4f}")
    if best is not None:
      ef = best[0]
      return [Method(f"faiss IndexHNSWFlat M {args.hnsw_m} ({args.threads} threads)", build_s,
                     f"efConstruction {ef_c}, efSearch {ef}", lambda: search(ef))], \
          "HNSW: " + "; ".join(notes), sweep_rows
    del hnsw
    if spent + 2 * build_s > args.hnsw_budget_s:
      notes.append(f"stopped: a build with efConstruction {2 * ef_c} would not fit the "
                   f"{args.hnsw_budget_s:.0f} s budget")
      return [], "HNSW: " + "; ".join(notes), sweep_rows
    ef_c *= 2


def main(argv=None):
  args = parse_args(argv)
  faiss.omp_set_num_threads(args.threads)
  n, nq, k = args.num_vectors, args.num_queries, args.k
  log(f"{n:,} x {args.dim} vectors, {nq:,} queries, {args.clusters} clusters, noise "
      f"{args.noise}; jax {jax.devices()}, faiss threads {args.threads}")
  (data_nd, queries_qd), gen_s = _results.timed(lambda: make_data(args))
  log(f"data generated in {gen_s:.1f} s")
  truth_qk, truth_s = _results.timed(lambda: numpy_topk(data_nd, queries_qd, k))
  top1 = float(np.mean(np.sum(queries_qd * data_nd[truth_qk[:, 0]], axis=1)))
  log(f"numpy ground truth in {truth_s:.1f} s ({nq / truth_s:,.0f} q/s); mean top-1 score "
      f"{top1:.3f}")
  ids = [str(i) for i in range(n)]

  exact, exact_note = run_exact(data_nd, ids, queries_qd, truth_qk, k)
  methods = {"exact": exact}
  scann_methods, scann_note, sweep_rows = run_scann(data_nd, ids, queries_qd, truth_qk, args)
  methods.update(zip(("scann", "scann_1thread"), scann_methods))
  notes = [exact_note, scann_note]
  if not args.skip_hnsw:
    hnsw_methods, hnsw_note, hnsw_rows = run_hnsw(data_nd, queries_qd, truth_qk, args)
    methods.update(zip(("hnsw",), hnsw_methods))
    notes.append(hnsw_note)
    sweep_rows += hnsw_rows

  # The winners, interleaved.
  for m in methods.values():
    m.recall = recall(np.asarray(m.search(), np.int64), truth_qk)
  secs = _results.time_interleaved({name: m.search for name, m in methods.items()}, args.reps)
  qps = {name: nq / _results.median(v) for name, v in secs.items()}
  for name, m in methods.items():
    log(f"{name}: recall {m.recall:.4f}, median {qps[name]:,.0f} q/s "
        f"(runs s {[round(x, 3) for x in secs[name]]})")
  ratio_rows = []
  for a, b in (("scann", "exact"), ("scann", "hnsw"), ("hnsw", "exact"),
               ("scann", "scann_1thread"), ("scann_1thread", "hnsw")):
    if a in qps and b in qps:
      ratio_rows.append([f"{a} / {b}", f"{qps[a] / qps[b]:.2f}",
                         f"{_results.paired_ratio(secs, a, b):.2f}"])
      log(f"ratio {a} / {b}: {ratio_rows[-1][1]} (per-round median {ratio_rows[-1][2]})")

  rows = [[m.label, f"{m.build_s:.1f}", m.setting, f"{m.recall:.4f}", f"{qps[name]:,.0f}",
           ", ".join(f"{nq / x:,.0f}" for x in secs[name])] for name, m in methods.items()]
  missing = [name for name in ("scann", "hnsw") if name not in methods
             and not (name == "hnsw" and args.skip_hnsw)]
  body = "\n\n".join(part for part in [
      _results.table(["method", "build s", f"setting (fastest with recall@{k} >= "
                      f"{args.target_recall})", f"recall@{k}", "queries/s (median)",
                      "queries/s per run"], rows),
      (f"Did not reach recall@{k} >= {args.target_recall}: {', '.join(missing)} (see the "
       "sweeps)." if missing else ""),
      "Ratios of queries/s (same invocation; ratio of the medians, and the median of the "
      "per-round ratios):" if ratio_rows else "",
      _results.table(["ratio", "of medians", "per-round median"], ratio_rows)
      if ratio_rows else "",
      "Build notes: " + "; ".join(notes) + ".",
      f"Sweeps (best of two timed runs per setting; each sweep raises its knob until recall "
      f"reaches {args.target_recall} or stops improving, then bisects the last step):",
      _results.table(["method", "setting", f"recall@{k}", "queries/s"], sweep_rows),
  ] if part)
  setup = {
      "versions": _results.versions("jax", "jaxlib", "scann", "faiss-cpu", "numpy"),
      "threads": f"faiss.omp_get_max_threads() {faiss.omp_get_max_threads()}; ScaNN build "
                 f"threads {args.threads}, search as ScannIndex.search_rows chooses (and "
                 f"single-threaded search_batched); jax {jax.default_backend()} devices "
                 f"{len(jax.devices())}; {_results.thread_env()}",
      "workload": f"{n:,} x {args.dim} float32, {args.clusters:,} Gaussian clusters on the unit "
                  f"sphere, noise std {args.noise}/dim, L2-normalised, seed {args.seed}; "
                  f"{nq:,} held-out queries; mean top-1 inner product {top1:.3f}; ground truth "
                  f"by numpy ({truth_s:.1f} s); {args.reps} interleaved timed runs per method",
  }
  if not args.no_write:
    text = _results.section("mips", f"mips.py: MIPS on {n:,} x {args.dim}, queries/s at "
                            f"recall@{k} >= {args.target_recall}", setup, body)
    log(f"wrote {_results.write_section('mips', text)}")


if __name__ == "__main__":
  main()
