"""Joint retriever training: refresh schedules, index versions (publish, load, garbage
collection), the passage encoder read alone from a checkpoint, REALM re-encoding inside the step,
index switches without recompiling, the synchronous mode and the config checks. Tiny random
towers (the bios smoke config). Crash safety with real subprocesses: test_indexer_crash.py."""
import json
import re

import jax
import numpy as np
import pytest

from ragjax import config as config_lib, fsutil
from ragjax.joint import indexer, versions
from ragjax.training import optim, state as train_state, step as train_step
from ragjax.errors import ConfigError
from ragjax.errors import IndexFormatError
from ragjax.models.rag import batch_doc_scores
from ragjax.training.loop import Run
from ragjax.training.loop import train as train_run

ONE_DEVICE = "(('data', 1), ('fsdp', 1), ('tensor', 1))"
JOINT = {"optim.freeze": "()", "model.reencode_passages": "true",
         "index.refresh.mode": "async", "index.refresh.spawn_indexer": "false"}


def smoke(**overrides):
  overrides = {"mesh.axes": ONE_DEVICE, "mesh.num_devices": 1, "train.tensorboard": "false",
               "generator.dropout_rate": 0.0, **overrides}
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  return config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in overrides.items()])


# ------------------------------------------------------------------------------- schedules

def test_atlas_schedule_exports_every_n_steps_within_each_range():
  s = config_lib.RefreshSchedule.parse("0-1000:500,1000-10000:1000")
  assert [n for n in range(0, 4001) if s.exports(n)] == [500, 1000, 2000, 3000, 4000]
  assert not s.asap and config_lib.RefreshSchedule.parse("asap").asap
  assert not any(config_lib.RefreshSchedule.parse("").exports(n) for n in range(100))
  for bad in ("0-100", "100-0:10", "a-b:c", "0-100:0"):
    with pytest.raises(ValueError, match="index.refresh.schedule"):
      config_lib.RefreshSchedule.parse(bad)


# -------------------------------------------------------------------------------- versions

def _publish(workdir, step, emb, ids=("a", "b", "c")):
  return versions.publish_version(workdir, step, emb, passage_ids=list(ids), corpus_sha256="c0ffee",
                            encoder={"name": "test"})


def test_published_version_round_trips_and_a_killed_publish_is_invisible(tmp_path):
  emb = np.arange(12, dtype=np.float32).reshape(3, 4)
  manifest = _publish(tmp_path, 7, emb)
  assert manifest["checkpoint_step"] == 7 and manifest["count"] == 3 and manifest["dim"] == 4
  got, man, _ = versions.load_version(tmp_path, 7, expect_count=3, expect_dim=4,
                                expect_corpus="c0ffee")
  np.testing.assert_array_equal(got, emb)
  # A publish that dies half-way leaves only a temporary sibling: never listed, never loaded.
  with pytest.raises(KeyboardInterrupt):
    with fsutil.atomic_directory(versions.index_dir(tmp_path) / "9") as tmp:
      np.save(tmp / "embeddings.npy", emb)
      raise KeyboardInterrupt
  (versions.index_dir(tmp_path) / ".9.tmp-killed").mkdir()  # what a SIGKILL leaves
  assert versions.version_steps(tmp_path) == [7] and versions.latest_version(tmp_path) == 7
  with pytest.raises(IndexFormatError, match="count 3, expected 5"):
    versions.load_version(tmp_path, 7, expect_count=5, expect_dim=4)
  with pytest.raises(IndexFormatError, match="corpus_sha256"):
    versions.load_version(tmp_path, 7, expect_count=3, expect_dim=4, expect_corpus="other")
  versions.collect_garbage(tmp_path, keep=2)
  assert not (versions.index_dir(tmp_path) / ".9.tmp-killed").exists()


def test_garbage_collection_keeps_newest_and_versions_kept_checkpoints_use(tmp_path):
  emb = np.ones((3, 2), np.float32)
  for step in (0, 10, 20, 30, 40):
    _publish(tmp_path, step, emb)
  meta = tmp_path / "checkpoints" / "35" / "meta"
  meta.mkdir(parents=True)
  (meta / "metadata").write_text(json.dumps({"step": 35, "index_version": 10}))
  (versions.index_dir(tmp_path) / ".job-20").mkdir()  # overtaken by version 40
  deleted = versions.collect_garbage(tmp_path, keep=2)
  assert deleted == [0, 20] and versions.version_steps(tmp_path) == [10, 30, 40]
  assert not (versions.index_dir(tmp_path) / ".job-20").exists()


# ------------------------------------------------------------------------- against a run

@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
  """A 6-step joint run (trainable passage encoder, REALM re-encoding, asynchronous mode with no
  indexer running, a checkpoint every 3 steps)."""
  workdir = tmp_path_factory.mktemp("joint")
  cfg = smoke(**JOINT, **{"train.total_steps": 6, "train.checkpoint_every": 3})
  summary = train_run(cfg, workdir)
  return cfg, workdir, summary


