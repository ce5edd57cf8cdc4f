"""AOT compile of a sharded train step for a TPU slice on this CPU-only machine.

libtpu's compile-only devices stand in for a v5e 2x2 slice (4 chips, mesh data=2 x fsdp=2);
the step is lowered from `jax.ShapeDtypeStruct`s carrying `NamedSharding`s, compiled by XLA:TPU,
and its per-device memory checked against the chip's HBM. CPU stays JAX's default backend.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ragjax.training import aot

pytest.importorskip(
    "libtpu", reason=f"libtpu not installed, so no compile-only TPU devices: "
    f"pip install '{aot.libtpu_requirement()}'")

TOPOLOGY = "v5e:2x2"
D, H, B = 128, 512, 64   # model width, MLP width, global batch


def _init(rng, tx):
  """Train state of a 2-layer MLP: params, adamw moments, step."""
  k1, k2 = jax.random.split(rng)
  params = {"w1_dh": jax.random.normal(k1, (D, H)) * D**-0.5, "b1_h": jnp.zeros((H,)),
            "w2_hd": jax.random.normal(k2, (H, D)) * H**-0.5}
  return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def _train_step(state, batch, tx):
  """One adamw step on a regression loss; -> (state, metrics)."""
  def loss_fn(p, x_bd, y_bd):
    h_bh = jax.nn.gelu(x_bd @ p["w1_dh"] + p["b1_h"])   # [B, H]
    return jnp.mean((h_bh @ p["w2_hd"] - y_bd) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"], *batch)
  updates, opt = tx.update(grads, state["opt"], state["params"])
  state = {"params": optax.apply_updates(state["params"], updates), "opt": opt,
           "step": state["step"] + 1}
  return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@pytest.fixture(scope="module")
def compiled_step():
  """(report, abstract state, mesh) for the train step compiled for the v5e 2x2 slice."""
  mesh = aot.tpu_mesh(TOPOLOGY, [("data", 2), ("fsdp", -1)])
  tx = optax.adamw(1e-3, weight_decay=0.01)
  abstract = jax.eval_shape(lambda rng: _init(rng, tx), jax.random.key(0))
  # FSDP: matrices (and their adam moments) split on their first axis, the rest replicated.
  state_sh = jax.tree.map(
      lambda x: NamedSharding(mesh, P("fsdp", None) if x.ndim == 2 else P()), abstract)
  batch_sh = NamedSharding(mesh, P(("data", "fsdp"), None))   # [B, D]: B over all 4 chips
  step = jax.jit(lambda s, b: _train_step(s, b, tx), in_shardings=(state_sh, (batch_sh,) * 2),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
  state_sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           abstract, state_sh)
  batch_sds = (jax.ShapeDtypeStruct((B, D), jnp.float32, sharding=batch_sh),) * 2
  report = aot.compile_report(step, state_sds, batch_sds)
  print("\n" + aot.format_report(report))
  return report, abstract, mesh


def test_train_step_fits_v5e(compiled_step):
  report, abstract, mesh = compiled_step
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
  assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4
  assert report["hbm_bytes"] == aot.HBM_BYTES["v5e"] == 16 * aot.GiB
  # Per device: the state's matrices are split in 2 (fsdp), the batch in 4; TPU tiling may pad.
  state_bytes = sum(x.size * x.dtype.itemsize // (2 if x.ndim == 2 else 1)
                    for x in jax.tree.leaves(abstract))
  batch_bytes = 2 * B * D * 4 // 4
  assert state_bytes + batch_bytes <= report["argument_bytes"] <= 1.5 * (state_bytes + batch_bytes)
  assert report["alias_bytes"] >= 0.9 * state_bytes     # the donated state is updated in place
  assert 0 < report["total_bytes"] <= report["required_bytes"] < report["hbm_bytes"]
  assert report["fits"] and report["headroom_bytes"] > 0
  assert report["flops"] and report["flops"] > 0
  assert report["compile_seconds"] < 30


def test_train_step_collectives(compiled_step):
  """FSDP: weights gathered for the matmuls, gradients reduced (scattered) back to shards."""
  counts = compiled_step[0]["collectives"]
  assert counts["all-gather"] > 0, counts
  assert counts["reduce-scatter"] + counts["all-reduce"] > 0, counts


def test_cpu_stays_default_backend(compiled_step):
  assert jax.default_backend() == "cpu"
  assert jnp.ones(3).sum() == 3
  assert all(d.platform == "cpu" for d in jax.devices())


def test_bad_mesh_and_topology_errors():
  with pytest.raises(ValueError, match=r"'v5e:2x2' has 4 devices.*\(3\) do not divide"):
    aot.tpu_mesh(TOPOLOGY, [("data", 3), ("fsdp", -1)])
  with pytest.raises(ValueError, match="needs 8 devices, have 4"):
    aot.tpu_mesh(TOPOLOGY, [("data", 2), ("fsdp", 4)])
  with pytest.raises(ValueError, match="unknown generation 'v9'"):
    aot.tpu_mesh("v9:2x2", [("data", -1)])
  with pytest.raises(ValueError, match="expected '<generation>:<AxB"):
    aot.tpu_mesh("v5e-8", [("data", -1)])
  with pytest.raises(ValueError, match="libtpu refused it"):
    aot.tpu_mesh("v5e:3x3", [("data", -1)])


def test_missing_libtpu_names_the_package(monkeypatch):
  from jax._src import xla_bridge as xb
  from jax._src.lib import xla_client
  monkeypatch.setattr(xla_client, "pjrt_plugin_loaded", lambda name: False)
  monkeypatch.setattr(xb, "get_tpu_library_path", lambda: None)
  with pytest.raises(ImportError, match=r"pip install 'libtpu=="):
    aot.tpu_devices("v6e:4x4")   # not cached yet


def test_devices_per_chip_and_hbm():
  assert aot.parse_topology("v7x:2x2x1") == ("tpu7x", (2, 2, 1))
  devices = aot.tpu_devices("v4:2x2x1")            # megacore: one device per chip
  assert len(devices) == 4 and aot.device_hbm_bytes(devices) == 32 * aot.GiB
  devices = aot.tpu_devices("v4:2x2x1", chip="default")   # one device per TensorCore
  assert len(devices) == 8 and aot.device_hbm_bytes(devices) == 16 * aot.GiB
  assert aot.device_hbm_bytes(jax.devices()) is None
  assert np.isclose(aot.HBM_BYTES["v5p"] / aot.GiB, 95)
