"""The tuned host allocator (`ragjax.hostenv`): environment logic, and the property it exists for,
checked with the kernel's own counter: a jitted function whose temporaries exceed glibc's mmap
threshold page-faults them in again at every call under glibc's defaults, and not once warm
under the tuned settings."""
import json
import os
import platform
import subprocess
import sys

import pytest

from ragjax import hostenv

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc malloc tunables only exist on glibc")
def test_tuned_env_adds_the_tunables_once_and_keeps_the_users():
  env = hostenv.tuned_malloc_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"})
  assert env["PATH"] == "/bin" and env["RAGJAX_MALLOC"] == "tuned"
  assert env["GLIBC_TUNABLES"].split(":") == ["glibc.rtld.nns=2", *hostenv.TUNED_MALLOC]
  assert hostenv.tuned_malloc_env(env) is None  # already tuned: no second exec
  # A malloc tunable the user set is their choice: nothing is added.
  assert hostenv.tuned_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) is None
  assert hostenv.tuned_malloc_env({"RAGJAX_MALLOC": "system"}) is None
  with pytest.raises(ValueError, match="RAGJAX_MALLOC='fast': expected 'tuned' or 'system'"):
    hostenv.tuned_malloc_env({"RAGJAX_MALLOC": "fast"})


PROBE = r"""
import json, os, resource, sys
from ragjax import hostenv
hostenv.reexec_with_tuned_malloc()
import jax, jax.numpy as jnp
x = jnp.arange(16 * 2**20, dtype=jnp.float32)        # 64 MiB
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x)) * jnp.cumsum(jnp.cos(x)))
faults = []
for _ in range(4):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"pid": os.getpid(), "argv": sys.orig_argv[-1], "faults": faults,
                  "mode": os.environ.get("RAGJAX_MALLOC"), "tunables": os.environ.get("GLIBC_TUNABLES")}))
"""


def _probe(**env):
  full = {k: v for k, v in os.environ.items() if k not in ("RAGJAX_MALLOC", "GLIBC_TUNABLES")}
  full.update(JAX_PLATFORMS="cpu", **env)
  proc = subprocess.Popen([sys.executable, "-c", PROBE, "marker-arg"], env=full,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  return proc.pid, json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc tunables only exist on glibc")
def test_reexec_keeps_pid_and_arguments_and_stops_the_per_call_page_faults():
  pid, tuned = _probe()
  _, system = _probe(RAGJAX_MALLOC="system")
  # Same process (execve), same arguments, the tunables set in it.
  assert tuned["pid"] == pid and tuned["argv"] == "marker-arg"
  assert tuned["mode"] == "tuned" and tuned["tunables"] == ":".join(hostenv.TUNED_MALLOC)
  assert system["mode"] == "system" and system["tunables"] is None
  # 64 MiB arrays: each call's temporaries are >= 64 MiB = 16,384 pages of 4 KiB. glibc's
  # default serves them with mmap and returns them with munmap: faulted in at every call.
  assert min(system["faults"][1:]) > 16_384, system
  # Tuned: freed memory stays in the heap; warm calls fault (almost) nothing.
  assert max(tuned["faults"][2:]) < 1_000, tuned
