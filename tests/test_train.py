"""The trainer's pieces: context assembly, optimiser groups, the jitted step on a mesh, retrieval
feeding, non-finite stops and the CLI's errors. Tiny random towers (the smoke config)."""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragjax import config as config_lib
from ragjax.system import feed
from ragjax.training import optim, state as train_state, step as train_step
from ragjax.cli import main
from rag_helpers import build_context_inputs
from ragjax.system.build import build_system
from ragjax.system.inputs import assemble_contexts


ONE_DEVICE = "(('data', 1), ('fsdp', 1), ('tensor', 1))"


def smoke(**overrides):
  """The bios smoke config; on one device unless `mesh.axes` is overridden (compiling for the
  8 virtual devices is what makes a test slow)."""
  n = int(np.prod([int(x) for x in re.findall(r"\d+", overrides.get("mesh.axes", ONE_DEVICE))]))
  overrides = {"mesh.axes": ONE_DEVICE, "mesh.num_devices": n, "train.tensorboard": False,
               **overrides}
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  return config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def system():
  return build_system(smoke(**{"model.context_max_length": 128}))


def test_assembled_contexts_equal_tokenizing_the_joined_string(system):
  """Passage table + question part == HF-style `title / text // question` tokenized whole."""
  qs = system.train_questions[:3]
  rows = np.array([[0, 5], [7, 1], [2, 2]])
  host = system.question_batch(qs)
  t = system.tables
  got_np = assemble_contexts(t.ids, t.lengths, host["question_ids"], host["question_lengths"],
                             rows, system.gen_tok.pad, xp=np)
  got_jnp = jax.jit(lambda *a: assemble_contexts(*a, system.gen_tok.pad))(
      t.ids, t.lengths, host["question_ids"], host["question_lengths"], rows)
  from ragjax.data.tokenize import WordPieceTokenizer
  from ragjax.models import hf_import
  tok = WordPieceTokenizer.from_dir(hf_import.minilm_dir(verify=False), max_length=512)
  ps = system.passages
  want = build_context_inputs([[ps[r].title for r in row] for row in rows],
                              [[ps[r].text for r in row] for row in rows],
                              [q.question for q in qs], tok, 128)
  assert all(l + q <= 128 for l in t.lengths[rows.ravel()] for q in host["question_lengths"])
  np.testing.assert_array_equal(got_np[0], want[0])
  np.testing.assert_array_equal(got_np[1], want[1])
  np.testing.assert_array_equal(np.asarray(got_jnp[0]), want[0])


def test_long_passages_are_cut_so_the_question_stays(system):
  t = system.tables
  host = system.question_batch(system.train_questions[:1])
  ids, mask = assemble_contexts(t.ids[:, :20], np.minimum(t.lengths, 19), host["question_ids"],
                                host["question_lengths"], np.array([[0]]), 0, xp=np)
  q = host["question_ids"][0, :host["question_lengths"][0]]
  assert mask.sum() == 20 and list(ids[0, 0, 20 - len(q):]) == list(q)


def test_schedule_warmup_then_linear_decay():
  o = smoke().optim
  o.learning_rate, o.warmup_steps, o.schedule, o.end_lr_fraction = 1e-3, 10, "linear", 0.1
  s = optim.learning_rate_schedule(o, 110)
  for step, want in ((0, 0.0), (5, 5e-4), (10, 1e-3), (60, 1e-3 - 0.5 * 9e-4), (110, 1e-4)):
    assert math.isclose(float(s(step)), want, rel_tol=1e-5, abs_tol=1e-9), step


def test_adamw_groups_multipliers_and_freezing():
  """Adam's first update is -lr * g / (|g| + eps) = -lr * sign(g) (Kingma & Ba 2015, alg. 1
  with bias correction): each tower moves by lr * its multiplier, a frozen tower not at all."""
  o = smoke().optim
  o.learning_rate, o.warmup_steps, o.schedule, o.weight_decay, o.clip_grad_norm = \
      1e-2, 0, "constant", 0.0, 0.0
  o.lr_multipliers.query_encoder, o.lr_multipliers.generator = 0.5, 2.0
  o.freeze = ("passage_encoder",)
  tx, _ = optim.make_optimizer(o, 10)
  params = {"bi_encoder": {"query_encoder": {"w": jnp.ones((2, 3))},
                           "passage_encoder": {"w": jnp.ones((2, 3))}},
            "generator": {"w": jnp.ones((4,))}}
  grads = jax.tree.map(lambda x: jnp.full_like(x, -3.0), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["bi_encoder"]["query_encoder"]["w"], 0.5e-2, rtol=1e-5)
  np.testing.assert_allclose(updates["generator"]["w"], 2e-2, rtol=1e-5)
  np.testing.assert_array_equal(updates["bi_encoder"]["passage_encoder"]["w"], 0.0)
  with pytest.raises(config_lib.ConfigError, match="optim.freeze.*quary"):
    o.freeze = ("quary_encoder",)
    optim.make_optimizer(o, 10)


