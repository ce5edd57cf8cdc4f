"""Host allocator settings for XLA:CPU processes (glibc malloc tunables).

XLA:CPU allocates an executable's temporary buffer (every activation the train step keeps for
its backward pass) in one `posix_memalign` per call and frees it after. glibc serves an
allocation that large with `mmap` and returns it with `munmap`, so every step faults the whole
buffer back in, page by page, and the kernel zeroes it. Measured on the 2-core CPU machine with
`bench/train_step.py`'s RAG-Token step (batch 8, K 5, 60 M trained parameters; 2026-11-21,
throwaway script around its `JaxRunner` with `getrusage` and strace):

  glibc default:         one 3.33 GB mmap + munmap per step, 880,000 minor faults,
                         1.2-1.5 s system time, 2.7-3.0 s per step alone and 3.1-4.3 s
                         between other processes' steps (the kernel finds and zeroes the
                         pages again each time)
  TUNED_MALLOC below:    0 faults, 0.02 s system time, 1.99-2.19 s per step, unchanged
                         after other processes' steps

`TUNED_MALLOC` keeps freed memory in the process for the next step: no `mmap` for large blocks
(`mmap_max=0`), one arena so a worker thread's large block comes from the one heap that can
grow past 64 MiB (`arena_max=1`), no trimming of the heap's top (`trim_threshold`), and
transparent huge pages for the heap where the kernel offers them (`hugetlb=1`, glibc >= 2.35;
unknown tunables are ignored). The cost is that the process keeps its peak heap: the resident
size does not shrink after a peak (what a training process wants; not what a short CLI job
needs). glibc reads tunables only at process start, so `reexec_with_tuned_malloc` restarts the
process image once (same pid, same arguments) with them set.

Set `RAGJAX_MALLOC=system` to keep glibc's defaults.
"""
from __future__ import annotations

import os
import platform
import sys

TUNED_MALLOC = ("glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1",
                "glibc.malloc.trim_threshold=1099511627776", "glibc.malloc.hugetlb=1")
ENV_SWITCH = "RAGJAX_MALLOC"


def tuned_malloc_env(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment to re-exec with, or None when there is nothing to do: not glibc, opted
  out (`RAGJAX_MALLOC=system`), already tuned (`RAGJAX_MALLOC=tuned`), or a `GLIBC_TUNABLES`
  that already sets one of the malloc tunables above (the user's choice is kept).

  Raises:
    ValueError: `RAGJAX_MALLOC` is set to something other than `tuned` or `system`.
  """
  mode = environ.get(ENV_SWITCH, "")
  if mode not in ("", "tuned", "system"):
    raise ValueError(f"{ENV_SWITCH}={mode!r}: expected 'tuned' or 'system'")
  if mode or platform.libc_ver()[0] != "glibc":
    return None
  current = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  names = {t.split("=", 1)[0] for t in TUNED_MALLOC}
  if any(t.split("=", 1)[0] in names for t in current):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(current + list(TUNED_MALLOC)),
          ENV_SWITCH: "tuned"}


def reexec_with_tuned_malloc() -> None:
  """Replace this process with itself under `tuned_malloc_env` (`os.execve`: same pid, so
  signals and supervisors see one process); returns without doing anything when
  `tuned_malloc_env` says so. Call it first thing in an entry point, before any threads."""
  env = tuned_malloc_env(dict(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
  """One line for logs: which allocator settings this process runs with."""
  return (f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH, 'unset')} "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