def test_staleness_grows_while_no_version_is_published(joint_run):
  _, workdir, summary = joint_run
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["index_version"] for r in records] == [0] * 6
  assert [r["index_staleness_steps"] for r in records] == [0, 1, 2, 3, 4, 5]
  assert summary["index_refresh"]["staleness"]["max"] == 5
  assert (workdir / "index" / versions.END_MARKER).is_file()  # the end marker for indexers


def test_passage_encoder_trains_and_is_read_alone_from_the_checkpoint(joint_run):
  cfg, workdir, _ = joint_run
  run = Run(cfg, workdir)
  state, _ = run.restore_latest()
  tower = indexer.restore_passage_encoder(workdir, 6)
  want = jax.tree.map(np.asarray, state.params["bi_encoder"]["passage_encoder"])
  jax.tree.map(np.testing.assert_array_equal, tower, want)
  initial = run.system.retriever.params["passage_encoder"]  # what embedded version 0
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(tower)))
  assert moved > 1e-4  # the REALM re-encoding carried a gradient to it
  # The safetensors copy a job keeps is the same pytree.
  indexer.save_tower(workdir / "tower.safetensors", tower)
  jax.tree.map(np.testing.assert_array_equal, indexer.load_tower(workdir / "tower.safetensors"),
               tower)


def test_reencoded_scores_equal_index_scores_when_the_index_is_fresh(tmp_path):
  """REALM re-encoding with the parameters that embedded the index gives the index's scores;
  its gradient reaches the passage encoder, the index path's does not."""
  run = Run(smoke(**JOINT), tmp_path)
  state = train_state.init_state(run.model, run.tx, run.shapes, run.system.host_towers(), 0)
  run.feeder.set_corpus(run.corpus_embeddings(state.params))
  batch = run.feeder.batch(state.params, run.system.train_questions[:8])
  assert batch["passage_input_ids"].shape == (8, 2, int(run.cfg.retriever.passage_max_length))
  live = batch_doc_scores(run.model, state.params, batch)
  index_only = {k: v for k, v in batch.items() if not k.startswith("passage_input")
                and k != "passage_attention_mask"}
  stale = batch_doc_scores(run.model, state.params, index_only)
  np.testing.assert_allclose(np.asarray(live), np.asarray(stale), rtol=1e-5, atol=1e-5)

  def grad_norm(b):
    g = jax.grad(lambda p: batch_doc_scores(run.model, p, b).sum())(state.params)
    return float(sum(np.sum(np.square(x)) for x in
                     jax.tree.leaves(g["bi_encoder"]["passage_encoder"])))
  assert grad_norm(batch) > 0 and grad_norm(index_only) == 0


def test_switching_index_versions_does_not_recompile_the_step(tmp_path):
  run = Run(smoke(**JOINT), tmp_path)
  state = train_state.init_state(run.model, run.tx, run.shapes, run.system.host_towers(), 0)
  step = train_step.jit_train_step(run.model, run.cfg, run.tx, run.schedule, run.shapes, run.mesh,
                              run.rules)
  emb = run.corpus_embeddings(state.params)
  rows = []
  for version in range(3):  # a new version of the same corpus each step
    run.feeder.set_corpus(np.roll(emb, version, axis=0))
    batch = run.feeder.batch(state.params, run.system.train_questions[:8])
    rows.append(np.asarray(batch["doc_ids"]))
    state, _ = step(state, batch, jax.random.key(0))
  assert step.jitted._cache_size() == 1 and run.feeder._retrieve._cache_size() == 1
  assert not np.array_equal(rows[0], rows[1])  # the new vectors were really used


# ~40 s; CI keeps sync refresh through tests/test_train_resume.py's pretraining SIGKILL run
# (schedule 0-100:3, index versions {0, 3, 6} asserted on both the uninterrupted and resumed run)
@pytest.mark.slow
def test_sync_mode_re_embeds_at_scheduled_steps(tmp_path):
  cfg = smoke(**{**JOINT, "index.refresh.mode": "sync", "index.refresh.schedule": "0-100:3",
                 "train.total_steps": 7, "train.checkpoint_every": 100})
  summary = train_run(cfg, tmp_path)
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["index_version"] for r in records] == [0, 0, 0, 3, 3, 3, 6]
  assert [r["index_staleness_steps"] for r in records] == [0, 1, 2, 0, 1, 2, 0]
  assert summary["index_refresh"]["sync_seconds"] > 0


@pytest.mark.parametrize("overrides, words", [
    ({"optim.freeze": "()"}, "model.reencode_passages=true"),
    ({"optim.freeze": "()", "model.reencode_passages": "true"}, "'async' or 'sync'"),
    ({"index.refresh.mode": "sometimes"}, "index.refresh.mode"),
    ({"index.refresh.mode": "sync", "index.refresh.schedule": "asap"}, "needs mode='async'"),
    ({"index.refresh.schedule": "0-10"}, "start-end:every"),
])
def test_joint_training_config_errors(tmp_path, overrides, words):
  with pytest.raises(ConfigError, match=re.escape(words)):
    Run(smoke(**overrides), tmp_path)


