"""Orbax checkpoints: restore into target shardings, keep-N, config checks, killed saves."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ragjax import sharding
from ragjax.checkpoint import Checkpointer, abstract_with_shardings
from ragjax.errors import CheckpointError


def state(seed=0):
  k = jax.random.key(seed)
  return {"w": jax.random.normal(k, (16, 8)), "b": jnp.arange(8.0), "step": jnp.int32(seed)}


def test_save_restore_into_other_shardings_and_keep_n(tmp_path):
  cfg = {"model": {"width": 8}}
  ckpt = Checkpointer(tmp_path / "c", max_to_keep=2, config=cfg)
  for s in range(4):
    ckpt.save(s, state(s), meta={"index_version": 10 + s})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  mesh = sharding.make_mesh([("data", 4), ("tensor", 2)])
  shardings = {"w": NamedSharding(mesh, P("data", "tensor")), "b": NamedSharding(mesh, P()),
               "step": NamedSharding(mesh, P())}
  target = abstract_with_shardings(jax.eval_shape(state), shardings)
  restored, meta = Checkpointer(tmp_path / "c", config=cfg).restore_or(lambda: None, target)
  assert meta["index_version"] == 13 and meta["step"] == 3
  np.testing.assert_array_equal(restored["w"], state(3)["w"])
  assert restored["w"].sharding == shardings["w"]
  assert restored["w"].addressable_shards[0].data.shape == (4, 4)


def test_incompatible_config_is_refused(tmp_path):
  Checkpointer(tmp_path / "c", config={"model": {"width": 8}}, async_save=False).save(1, state())
  other = Checkpointer(tmp_path / "c", config={"model": {"width": 16}})
  with pytest.raises(CheckpointError, match=r"model.width: 8 -> 16"):
    other.restore_or(lambda: None, jax.eval_shape(state))


def test_fresh_directory_initialises(tmp_path):
  s, meta = Checkpointer(tmp_path / "c").restore_or(lambda: state(5), jax.eval_shape(state))
  assert meta is None and int(s["step"]) == 5


def test_killed_save_is_never_reported(tmp_path):
  # The child stops inside orbax's final rename of step 2 (all data written, not yet committed)
  # and is SIGKILLed there: the worst moment for a reader.
  script = textwrap.dedent(f"""
    import time, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from ragjax.checkpoint import Checkpointer
    ckpt = Checkpointer({str(tmp_path / 'c')!r}, async_save=False)
    ckpt.save(1, {{"w": jnp.ones((4,))}})
    async def stuck(self, *a, **k):
      open({str(tmp_path / 'in_finalize')!r}, "w").close()
      time.sleep(120)
    atomicity.AtomicRenameTemporaryPath.finalize = stuck
    ckpt.save(2, {{"w": jnp.full((4,), 2.0)}})
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (tmp_path / "in_finalize").exists():
    assert time.time() < deadline and proc.poll() is None, "child did not reach the rename"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  ckpt = Checkpointer(tmp_path / "c")
  assert ckpt.latest_step() == 1, os.listdir(tmp_path / "c")
  restored, _ = ckpt.restore(1, jax.eval_shape(lambda: {"w": jnp.ones((4,))}))
  np.testing.assert_array_equal(restored["w"], np.ones(4))


def test_reader_sees_new_steps_and_restores_one_subtree(tmp_path):
  """The read-only view another process uses (the indexer): it lists steps saved after it was
  opened, reads their meta, and restores one sub-tree alone as host numpy arrays."""
  writer = Checkpointer(tmp_path / "c", max_to_keep=5, config={"model": {}}, async_save=False)
  reader = Checkpointer.reader(tmp_path / "c")
  assert reader.all_steps() == [] and reader.latest_step() is None
  tree = {"params": {"a": {"w": jnp.arange(6.0).reshape(2, 3)}, "b": {"w": jnp.ones(4)}},
          "opt": jnp.zeros(3)}
  writer.save(7, tree, meta={"index_version": 3})
  writer.wait()
  assert reader.all_steps() == [7] and reader.latest_step() == 7
  assert reader.metadata(7)["index_version"] == 3
  sub = reader.restore_subtree(7, ("params", "a"))
  assert set(sub) == {"w"} and isinstance(sub["w"], np.ndarray)
  np.testing.assert_array_equal(sub["w"], np.arange(6.0).reshape(2, 3))
  with pytest.raises(FileNotFoundError, match="no such checkpoint"):
    reader.restore_subtree(8, ("params", "a"))
  with pytest.raises(KeyError):
    reader.restore_subtree(7, ("params", "c"))
  with pytest.raises(CheckpointError, match="read-only"):  # it never writes
    reader.save(9, tree)
  writer.close()
