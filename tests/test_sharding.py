"""Mesh, logical axis rules, and the sharded encoder on 8 virtual CPU devices."""
import jax
import numpy as np
import pytest
from flax.core import meta

from conftest import write_tiny_bert
from ragjax import sharding
from ragjax.models.bert import BertConfig, BertEncoder, BiEncoder
from ragjax.models.retriever import load_retriever


def test_make_mesh_sizes_and_errors():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2), ("tensor", 1)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="needs 12 devices, have 8"):
    sharding.make_mesh([("data", 3), ("tensor", 4)])
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    sharding.make_mesh([("data", -1), ("tensor", 3)])
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh([("data", -1), ("tensor", -1)])


def test_check_rules_rejects_unknown_names():
  mesh = sharding.make_mesh([("data", 8)])
  with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
    sharding.check_rules([("embedding", "data")])
  with pytest.raises(ValueError, match="'mlp' -> 'tensor', but the mesh axes are"):
    sharding.check_rules([("mlp", "tensor")], mesh)
  with pytest.raises(ValueError, match="appears twice"):
    sharding.check_rules([("mlp", None), ("mlp", None)])


def test_every_parameter_has_logical_axes():
  cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=32, projection_dim=16)
  ids = np.zeros((2, 8), np.int32)
  boxed = jax.eval_shape(lambda: BiEncoder(cfg).init(jax.random.key(0), (ids, ids), (ids, ids)))
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, meta.Partitioned))
  assert leaves
  for path, leaf in leaves:
    assert isinstance(leaf, meta.Partitioned), f"{jax.tree_util.keystr(path)} has no axis names"
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) - {None} <= set(sharding.LOGICAL_AXES)
  names = {jax.tree_util.keystr(p) for p, _ in leaves}
  assert any("query_encoder" in n for n in names) and any("passage_encoder" in n for n in names)
  shared = jax.eval_shape(lambda: BiEncoder(cfg, shared=True).init(
      jax.random.key(0), (ids, ids), (ids, ids)))
  assert set(shared["params"]) == {"query_encoder"}


def test_sharded_encoder_equals_single_device_and_shards_large_params(tmp_path):
  path, _ = write_tiny_bert(tmp_path / "bert", hidden=64, heads=4, intermediate=128)
  texts = ["who was born in paris ?"] * 3 + ["alice studied physics at the university ."] * 5
  ref = load_retriever(str(path), max_length=32).encode_queries(texts, batch_size=8)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  warnings = []
  r = load_retriever(str(path), max_length=32)
  boxed = jax.eval_shape(lambda: BertEncoder(r.query_cfg).init(
      jax.random.key(0), np.zeros((1, 8), np.int32), np.ones((1, 8), np.int32)))
  sharding.logical_param_shardings(boxed["params"], mesh, sharding.DEFAULT_AXIS_RULES,
                                   log=warnings.append)
  # The tiny vocabulary (53 rows) cannot be split over 2 tensor shards: reported, not silent.
  assert any("word_embeddings" in w and "53" in w for w in warnings)
  r.shard(mesh)
  out = r.encode_queries(texts, batch_size=8)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for path_, leaf in jax.tree_util.tree_leaves_with_path(r.params["query_encoder"]):
    name = jax.tree_util.keystr(path_)
    if leaf.size >= 64 * 64 and "word_embeddings" not in name:
      assert not leaf.sharding.is_fully_replicated, f"{name} is replicated"