class Harness:
  """One built run (mesh, system, optimiser, state, feeder) for step-level tests."""

  def __init__(self, cfg, tmp_path):
    from ragjax.training.loop import Run
    self.run = Run(cfg, tmp_path)
    self.initial = train_state.init_state(self.run.model, self.run.tx, self.run.shapes,
                                    self.run.system.host_towers(), int(cfg.seed))
    self.reset()
    self.run.feeder.set_corpus(self.run.corpus_embeddings(self.state.params))
    self.step = train_step.jit_train_step(self.run.model, cfg, self.run.tx, self.run.schedule,
                                     self.run.shapes, self.run.mesh, self.run.rules)

  def reset(self):
    """Back to the initial state (a copy: the step donates the state it is given)."""
    self.state = jax.tree.map(jnp.copy, self.initial)
    return self

  def batch(self, n, start=0):
    qs = self.run.system.train_questions[start:start + n]
    return self.run.feeder.batch(self.state.params, qs)


@pytest.fixture(scope="module")
def h1(tmp_path_factory):
  """The smoke run on one device without dropout, shared by the step-level tests."""
  return Harness(smoke(**{"generator.dropout_rate": 0.0}), tmp_path_factory.mktemp("h1"))


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def eight_device_harness(workdir, **overrides):
  """The smoke run without dropout on a (data 2, fsdp 2, tensor 2) mesh, checked to shard its
  parameters over fsdp and tensor."""
  h8 = Harness(smoke(**{"generator.dropout_rate": 0.0,
                        "mesh.axes": "(('data', 2), ('fsdp', 2), ('tensor', 2))", **overrides}),
               workdir)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(h8.state.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  return h8


def test_sharded_step_equals_single_device_and_compiles_once(tmp_path, h1):
  h1.reset()
  h8 = eight_device_harness(tmp_path / "eight")
  rng = jax.random.key(0)
  losses = {}
  for name, h in (("one", h1), ("eight", h8)):
    out = []
    for i in range(3):
      old_leaf = jax.tree.leaves(h.state.params)[0]
      h.state, m = h.step(h.state, h.batch(8, 8 * i), rng)
      assert old_leaf.is_deleted()  # the state was donated
      out.append(float(m["loss"]))
    losses[name] = out
    assert h.step.jitted._cache_size() == 1  # one compilation for all steps
  # Steps 2 and 3 run on parameters updated by the earlier steps, so equal losses also mean
  # equal updates (parameters themselves are not compared: Adam's g / (|g| + eps) turns
  # reduction-order noise in near-zero gradients into differences of up to 2 lr).
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-5)


def test_grad_accumulation_equals_the_full_batch(tmp_path, h1):
  full = h1.reset()
  acc = Harness(smoke(**{"generator.dropout_rate": 0.0, "train.grad_accum_steps": 2}),
                tmp_path / "acc")
  batch = full.batch(8)
  rng = jax.random.key(1)
  s_full, m_full = full.step(full.state, batch, rng)
  s_acc, m_acc = acc.step(acc.state, acc.batch(8), rng)
  np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               _host(s_full.params), _host(s_acc.params))


def test_frozen_passage_encoder_is_unchanged_and_query_encoder_learns(h1):
  h = h1.reset()
  before = _host(h.state.params)
  for i in range(2):  # step 0 has learning rate 0 (linear warm-up from 0)
    h.state, _ = h.step(h.state, h.batch(8, 8 * i), jax.random.key(0))
  after = _host(h.state.params)
  same = jax.tree.map(np.array_equal, before["bi_encoder"]["passage_encoder"],
                      after["bi_encoder"]["passage_encoder"])
  assert all(jax.tree.leaves(same))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       before["bi_encoder"]["query_encoder"], after["bi_encoder"]["query_encoder"])
  assert any(jax.tree.leaves(moved))  # the RAG loss reaches the query encoder through eq. 1


