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
size does not shrink after a peak (what a training process wants). glibc reads tunables only at
process start, so `reexec_with_malloc_env` restarts the process image once (same pid, same
arguments) with them set; children inherit them.

Only XLA:CPU processes are tuned (on TPU/GPU hosts the temporaries live in device memory, and
one arena would serialise a many-threaded host's mallocs). Set `RAGJAX_MALLOC=system` for
glibc's defaults. Memory cost, measured with `mallinfo2` on a jitted function with 64 MiB
arrays (tests/test_hostenv.py's probe): glibc 2.36's `posix_memalign` asks for the block plus
its alignment, so an exactly-sized freed block is not reused until it merges with a neighbour;
the heap grew by a temporary per call over the first calls and now and then later, to
0.8-1.1 GB after 12 calls (0.32-0.33 GB after the first), while most warm calls faulted
nothing. The training processes measured here did not grow (SQuAD-open RAG-Token: resident
4.86-4.88 GB sampled from step 60 to 1,060 of 2,000).
"""
from __future__ import annotations

import os
import platform
import sys

TUNED_MALLOC = ("glibc.malloc.mmap_max=0", "glibc.malloc.arena_max=1",
                "glibc.malloc.trim_threshold=1099511627776", "glibc.malloc.hugetlb=1")
ENV_SWITCH = "RAGJAX_MALLOC"
# glibc's older spellings of malloc tunables, and preloaded allocators: a choice already made.
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_",
              "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def _tunables(environ) -> list[str]:
  """The `name=value` entries of `GLIBC_TUNABLES`."""
  return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def _mode(environ) -> str:
  mode = environ.get(ENV_SWITCH, "tuned") or "tuned"
  if mode not in ("tuned", "system"):
    raise ValueError(f"{ENV_SWITCH}={mode!r}: expected 'tuned' or 'system'")
  return mode


def _cpu_backend(environ) -> bool:
  """Whether JAX will run on XLA:CPU: `JAX_PLATFORMS` names cpu first, or it is unset and no
  accelerator plugin (libtpu, a `jax_plugins` entry point such as CUDA's) is installed. The
  per-call temporary buffer this module is about lives in host memory only on CPU."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  import importlib.metadata
  import importlib.util
  return (importlib.util.find_spec("libtpu") is None
          and not importlib.metadata.entry_points(group="jax_plugins"))


def malloc_env(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment to re-exec with, or None when this one is already right.

  `RAGJAX_MALLOC=tuned` (the default) adds `TUNED_MALLOC` to `GLIBC_TUNABLES`, except where it
  would do nothing or override a choice already made: not glibc; not an XLA:CPU process (see
  `_cpu_backend`); a `glibc.malloc.*` tunable, a `MALLOC_*` variable or a preloaded tcmalloc /
  jemalloc / mimalloc already there; or the tunables already set. `RAGJAX_MALLOC=system` removes
  `TUNED_MALLOC`'s entries (inherited from a tuned parent, say) so glibc's defaults apply.

  Raises:
    ValueError: `RAGJAX_MALLOC` is set to something other than `tuned` or `system`.
  """
  mode = _mode(environ)
  if platform.libc_ver()[0] != "glibc":
    return None
  current = _tunables(environ)
  if mode == "system":
    kept = [t for t in current if t not in TUNED_MALLOC]
    if kept == current:
      return None
    env = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, **({"GLIBC_TUNABLES": ":".join(kept)} if kept else {})}
  if (any(t.startswith("glibc.malloc.") for t in current)
      or any(k in environ for k in MALLOC_ENV)
      or any(a in environ.get("LD_PRELOAD", "") for a in PRELOADED_ALLOCATORS)
      or not _cpu_backend(environ)):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(current + list(TUNED_MALLOC))}


def tuned() -> bool:
  """Whether this process runs with `TUNED_MALLOC` (read from `GLIBC_TUNABLES`, not from the
  switch: a wrapper may have dropped the tunables)."""
  current = _tunables(os.environ)
  return all(t in current for t in TUNED_MALLOC)


def reexec_with_malloc_env() -> None:
  """Replace this process with itself under `malloc_env` (`os.execve`: same pid, so signals and
  supervisors see one process); returns without doing anything when `malloc_env` says so, when
  the command line cannot be replayed (`sys.orig_argv` does not end with `sys.argv[1:]`: an
  embedded or stdin-fed interpreter), or when the exec fails (logged, the process goes on as it
  is). Call it first thing in an entry point, before any threads start.

  Raises:
    ValueError: from `malloc_env`.
  """
  env = malloc_env(dict(os.environ))
  if env is None:
    return
  argv = [sys.executable, *sys.orig_argv[1:]]
  args = sys.argv[1:]
  if not sys.executable or argv[len(argv) - len(args):] != args or (
      len(sys.orig_argv) > 1 and sys.orig_argv[1] == "-"):
    return
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:
      stream.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError as e:
    print(f"ragjax: could not re-exec with the malloc settings ({e}); continuing without",
          file=sys.stderr)


def describe() -> str:
  """One line for logs: the allocator settings this process runs with."""
  state = "tuned" if tuned() else "glibc defaults or the user's"
  return (f"{state} ({ENV_SWITCH}={os.environ.get(ENV_SWITCH, 'unset')}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})")
