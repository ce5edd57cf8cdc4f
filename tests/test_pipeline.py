"""Step-indexed input: determinism, epochs, per-host slices, and a two-process global batch."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ragjax.data import pipeline


def test_batches_cover_each_epoch_once_in_a_seeded_order():
  n, g = 10, 4
  seen = np.concatenate([pipeline.batch_indices(s, g, n, seed=1) for s in range(5)])  # 2 epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  assert not np.array_equal(seen[:10], seen[10:20]), "each epoch is reshuffled"
  np.testing.assert_array_equal(pipeline.batch_indices(3, g, n, seed=1), seen[12:16])
  assert not np.array_equal(pipeline.batch_indices(0, g, n, seed=2), seen[:4])


def test_host_slices_partition_the_global_batch():
  parts = [pipeline.host_batch_indices(7, 12, 50, 0, process_index=p, process_count=3)
           for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), pipeline.batch_indices(7, 12, 50, 0))
  with pytest.raises(ValueError, match="global batch 12 is not divisible by the 5 processes"):
    pipeline.local_batch_size(12, 5)


WORKER = textwrap.dedent("""
  import json, sys
  import jax, numpy as np
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(sys.argv[1], num_processes=int(sys.argv[2]), process_id=int(sys.argv[3]))
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ragjax.data import pipeline
  from ragjax import sharding
  mesh = sharding.make_mesh([("data", -1)])
  data = np.arange(40 * 3, dtype=np.float32).reshape(40, 3) ** 1.5
  idx = pipeline.host_batch_indices(step=5, global_batch=8, num_examples=40, seed=3)
  batch = pipeline.global_batch_arrays({"x": data[idx]}, NamedSharding(mesh, P("data")))
  total = jax.jit(lambda x: (x * jax.numpy.arange(1, 9)[:, None]).sum())(batch["x"])
  print(json.dumps({"pid": jax.process_index(), "devices": jax.device_count(),
                    "value": float(total)}))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("num_processes", [1, 2])
def test_multi_process_global_batch_equals_single_process(num_processes):
  data = np.arange(40 * 3, dtype=np.float32).reshape(40, 3) ** 1.5
  idx = pipeline.batch_indices(5, 8, 40, seed=3)
  expected = float((data[idx] * np.arange(1, 9)[:, None]).sum())
  addr = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, addr, str(num_processes), str(p)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for p in range(num_processes)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-2000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  for o in outs:
    assert o["devices"] == 2 * num_processes
    assert o["value"] == pytest.approx(expected, rel=1e-6)