@pytest.mark.parametrize("kind", ["device", pytest.param("exact_host", marks=pytest.mark.slow)])
def test_rerank_over_every_passage_recovers_the_fresh_top_k_from_a_stale_index(tmp_path, kind):
  """Atlas's over-retrieve-then-rerank with C = N candidates scores every passage with the live
  passage encoder, so a badly stale index (random vectors) yields the fresh index's top K."""
  fresh = Run(smoke(**JOINT, **{"index.kind": kind}), tmp_path / "fresh")
  state = train_state.init_state(fresh.model, fresh.tx, fresh.shapes, fresh.system.host_towers(), 0)
  emb = fresh.corpus_embeddings(state.params)
  fresh.feeder.set_corpus(emb)
  n = len(fresh.system.passages)
  stale = Run(smoke(**JOINT, **{"index.kind": kind, "model.rerank_candidates": n}),
              tmp_path / "stale")
  stale.feeder.set_corpus(np.random.default_rng(0).normal(size=emb.shape).astype(np.float32))
  qs = fresh.system.train_questions[:8]
  a, b = fresh.feeder.batch(state.params, qs), stale.feeder.batch(state.params, qs)
  np.testing.assert_array_equal(np.asarray(a["doc_ids"]), np.asarray(b["doc_ids"]))
  np.testing.assert_array_equal(np.asarray(a["context_input_ids"]),
                                np.asarray(b["context_input_ids"]))
  np.testing.assert_allclose(np.asarray(a["passage_embeddings"]),
                             np.asarray(b["passage_embeddings"]), rtol=1e-4, atol=1e-5)


def test_two_indexer_workers_split_the_corpus_and_publish_the_checkpoint_embedding(joint_run):
  """`ragjax indexer --shard i --num-shards 2` as two real processes: worker 0 opens a job for
  the newest checkpoint, both embed their half, worker 0 assembles and publishes. The version
  equals embedding the whole corpus with that checkpoint's passage encoder in one go."""
  import subprocess
  import sys
  cfg, workdir, _ = joint_run
  versions.clear_end_marker(workdir)
  procs = [subprocess.Popen([sys.executable, "-m", "ragjax.cli", "indexer", "--workdir",
                             str(workdir), "--shard", str(i), "--num-shards", "2",
                             "--poll-seconds", "0.2", "--idle-timeout", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert json.loads(outs[0].splitlines()[-1]) == {"shard": 0, "published": 1}
  assert versions.latest_version(workdir) == 6
  run = Run(cfg, workdir)
  emb, manifest, _ = versions.load_version(workdir, 6, expect_count=len(run.system.passages),
                                     expect_dim=run.system.retriever.dim)
  assert manifest["num_shards"] == 2 and manifest["encoder"]["checkpoint_step"] == 6
  retriever = run.system.retriever
  retriever.params = {**retriever.params,
                      "passage_encoder": indexer.restore_passage_encoder(workdir, 6)}
  want = retriever.encode_passages([p.title for p in run.system.passages],
                                   [p.text for p in run.system.passages])
  np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-6)
  assert not list(versions.index_dir(workdir).glob(".job-*"))  # the job is cleaned up


def test_a_scann_version_is_published_with_its_index_and_searches_like_exact(tmp_path):
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(300, 16)).astype(np.float32)
  ids = [f"p{i}" for i in range(300)]
  versions.publish_version(tmp_path, 5, emb, passage_ids=ids, corpus_sha256="x", encoder={},
                     index_kind="scann")
  got, manifest, scann = versions.load_version(tmp_path, 5, expect_count=300, expect_dim=16,
                                         with_scann=True)
  assert manifest["index_kind"] == "scann" and scann is not None
  q = rng.normal(size=(20, 16)).astype(np.float32)
  _, rows = scann.search_rows(q, 5)
  want = np.argsort(-(q @ emb.T), axis=1)[:, :5]
  assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, want)]) >= 0.9
  _publish(tmp_path, 6, emb[:3])  # an exact version has no ScaNN index to load
  assert versions.load_version(tmp_path, 6, expect_count=3, expect_dim=16, with_scann=True)[2] is None


def test_indexer_skips_checkpoints_before_the_passage_encoder_starts(joint_run, tmp_path):
  """Checkpoints up to `optim.start_steps.passage_encoder` hold the initial passage encoder
  (version 0 already embeds it): the leader opens no job for them."""
  import shutil
  _, workdir, _ = joint_run
  for start, want in ((6, None), (3, 6)):
    w = tmp_path / f"start{start}"
    shutil.copytree(workdir / "checkpoints", w / "checkpoints")
    config = json.loads((workdir / "config.json").read_text())
    config["config"]["optim"]["start_steps"]["passage_encoder"] = start
    (w / "config.json").write_text(json.dumps(config))
    _publish(w, 0, np.zeros((3, 2), np.float32))
    assert indexer.Indexer(w).next_job() == want