@pytest.mark.slow  # ~35 s of compilation for one dtype check
def test_bfloat16_compute_keeps_float32_params(tmp_path, h1):
  h32 = h1.reset()
  h16 = Harness(smoke(**{"generator.dropout_rate": 0.0, "model.compute_dtype": "bfloat16"}),
                tmp_path / "bf16")
  rng = jax.random.key(0)
  _, m32 = h32.step(h32.state, h32.batch(8), rng)
  h16.state, m16 = h16.step(h16.state, h16.batch(8), rng)
  assert {x.dtype for x in jax.tree.leaves(h16.state.params)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=3e-2)


@pytest.mark.slow  # two more compilations on 8 devices (~2 min)
def test_bfloat16_with_grad_accumulation_on_8_devices_matches_one_device(tmp_path, h1):
  """bfloat16 compute with 2 micro-batches on a (data 2, fsdp 2, tensor 2) mesh, fsdp and tensor
  rules on: 3 steps run and their losses stay within 3e-2 (relative) of the float32 full-batch
  run on one device, as the single-device bf16 check above (bf16 keeps 8 mantissa bits)."""
  h32 = h1.reset()
  h8 = eight_device_harness(tmp_path / "bf16x8", **{"model.compute_dtype": "bfloat16",
                                                     "train.grad_accum_steps": 2})
  rng = jax.random.key(0)
  out = {}
  for name, h in (("f32", h32), ("bf16x8", h8)):
    losses = []
    for i in range(3):
      h.state, m = h.step(h.state, h.batch(8, 8 * i), rng)
      assert float(m["finite"]) == 1.0
      losses.append(float(m["loss"]))
    out[name] = losses
  assert {x.dtype for x in jax.tree.leaves(h8.state.params)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(out["bf16x8"], out["f32"], rtol=3e-2)


def test_nonfinite_step_is_skipped_and_recorded(h1):
  h = h1.reset()
  batch = h.batch(8)
  batch["passage_embeddings"] = batch["passage_embeddings"] * jnp.nan
  before = _host(h.state.params)
  h.state, m = h.step(h.state, batch, jax.random.key(0))
  assert float(m["finite"]) == 0.0 and int(h.state.nonfinite_step) == 0
  jax.tree.map(np.testing.assert_array_equal, before, _host(h.state.params))


def test_device_top_k_and_host_exact_index_feed_the_same_batch(h1):
  dev = h1.reset()
  assert dev.run.feeder.kind == "device"
  host_feeder = feed.Feeder(dev.run.system, dev.run.mesh, dev.run.rules, "exact_host")
  host_feeder.set_corpus(dev.run.corpus_embeddings(dev.state.params))
  a, b = dev.batch(8), host_feeder.batch(dev.state.params, dev.run.system.train_questions[:8])
  for key in ("doc_ids", "context_input_ids", "context_attention_mask"):
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
  np.testing.assert_allclose(np.asarray(a["passage_embeddings"]),
                             np.asarray(b["passage_embeddings"]), rtol=1e-6)


def test_deep_rows_for_recall_beyond_k_equal_brute_force_search(h1):
  """`Feeder.top_rows` (answer recall@k for k > K) against numpy inner products, both kinds."""
  dev = h1.reset()
  emb = dev.run.corpus_embeddings(dev.state.params)
  host_feeder = feed.Feeder(dev.run.system, dev.run.mesh, dev.run.rules, "exact_host")
  host_feeder.set_corpus(emb)
  batch = dev.batch(8)
  q = np.asarray(dev.run.feeder._encode_fn()(dev.state.params, batch["query_input_ids"],
                                             batch["query_attention_mask"]))
  want = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :5]
  for feeder in (dev.run.feeder, host_feeder):
    rows = feeder.top_rows(dev.state.params, batch, 5)
    assert rows.shape == (8, 5)
    np.testing.assert_array_equal(rows[:, :2], np.asarray(batch["doc_ids"]))
    np.testing.assert_array_equal(rows, want)


