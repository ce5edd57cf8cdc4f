"""Where the CPU train step's time goes: one profiled step of `bench/train_step.py`'s ragjax
RAG step (same workload), every XLA:CPU thunk timed by the JAX profiler and grouped by the model
component its HLO metadata names, plus each matmul's achieved GFLOP/s.

Method: the step is compiled, run `--warmup` times, then one step runs under `jax.profiler.trace`
with `--xla_cpu_enable_xprof_traceme=true` (set here before jax starts), under the tuned host
allocator (`ragjax.hostenv`, as `ragjax train` runs); the Perfetto trace's
complete events are summed per thunk name and mapped to the compiled module's instructions
(`compiled.as_text()`, same fusion names): their `op_name` metadata gives the component and
forward / backward (`transpose(...)`), their dot shapes give FLOPs. Thunk times are thread-time
sums (two threads on two cores), and the profiler slows the step by ~10-25%, so compare rows
with each other, not with an unprofiled step.

  python bench/profile_step.py                 # prints the tables
  python bench/profile_step.py --loss rag_sequence --top 30
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402

import _results  # noqa: E402
import train_step as tsb  # noqa: E402

SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction")


def thunk_seconds(trace_dir: str) -> dict[str, float]:
  """`{thunk name: seconds}` summed over the complete events of the newest Perfetto trace."""
  path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  out = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(SKIP):
      out[e["name"]] += e.get("dur", 0) / 1e6
  return dict(out)


def hlo_tables(hlo: str):
  """`(op_name by instruction, FLOPs by instruction)`: the metadata of every instruction, and
  2 * |output| * |contracted dims| summed over the dots of a fusion (or of a dot itself)."""
  shapes = {m.group(1): m.group(2) for m in re.finditer(r"(%[\w.\-]+) = (\w+\[[\d,]*\])", hlo)}
  comps = {m.group(1): m.group(2)
           for m in re.finditer(r"\n(%[\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}

  def dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape or "")
    return [int(x) for x in m.group(1).split(",") if x] if m else []

  def dot_flops(lines: str) -> float:
    total = 0.0
    for m in re.finditer(r"= (\w+\[[\d,]*\])\S* dot\((.*?)\), ([^\n]*)", lines):
      lhs = dims(shapes.get(m.group(2).split(",")[0].strip(), ""))
      cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(3))
      k = math.prod(lhs[int(i)] for i in cd.group(1).split(",") if i) if cd and lhs else 1
      total += 2.0 * math.prod(dims(m.group(1))) * k
    return total

  op_name, flops = {}, {}
  for m in re.finditer(r"\n\s*(?:ROOT )?%([\w.\-]+) = ([^\n]*)", hlo):
    name, rest = m.group(1), m.group(2)
    meta = re.search(r'op_name="([^"]*)"', rest)
    if meta:
      op_name[name] = meta.group(1)
    calls = re.search(r"calls=(%[\w.\-]+)", rest)
    if calls and calls.group(1) in comps:
      f = dot_flops(comps[calls.group(1)])
    elif " dot(" in rest:
      f = dot_flops("= " + rest)
    else:
      f = 0.0
    if f:
      flops[name] = f
  return op_name, flops


def component(op: str) -> str:
  """`fwd|bwd <module path>` of an op_name, layer numbers folded, the primitive dropped."""
  direction = "bwd" if "transpose(" in op else "fwd"
  parts = [p for p in op.split("/") if not p.startswith(("jit(", "jvp(", "transpose("))]
  path = re.sub(r"layer_\d+", "layer_N", "/".join(parts[:-1]) or parts[-1] if parts else op)
  return f"{direction} {path}"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--loss", default="rag_token", choices=tuple(tsb.LOSSES))
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--top", type=int, default=20)
  ap.add_argument("--peak-gflops", type=float, default=0.0,
                  help="GFLOP/s a matmul could reach here (default: a 2048^3 jax matmul, timed)")
  args = ap.parse_args(argv)
  tsb.use_malloc("tuned")  # as `ragjax train` and bench/train_step.py run
  runner = tsb.JaxRunner(tsb.BenchConfig(loss=args.loss))
  hlo = runner.step_fn.lower(runner.state, runner.batch).compile().as_text()
  for _ in range(args.warmup):
    runner()
  t0 = time.perf_counter()
  runner()
  step_s = time.perf_counter() - t0
  peak = args.peak_gflops
  if not peak:
    mm = tsb.matmul_fns(2048)["jax_matmul"]
    mm()
    t0 = time.perf_counter()
    mm()
    peak = 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      t0 = time.perf_counter()
      runner()
      profiled_s = time.perf_counter() - t0
    seconds = thunk_seconds(tmp)
  op_name, flops = hlo_tables(hlo)
  total = sum(seconds.values())
  by_comp, by_kind = collections.Counter(), collections.Counter()
  dot_s = dot_f = 0.0
  lost = []
  for name, s in seconds.items():
    by_comp[component(op_name.get(name, re.sub(r"\.\d+$", "", name)))] += s
    by_kind[re.sub(r"\.\d+$", "", name)] += s
    if name in flops:
      dot_s += s
      dot_f += flops[name]
      lost.append((s - flops[name] / (peak * 1e9), s, flops[name], name,
                   component(op_name.get(name, name))))
  print(f"# {_results.machine()}")
  print(f"step {step_s:.2f} s unprofiled, {profiled_s:.2f} s profiled; thunk time {total:.2f} "
        f"thread-s; matmuls {dot_f / 1e9:.1f} GFLOP in {dot_s:.2f} s = "
        f"{dot_f / dot_s / 1e9:.1f} GFLOP/s (2048^3 jax matmul: {peak:.1f})\n")
  print(_results.table(["thunk kind", "thread-s", "share"],
                       [[k, f"{s:.3f}", f"{s / total:.3f}"]
                        for k, s in by_kind.most_common(args.top)]), "\n")
  print(_results.table(["component", "thread-s", "share"],
                       [[k, f"{s:.3f}", f"{s / total:.3f}"]
                        for k, s in by_comp.most_common(args.top)]), "\n")
  lost.sort(reverse=True)
  print(_results.table(["matmul thunk", "component", "ms", "GFLOP/s", "ms over the peak"],
                       [[n, c, f"{s * 1e3:.1f}", f"{f / s / 1e9:.1f}", f"{x * 1e3:.1f}"]
                        for x, s, f, n, c in lost[:args.top]]))


if __name__ == "__main__":
  sys.exit(main())
