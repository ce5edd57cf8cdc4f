"""Host/device-sharded exact top-k (`topk.sharded_top_k`): every shard's local top-k merged into
one global top-k equals the top-k of one device over the whole corpus and numpy brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from ragjax.retrieval.topk import device_top_k, rows_on_mesh, sharded_top_k


def _data(n, d, b, seed):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)).astype(np.float32),
          rng.standard_normal((b, d)).astype(np.float32))


@pytest.mark.parametrize("n,k,shape", [(1003, 10, (8,)), (64, 20, (2, 4)), (9, 9, (8,))])
def test_sharded_top_k_equals_one_device_and_brute_force(n, k, shape):
  """Ragged N (padding rows on the last shards), k above a shard's rows (9 rows on 8 shards)
  and a 2-D mesh sharded over both axes; token payload rows come from the owning shard."""
  names = ("data", "fsdp")[:len(shape)]
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))
  corpus, q = _data(n, 16, 5, n)
  tokens = np.arange(n * 3, dtype=np.int32).reshape(n, 3)
  put = lambda x: rows_on_mesh(x, mesh, names)
  fn = jax.jit(lambda q_, c, t: sharded_top_k(q_, c, k, mesh=mesh, axes=names, num_rows=n,
                                              payloads=(t,), chunk=50))
  top, (tok,) = fn(jnp.asarray(q), put(corpus), put(tokens))
  want_rows = np.argsort(-(q @ corpus.T), axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.asarray(top.doc_ids), want_rows)
  one = device_top_k(jnp.asarray(q), jnp.asarray(corpus), k)
  np.testing.assert_array_equal(np.asarray(top.doc_ids), np.asarray(one.doc_ids))
  np.testing.assert_allclose(np.asarray(top.scores), np.asarray(one.scores), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(top.embeddings), corpus[want_rows])
  np.testing.assert_array_equal(np.asarray(tok), tokens[want_rows])


def test_sharded_top_k_refuses_uneven_rows_and_k_beyond_the_corpus():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  corpus, q = _data(12, 4, 2, 0)
  with pytest.raises(ValueError, match="do not split over 8 shards"):
    sharded_top_k(jnp.asarray(q), jnp.asarray(corpus), 2, mesh=mesh, axes="data", num_rows=12)
  with pytest.raises(ValueError, match=r"k=17 must be in \[1, N=12\]"):
    sharded_top_k(jnp.asarray(q), rows_on_mesh(corpus, mesh, 'data'), 17, mesh=mesh,
                  axes="data", num_rows=12)


def _feeder_batch(tmp_path, mesh_axes, num_devices, **extra):
  from ragjax import config as config_lib
  from ragjax.training.loop import Run
  from ragjax.training.state import init_state
  overrides = {"mesh.axes": mesh_axes, "mesh.num_devices": num_devices,
               "train.tensorboard": "false", "data.num_people": 61, **extra}
  cfg = config_lib.apply_overrides(config_lib.load_config("experiments/bios.py:smoke"),
                                   [f"{k}={v}" for k, v in overrides.items()])
  run = Run(cfg, tmp_path)
  state = init_state(run.model, run.tx, run.shapes, run.system.host_towers(), 0)
  run.feeder.set_corpus(run.corpus_embeddings(state.params))
  qs = run.system.train_questions[:8]
  batch = run.feeder.batch(state.params, qs)
  deep = run.feeder.top_rows(state.params, run.feeder.query_batch(qs), 7)
  return run, jax.tree.map(np.asarray, jax.device_get(batch)), deep


# The plain feeder ({}: ~20 s) in the slow tier; CI keeps the case that also re-encodes and
# re-ranks over the sharded corpus, which runs the plain path's search and gathers too.
@pytest.mark.parametrize("extra", [pytest.param({}, marks=pytest.mark.slow), {"model.reencode_passages": "true", "optim.freeze": "()",
                                        "index.refresh.mode": "async",
                                        "index.refresh.spawn_indexer": "false",
                                        "model.rerank_candidates": 5}])
def test_feeder_on_a_sharded_corpus_builds_the_single_device_batch(tmp_path, extra):
  """61 passages over 8 corpus shards (3 padding rows): the step batch (rows, vectors, generator
  contexts, re-encoding tokens; Atlas re-ranking of 5 candidates) and a deeper search equal the
  one-device feeder's."""
  one_run, one, one_deep = _feeder_batch(tmp_path / "one", "(('data', 1), ('fsdp', 1), "
                                         "('tensor', 1))", 1, **extra)
  run, eight, deep = _feeder_batch(tmp_path / "eight", "(('data', 8), ('fsdp', 1), "
                                   "('tensor', 1))", 8, **extra)
  assert len(run.system.passages) == 61 and run.feeder.corpus_axes == ("data", "fsdp")
  assert run.feeder.corpus.shape[0] == 64 and len(run.feeder.corpus.sharding.device_set) == 8
  assert set(one) == set(eight)
  for key in one:
    np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(deep, one_deep)
  assert deep.max() < 61


_WORKER = r'''
import json, sys
import jax, numpy as np
from jax.sharding import AxisType
from ragjax.retrieval.topk import rows_on_mesh, sharded_top_k
pid, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
corpus = np.load(path, mmap_mode="r")
read = set()
class Rows:  # a memmap that records which rows this process reads
  shape = corpus.shape
  def __getitem__(self, s):
    read.update(range(*s.indices(corpus.shape[0])))
    return corpus[s]
q = np.random.default_rng(1).standard_normal((6, corpus.shape[1])).astype(np.float32)
top, _ = jax.jit(lambda q_, c: sharded_top_k(q_, c, 10, mesh=mesh, axes="data",
                                             num_rows=corpus.shape[0], chunk=64))(
    rows_on_mesh(q, mesh), rows_on_mesh(Rows(), mesh, "data"))
rows = np.asarray(top.doc_ids.addressable_data(0))
json.dump({"rows": rows.tolist(), "read": sorted(read)}, open(out, "w"))
'''


def test_two_processes_each_read_half_the_corpus_and_return_the_global_top_k(tmp_path):
  """2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo): each process pages in
  only the rows of its own 4 shards from a memmapped [1003, 16] corpus, and both return the
  top-10 of numpy brute force over the whole corpus."""
  from test_multiprocess_train import run_python_workers
  corpus, _ = _data(1003, 16, 6, 7)
  q = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
  np.save(tmp_path / "corpus.npy", corpus)
  outs = run_python_workers(tmp_path, _WORKER, [tmp_path / "corpus.npy"])
  want = np.argsort(-(q @ corpus.T), axis=1, kind="stable")[:, :10]
  shard = 1008 // 8   # 1003 rows padded to 1008: 126 per device, 4 devices per process
  for i in range(2):
    got = outs[i]
    np.testing.assert_array_equal(np.asarray(got["rows"]), want)
    assert got["read"] == list(range(4 * shard * i, min(4 * shard * (i + 1), 1003)))