def test_training_loop_stops_on_nonfinite_loss_naming_step_and_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
  real = feed.Feeder.batch
  calls = {"n": 0}

  def poisoned(self, params, questions):
    out = real(self, params, questions)
    calls["n"] += 1
    if calls["n"] == 3:  # step index 2
      out["passage_embeddings"] = out["passage_embeddings"] * jnp.nan
    return out
  monkeypatch.setattr(feed.Feeder, "batch", poisoned)
  rc = main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(tmp_path),
             "--config.train.total_steps=6", "--config.train.tensorboard=false",
             "--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))", "--config.mesh.num_devices=1"])
  err = capsys.readouterr().err
  assert rc == 2
  assert "non-finite loss or gradient at step 2" in err and "checkpoint: step 2" in err, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained for 2 steps by the CLI (one device)."""
  w = tmp_path_factory.mktemp("trained")
  assert main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(w),
               "--config.train.total_steps=2", "--config.train.tensorboard=false",
               "--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
               "--config.mesh.num_devices=1"]) == 0
  return w


def test_cli_config_errors(tmp_path, capsys, trained):
  def run(*extra):
    rc = main(["train", "--config", "experiments/bios.py:smoke", "--workdir",
               str(tmp_path / "w"), *extra])
    return rc, capsys.readouterr().err
  rc, err = run("--config.train.totl_steps=3")
  assert rc == 2 and "totl_steps" in err and "total_steps" in err
  rc, err = run("--config.mesh.axes=(('data', 3), ('fsdp', 1), ('tensor', 1))")
  assert rc == 2 and "mesh" in err and "have 8" in err, err
  rc, err = run("--config.train.global_batch=6")
  assert rc == 2 and "not divisible by the data-parallel size 8" in err
  rc, err = run("--config.eval.batch_size=6")
  assert rc == 2 and "eval.batch_size=6" in err, err
  rc, err = run("--config.optim.freeze=()")
  assert rc == 2 and "needs model.reencode_passages=true" in err, err
  rc, err = run("--config.data.source=files", "--config.data.corpus=/no/such.jsonl")
  assert rc == 2 and "/no/such.jsonl" in err and "data.corpus" in err
  capsys.readouterr()
  rc = main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(trained),
             "--config.generator.random.d_model=48", "--config.train.total_steps=4",
             "--config.mesh.num_devices=1", "--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))"])
  err = capsys.readouterr().err
  assert rc == 2 and "incompatible config" in err and "d_model" in err, err
  saved = json.loads((trained / "config.json").read_text())["config"]
  assert saved["generator"]["random"]["d_model"] == 32  # the refused run changed nothing


def test_eval_and_generate_commands(trained, capsys):
  w, tmp_path = str(trained), trained
  capsys.readouterr()
  assert main(["eval", "--workdir", w, "--max-questions", "8"]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  report = json.loads((tmp_path / "eval" / "step_2.eval.max8.json").read_text())
  assert printed["exact_match"] == report["exact_match"] and report["num_questions"] == 8
  assert json.loads((tmp_path / "eval" / "step_2.json").read_text())["num_questions"] == 16
  from ragjax.evaluation import metrics as em_metrics
  ex = report["examples"]
  assert report["exact_match"] == np.mean([em_metrics.exact_match(e["prediction"], e["answers"])
                                           for e in ex])
  assert main(["generate", "--workdir", w, "--json", "Where was Ximena Costa born?"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["step"] == 2 and len(out["passages"]) == 2
  assert math.isclose(sum(p["p"] for p in out["passages"]), 1.0, rel_tol=1e-5)


def test_scann_on_the_host_feeds_the_step_batch_like_exact_search(h1):
  """ScaNN (asymmetric hashing + exact re-ordering on this small corpus) in the input pipeline:
  same shapes and dtypes as on-device top-k, and the same passages for almost every question."""
  dev = h1.reset()
  scann = feed.Feeder(dev.run.system, dev.run.mesh, dev.run.rules, "scann")
  scann.set_corpus(dev.run.corpus_embeddings(dev.state.params))
  qs = dev.run.system.train_questions[:16]
  a, b = dev.run.feeder.batch(dev.state.params, qs), scann.batch(dev.state.params, qs)
  for key in train_step.batch_shapes(dev.run.cfg, dev.run.model, dev.run.mesh, dev.run.rules):
    assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
  same = np.mean(np.asarray(a["doc_ids"])[:, 0] == np.asarray(b["doc_ids"])[:, 0])
  assert same >= 0.9, same
  state, m = dev.step(dev.state, b, jax.random.key(0))
  assert np.isfinite(float(m["loss"]))
