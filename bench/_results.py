"""What every benchmark script records, and the writer of its section of `bench/RESULTS.md`.

Each script owns one section, delimited by HTML comments, which a rerun replaces in place:

    <!-- bench:embed_throughput:begin -->
    ## embed_throughput ...
    <!-- bench:embed_throughput:end -->

The machine is shared (other jobs run tests beside a benchmark), so scripts time the systems they
compare interleaved in one invocation (`time_interleaved`) and report medians and their ratios.
"""
from __future__ import annotations

import datetime
import fcntl
import importlib.metadata
import os
import pathlib
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

RESULTS = pathlib.Path(__file__).resolve().with_name("RESULTS.md")
HEADER = ("# ragjax benchmark results\n\n"
          "Written by the scripts in `bench/` (see `bench/README.md`); each script replaces its "
          "own section. Absolute numbers depend on the machine and on what else ran on it: "
          "compare the ratios, which are measured within one invocation.\n")
_LOAD_AT_IMPORT = os.getloadavg()  # the scripts import this module first thing
THREAD_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM", "RAGJAX_MALLOC", "GLIBC_TUNABLES")


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int
                     ) -> dict[str, list[float]]:
  """Run each function `reps` times, round-robin (a, b, a, b, ...); wall seconds per call."""
  seconds = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      seconds[name].append(time.perf_counter() - t0)
  return seconds


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  """`(fn(), wall seconds)`."""
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def paired_ratio(seconds: dict[str, list[float]], a: str, b: str) -> float:
  """Median over interleaved rounds of speed(a) / speed(b) = seconds(b) / seconds(a): each round's
  two runs are adjacent in time, so this follows a load that drifts during the benchmark."""
  return median([sb / sa for sa, sb in zip(seconds[a], seconds[b])])


def _meminfo_gib() -> float | None:
  try:
    text = pathlib.Path("/proc/meminfo").read_text()
  except OSError:
    return None
  m = re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)
  return int(m.group(1)) / 2**20 if m else None


def _cpu_model() -> str:
  """The CPU model and its widest vector unit (AVX-512 with bf16 / AVX-512 / AVX2), from
  /proc/cpuinfo: hosts of one machine kind differ about 2x in FLOP/s by it."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
      elif line.startswith("flags") and not flags:
        flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  width = ("AVX-512 (with bf16)" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
           else "AVX2 (no AVX-512)" if "avx2" in flags else "")
  return f"{model}, {width}" if width else model


def machine() -> str:
  """One line: usable cores, RAM, CPU model, load averages when the script started and now."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  ram = _meminfo_gib()
  load = lambda xs: "/".join(f"{x:.1f}" for x in xs)
  return (f"nproc {cores}, RAM {ram:.1f} GiB, {_cpu_model()}, {platform.system()} "
          f"{platform.release()}; load average (1/5/15 min) {load(_LOAD_AT_IMPORT)} at start, "
          f"{load(os.getloadavg())} at end")


def versions(*dists: str) -> str:
  """`python 3.11.x, jax 0.x, ...` for the installed distributions named (missing ones say so)."""
  out = [f"python {platform.python_version()}"]
  for d in dists:
    try:
      out.append(f"{d} {importlib.metadata.version(d)}")
    except importlib.metadata.PackageNotFoundError:
      out.append(f"{d} (not installed)")
  return ", ".join(out)


def thread_env() -> str:
  """The thread- and allocator-related environment variables, `unset` where absent."""
  return ", ".join(f"{k}={os.environ[k]!r}" if k in os.environ else f"{k} unset"
                   for k in THREAD_ENV)


def command_line() -> str:
  env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("XLA_FLAGS",) if k in os.environ)
  cmd = " ".join(shlex.quote(a) for a in ["python", sys.argv[0], *sys.argv[1:]])
  return f"{env} {cmd}".strip() if env else cmd


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A Markdown table; floats are written as given (format them before)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def section(key: str, title: str, setup: dict[str, str], body: str) -> str:
  """The text of a section: title, a bullet list of `setup` (date, machine, ... prepended), body."""
  meta = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
          "command": f"`{command_line()}`", "machine": machine(), **setup}
  bullets = "\n".join(f"- {k}: {v}" for k, v in meta.items())
  return (f"<!-- bench:{key}:begin -->\n## {title}\n\n{bullets}\n\n{body.strip()}\n"
          f"<!-- bench:{key}:end -->\n")


def write_section(key: str, text: str, path: pathlib.Path = RESULTS) -> pathlib.Path:
  """Replace (or append) the section `key` of `path`; atomic, and locked against a concurrent
  writer of another section."""
  begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->\n"
  dir_fd = os.open(path.parent, os.O_RDONLY)  # lock the directory: no stray lock file
  try:
    fcntl.flock(dir_fd, fcntl.LOCK_EX)
    old = path.read_text() if path.exists() else HEADER
    i, j = old.find(begin), old.find(end)
    if i >= 0 and j > i:
      new = old[:i] + text + old[j + len(end):]
    else:
      new = old.rstrip("\n") + "\n\n" + text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      f.write(new)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file a normal mode
    os.replace(tmp, path)
  finally:
    os.close(dir_fd)  # releases the lock
  return path
