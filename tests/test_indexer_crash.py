"""Joint retriever training survives crashes: the asynchronous indexer (`ragjax indexer`) and the
trainer (`ragjax train`) are killed with SIGKILL at awkward moments, as real subprocesses, and
what they share through the workdir (`W/checkpoints/`, `W/index/`) stays consistent.

* an indexer killed mid-embedding publishes nothing partial, and its restart resumes the open
  job from the finished shard files and publishes what a from-scratch embedding computes;
* a trainer without an indexer keeps training on the last published version (growing
  staleness);
* a trainer killed mid-run leaves its spawned indexer running (own session): it finishes the
  newest checkpoint's version, waits, serves the restarted trainer and exits at its end marker;
* `max_staleness_steps` bounds the staleness of every step (the trainer exports and waits).

Every run is the bios smoke config (tiny random towers) with 2,000 passages and a trainable
passage encoder, on one CPU device. All runs share a persistent XLA compilation cache and one
set of shapes, so the train step is compiled about once per module.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ragjax import config as config_lib, fsutil
from ragjax.joint import indexer, versions

PASSAGES = 2000     # --config.data.num_people: one passage per person
SHARD_SIZE = 20     # passages per shard file: 100 files, so a kill lands mid-job
EMBED_BATCH = 4     # small calls: a shard file takes a few encoder calls
NUM_SHARD_FILES = PASSAGES // SHARD_SIZE
COMMON = ("--config.train.tensorboard=false", "--config.optim.freeze=()",
          "--config.model.reencode_passages=true", "--config.optim.schedule=constant",
          "--config.index.refresh.mode=async", "--config.index.refresh.poll_seconds=0.2",
          # a spawned indexer orphaned by a failed test exits by itself after this long
          "--config.index.refresh.idle_timeout=300",
          f"--config.data.num_people={PASSAGES}",
          f"--config.index.refresh.shard_size={SHARD_SIZE}",
          f"--config.retriever.embed_batch_size={EMBED_BATCH}")


@pytest.fixture(scope="module")
def env():
  out = dict(os.environ)
  out.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=("--xla_force_host_platform_device_count=1 "
                        "--xla_backend_optimization_level=0"),  # compiles ~2x faster on CPU
             # the session's compilation cache (conftest: its directory and size limit)
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return out


class Proc:
  """A `ragjax <command>` process in its own session (its group is signalled, not ours), its
  stdout and stderr in `<log>.out` / `<log>.err`."""

  def __init__(self, args, env, log):
    self.name = log.name
    self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
    cmd = [sys.executable, "-m", "ragjax.cli", *map(str, args)]
    with self.out.open("w") as out, self.err.open("w") as err:
      self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err,
                                   start_new_session=True)

  @property
  def pid(self) -> int:
    return self.proc.pid

  def logs(self) -> str:
    err = "\n".join(l for l in self.err.read_text().splitlines()
                    if not l.startswith(("[", "  @", "  ")))
    return (f"--- {self.name} (exit {self.proc.poll()}) stdout\n{self.out.read_text()[-2000:]}"
            f"\n--- {self.name} stderr\n{err[-6000:]}")

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.name} still running after {timeout} s\n{self.logs()}")

  def sigkill(self) -> None:
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.sigkill()
      self.proc.wait(30)

  def summary(self) -> dict:
    """The JSON line the command prints last."""
    return json.loads(self.out.read_text().strip().splitlines()[-1])


def train(workdir, env, log, *overrides) -> Proc:
  return Proc(["train", "--config", "experiments/bios.py:smoke", "--workdir", workdir, *COMMON,
               *overrides], env, log)


def read_metrics(workdir) -> list[dict]:
  """Complete lines of `metrics.jsonl` (a line being written may be cut short)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  out = []
  for line in (path.read_text().splitlines() if path.is_file() else []):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return out


def poll(condition, timeout: float, what: str, *procs: Proc, interval: float = 0.05,
         alive=()):
  """Call `condition()` until it returns something truthy (returned). Fails after `timeout` s,
  or as soon as one of `alive` (processes that must keep running meanwhile) has exited."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    got = condition()
    if got:
      return got
    for p in alive:
      if p.proc.poll() is not None:
        pytest.fail(f"{p.name} exited ({p.proc.returncode}) while waiting for {what}\n"
                    + "\n".join(q.logs() for q in procs))
    time.sleep(interval)
  pytest.fail(f"timed out after {timeout} s waiting for {what}\n"
              + "\n".join(q.logs() for q in procs))


def pid_alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, e.g. an orphan its new parent has not reaped yet, does not)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except (FileNotFoundError, ProcessLookupError):
    return False
  return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def is_indexer_of(pid: int, workdir) -> bool:
  """`pid` is a live `ragjax indexer` serving `workdir` (guards against pid reuse)."""
  try:
    cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
  except (FileNotFoundError, ProcessLookupError):
    return False
  return pid_alive(pid) and b"indexer" in cmd and str(workdir).encode() in cmd


def worker_pid(workdir) -> int | None:
  """The pid the live indexer worker 0 wrote into `W/index/.worker-0.lock`."""
  try:
    text = (versions.index_dir(workdir) / ".worker-0.lock").read_text().strip()
  except FileNotFoundError:
    return None
  return int(text) if text.isdigit() else None


def kill_indexer(pid, workdir) -> None:
  """SIGKILL an indexer this test's trainer spawned (its own session: group id == pid)."""
  if pid is not None and is_indexer_of(pid, workdir):
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def open_jobs(workdir) -> list[pathlib.Path]:
  return sorted(versions.index_dir(workdir).glob(".job-*"))


def load_all_versions(workdir, dim: int) -> dict:
  """`{step: manifest}` of every listed version; each loads (complete, right count/dim)."""
  out = {}
  for step in versions.version_steps(workdir):
    emb, manifest, _ = versions.load_version(workdir, step, expect_count=PASSAGES, expect_dim=dim)
    assert np.isfinite(emb).all() and manifest["checkpoint_step"] == step
    out[step] = manifest
  return out


# --------------------------------------------------------------------- a run without indexer

@pytest.fixture(scope="module")
def no_indexer_run(tmp_path_factory, env):
  """6 steps, async refresh, no indexer (`spawn_indexer=false`), checkpoints at 1 (the `asap`
  export), 2, 4, 6. Returns `(workdir, Proc, versions right after the run)`."""
  root = tmp_path_factory.mktemp("no_indexer")
  workdir = root / "w"
  run = train(workdir, env, root / "train", "--config.train.total_steps=6",
              "--config.index.refresh.spawn_indexer=false")
  try:
    assert run.wait(300) == 0, run.logs()
  finally:
    run.kill()
  return workdir, run, versions.version_steps(workdir)


@pytest.mark.timeout(600)
def test_trainer_keeps_training_on_the_last_version_without_an_indexer(no_indexer_run):
  """With no indexer publishing, every step trains on the trainer's own initial version 0 (the
  corpus embedded at step 0, published by the trainer): `index_version` stays 0 in every logged
  record while `index_staleness_steps` grows one per step (step index - 0), and the run still
  finishes. The checkpoints it exported record version 0; nothing else is published."""
  workdir, run, versions = no_indexer_run
  assert run.summary()["final_step"] == 6 and run.summary()["stopped"] == "done"
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
  assert [m["index_version"] for m in metrics] == [0] * 6
  # The record of step s (s steps done) describes step index s - 1.
  assert [m["index_staleness_steps"] for m in metrics] == [0, 1, 2, 3, 4, 5]
  assert versions == [0]
  manifest = json.loads((workdir / "index" / "0" / "manifest.json").read_text())
  assert manifest["published_by"] == "trainer" and manifest["count"] == PASSAGES
  for step in indexer.checkpoint_steps(workdir):
    meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())
    assert meta["index_version"] == 0, (step, meta)
  summary = json.loads((workdir / "index_refresh.json").read_text())
  assert summary["switches"] == [{"step": 0, "version": 0,
                                  "load_seconds": summary["switches"][0]["load_seconds"]}]
  assert summary["staleness"]["max"] == 5 and summary["waited_seconds"] == 0
  assert not (workdir / "indexer-0.log").exists()  # nothing was spawned


# ------------------------------------------------------------------ indexer killed mid-job

def shard_files(shard_dir) -> dict:
  """`{name: (inode, mtime_ns)}` of the finished shard files in `shard_dir` (a file vanishing
  while listed, as the job is deleted, is left out)."""
  out = {}
  for p in pathlib.Path(shard_dir).glob("shard-*.npy"):
    try:
      st = p.stat()
    except FileNotFoundError:
      continue
    out[p.name] = (st.st_ino, st.st_mtime_ns)
  return out


@pytest.mark.timeout(600)
def test_sigkilled_indexer_resumes_its_job_from_finished_shards(no_indexer_run, env, tmp_path):
  """`ragjax indexer` SIGKILLed while it embeds the newest checkpoint (6) for the first time:

  * after the kill no version 6 exists (a directory named by a step is complete), every listed
    version loads, and the job is open with some but not all of its 100 shard files;
  * the restarted indexer publishes version 6 and exits (idle timeout); while it embeds, the
    shard files finished before the kill keep their inode and mtime (reused, not recomputed:
    it is watched after the restart has written a new shard file, which it does after any
    rewrite of the older ones), and their rows in the version are those files' bytes;
  * version 6 equals the corpus embedded from scratch in this process by checkpoint 6's passage
    encoder (`restore_passage_encoder`, `Retriever.encode_passages`; float tolerance: other XLA
    flags and batches), and differs from version 0 (the passage encoder trained), so the
    comparison would notice a job embedded by the wrong tower.
  """
  from ragjax.retrieval.embed import corpus_fingerprint
  from ragjax.system.build import build_retriever
  from ragjax.data.sources import load_data
  from ragjax.config import load_workdir_config
  workdir, _, _ = no_indexer_run
  step = max(indexer.checkpoint_steps(workdir))
  assert step == 6 and versions.version_steps(workdir) == [0]
  versions.clear_end_marker(workdir)  # the finished trainer's marker would stop the indexer at once
  shard_dir = versions.index_dir(workdir) / f".job-{step}" / "shard-0-of-1"

  first = Proc(["indexer", "--workdir", workdir, "--poll-seconds", "0.1"], env,
               tmp_path / "indexer-a")
  try:
    poll(lambda: shard_files(shard_dir) or (versions.index_dir(workdir) / str(step)).exists(), 240,
         "a finished shard file", first, interval=0.005, alive=[first])
    first.sigkill()
    assert first.wait(30) == -signal.SIGKILL
  finally:
    first.kill()
  finished = shard_files(shard_dir)

  # Nothing partial is published; the open job holds a prefix of the shard files.
  assert not (versions.index_dir(workdir) / str(step)).exists(), "killed too late: version published"
  assert versions.version_steps(workdir) == [0] and versions.latest_version(workdir) == 0
  assert not (shard_dir / "manifest.json").exists()
  assert (shard_dir.parent / "passage_encoder.safetensors").is_file()
  assert 1 <= len(finished) < NUM_SHARD_FILES, len(finished)
  assert sorted(finished) == [f"shard-{i:05d}.npy" for i in range(len(finished))]
  before = {name: np.load(shard_dir / name) for name in finished}

  cfg = load_workdir_config(workdir)
  passages, _, _ = load_data(cfg)
  retriever = build_retriever(cfg)
  dim = retriever.dim
  load_all_versions(workdir, dim)

  second = Proc(["indexer", "--workdir", workdir, "--poll-seconds", "0.1", "--idle-timeout", "1"],
                env, tmp_path / "indexer-b")
  watched = 0  # observations with every old file and at least one new one present
  try:
    deadline = time.monotonic() + 240
    while second.proc.poll() is None and time.monotonic() < deadline:
      seen = shard_files(shard_dir)
      for name, ident in seen.items():
        if name in finished:
          assert ident == finished[name], (name, "rewritten by the restarted indexer")
      if set(seen) > set(finished):
        watched += 1
      time.sleep(0.01)
    assert second.wait(60) == 0, second.logs()
  finally:
    second.kill()
  assert watched, "the restarted indexer's embedding was never observed"
  assert second.summary() == {"shard": 0, "published": 1}, second.logs()
  assert "another worker holds the lock" not in second.err.read_text()  # flock died with it

  assert versions.version_steps(workdir) == [0, step] and not open_jobs(workdir)
  assert set(load_all_versions(workdir, dim)) == {0, step}
  emb, manifest, _ = versions.load_version(workdir, step, expect_count=PASSAGES, expect_dim=dim,
                                     expect_corpus=corpus_fingerprint(passages))
  assert manifest["encoder"]["checkpoint_step"] == step and manifest["num_shards"] == 1
  for i, name in enumerate(sorted(finished)):
    np.testing.assert_array_equal(emb[i * SHARD_SIZE:(i + 1) * SHARD_SIZE], before[name])

  retriever.params = {**retriever.params,
                      "passage_encoder": indexer.restore_passage_encoder(workdir, step)}
  expected = retriever.encode_passages([p.title for p in passages], [p.text for p in passages],
                                       batch_size=64)
  np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
  v0, _, _ = versions.load_version(workdir, 0, expect_count=PASSAGES, expect_dim=dim)
  assert np.abs(v0 - emb).max() > 1e-3  # the trained passage encoder embeds differently


# --------------------------------------------------------------------- trainer killed mid-run

# ~90 s; CI keeps the indexer's side of a crash (test_sigkilled_indexer_resumes_its_job_...)
# and the trainer's SIGKILL resume (tests/test_train_resume.py, pretraining with refresh).
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkilled_trainer_leaves_its_indexer_serving(env, tmp_path):
  """`ragjax train` (async `asap`, indexer spawned) SIGKILLed once it trains on an indexer
  version and has exported a checkpoint newer than the newest version:

  * the spawned indexer (its own session, pid in `W/index/.worker-0.lock`) survives the kill,
    publishes the version of the newest checkpoint after it (published_unix later than the
    kill), leaves no `.job-*` behind, and keeps waiting (alive seconds later);
  * the trainer restarted on the workdir resumes from the newest checkpoint, and its first
    logged step trains on that version or a newer one (never an older index);
  * at its end the restarted trainer writes `index/END`, and the orphaned indexer exits.
  """
  workdir = tmp_path / "w"
  first = train(workdir, env, tmp_path / "train-a", "--config.train.total_steps=1000")
  indexer_pid, second = None, None
  try:
    poll(lambda: any(m["index_version"] >= 1 for m in read_metrics(workdir)), 300,
         "a step trained on an indexer version", first, alive=[first])
    indexer_pid = worker_pid(workdir)
    assert indexer_pid is not None and is_indexer_of(indexer_pid, workdir)
    assert os.getsid(indexer_pid) not in (first.pid, os.getsid(0))  # its own session
    newer = lambda: max(indexer.checkpoint_steps(workdir), default=0) > versions.latest_version(workdir)
    poll(newer, 120, "a checkpoint newer than the newest version", first, interval=0.01,
         alive=[first])
    t_kill = time.time()
    first.sigkill()
    assert first.wait(30) == -signal.SIGKILL
    newest = max(indexer.checkpoint_steps(workdir))
    assert is_indexer_of(indexer_pid, workdir), "the indexer died with the trainer"

    def caught_up():
      done = versions.latest_version(workdir) == newest and not open_jobs(workdir)
      if not done and not pid_alive(indexer_pid):
        pytest.fail("the indexer exited before publishing version "
                    f"{newest}\n{(workdir / 'indexer-0.log').read_text()[-4000:]}")
      return done
    poll(caught_up, 180, f"version {newest} after the kill", first)
    manifest = json.loads((workdir / "index" / str(newest) / "manifest.json").read_text())
    assert manifest["published_unix"] > t_kill and manifest["checkpoint_step"] == newest
    assert indexer.checkpoint_steps(workdir)[-1] == newest  # nothing new appeared meanwhile
    time.sleep(1.0)  # five poll intervals: it waits for work instead of exiting
    assert is_indexer_of(indexer_pid, workdir) and not open_jobs(workdir)
    assert not (workdir / "index" / versions.END_MARKER).exists()

    total = newest + 3
    second = train(workdir, env, tmp_path / "train-b", f"--config.train.total_steps={total}")
    assert second.wait(300) == 0, second.logs()
    assert re.findall(r"resumed at step (\d+)", second.err.read_text()) == [str(newest)]
    assert second.summary()["final_step"] == total
    resumed = [m for m in read_metrics(workdir) if m["step"] > newest]
    assert [m["step"] for m in resumed] == list(range(newest + 1, total + 1))
    assert resumed[0]["index_version"] >= newest, resumed[0]
    assert all(m["index_staleness_steps"] == m["step"] - 1 - m["index_version"] >= 0
               for m in resumed), resumed
    assert (workdir / "index" / versions.END_MARKER).is_file()
    poll(lambda: not pid_alive(indexer_pid), 60, "the orphaned indexer to exit at END", second)
  finally:
    for p in (first, second):
      if p is not None:
        p.kill()
    kill_indexer(indexer_pid, workdir)
    if workdir.is_dir():
      versions.write_end_marker(workdir)  # any other indexer of this workdir exits at its next poll


# ---------------------------------------------------------------------- bounded staleness

@pytest.mark.timeout(600)
def test_max_staleness_steps_bounds_every_step(env, tmp_path):
  """`max_staleness_steps=3` with a schedule that exports only at step 500 and no periodic
  checkpoints (10 steps): the run finishes and no step trains on an index more than 3 steps
  old. Past the bound the trainer exports a checkpoint itself and waits (says so in its log)
  for the spawned indexer's version of it: steps 0-3 use version 0 (the trainer's own), 4-7
  version 4, 8-9 version 8, the only checkpoints there were to embed."""
  workdir = tmp_path / "w"
  run = train(workdir, env, tmp_path / "train", "--config.train.total_steps=10",
              "--config.train.checkpoint_every=1000", "--config.index.refresh.schedule=0-1000:500",
              "--config.index.refresh.max_staleness_steps=3")
  indexer_pid = None
  try:
    poll(lambda: worker_pid(workdir), 300, "the spawned indexer's lock", run, alive=[run])
    indexer_pid = worker_pid(workdir)
    assert run.wait(400) == 0, run.logs()
  finally:
    run.kill()
    kill_indexer(indexer_pid, workdir)
  metrics = read_metrics(workdir)
  assert [m["step"] for m in metrics] == list(range(1, 11))
  assert max(m["index_staleness_steps"] for m in metrics) <= 3
  assert [m["index_version"] for m in metrics] == [0] * 4 + [4] * 4 + [8] * 2, metrics
  assert [m["index_staleness_steps"] for m in metrics] == [0, 1, 2, 3] * 2 + [0, 1]
  err = run.err.read_text()
  assert len(re.findall(r"waiting for a version newer than \d+", err)) == 2, run.logs()
  assert len(re.findall(r"waited [\d.]+ s for index version", err)) == 2, run.logs()
  summary = json.loads((workdir / "index_refresh.json").read_text())
  assert summary["waited_seconds"] > 0 and summary["staleness"]["max"] == 3
  assert [s["version"] for s in summary["switches"]] == [0, 4, 8]
  assert (workdir / "index" / versions.END_MARKER).is_file()
  # The trainer's finish() waited for its indexer: it has exited, not been orphaned.
  assert indexer_pid is not None and not pid_alive(indexer_pid)


def test_a_worker_launched_with_the_trainer_ignores_the_previous_jobs_end_marker(tmp_path):
  """launch/ starts workers beside a (re)starting trainer: an end marker already there is the
  earlier job's (the trainer clears it at start); the trainer's next one stops the worker."""
  assert not indexer.end_marker_written(tmp_path)
  versions.write_end_marker(tmp_path)
  stale = indexer.read_end_marker(tmp_path)
  assert indexer.end_marker_written(tmp_path) and not indexer.end_marker_written(tmp_path, stale)
  versions.clear_end_marker(tmp_path)
  assert not indexer.end_marker_written(tmp_path, stale)
  time.sleep(0.01)
  versions.write_end_marker(tmp_path)  # the restarted trainer's end
  assert indexer.end_marker_written(tmp_path, stale)


def test_wait_for_trainer_waits_for_config_json_then_names_it(tmp_path):
  w = tmp_path / "w"
  r = subprocess.run([sys.executable, "-m", "ragjax.cli", "indexer", "--workdir", str(w),
                      "--wait-for-trainer", "0.5", "--poll-seconds", "0.1"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  (line,) = [l for l in r.stderr.splitlines() if "error:" in l]
  assert str(w / "config.json") in line and "--wait-for-trainer 0.5" in line
  w.mkdir()
  t0 = time.monotonic()
  import threading
  threading.Timer(0.5, lambda: (w / "config.json").write_text("{}")).start()
  indexer.wait_for_run(w, timeout=30, poll_seconds=0.05)
  assert 0.4 < time.monotonic() - t0 < 30


def test_versions_after_the_resumed_step_are_discarded_with_their_jobs(tmp_path):
  """The CI counterpart of the slow resume test below: only versions and open jobs of steps
  after the resumed step go."""
  for name in ("0", "4", "9", ".job-5", ".job-12", ".job-3"):
    (tmp_path / "index" / name).mkdir(parents=True)
  assert versions.discard_versions_after(tmp_path, 4) == [9]
  assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [".job-3", "0", "4"]
  assert versions.discard_versions_after(tmp_path / "nothing_here", 4) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_installs_the_recorded_version_and_drops_versions_from_a_lost_future(
    no_indexer_run, env, tmp_path):
  """A resumed joint run starts on the index version its checkpoint recorded (0 here), then
  takes newer ones at the next poll as usual (4); a version newer than the resumed step (9: as
  after a fallback from a corrupt newest checkpoint) was embedded by parameters of a trajectory
  the run no longer continues, so it is deleted and never installed."""
  src, _, _ = no_indexer_run
  workdir = tmp_path / "w"
  shutil.copytree(src, workdir)
  for p in (workdir / "index").iterdir():
    if p.name.isdigit() and p.name != "0":
      shutil.rmtree(p)
  for step in (4, 9):  # version 0's vectors, relabelled (their values do not matter here)
    shutil.copytree(workdir / "index" / "0", workdir / "index" / str(step))
    path = workdir / "index" / str(step) / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "checkpoint_step": step}))
  meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
  assert meta["index_version"] == 0
  run = train(workdir, env, tmp_path / "resume", "--config.train.total_steps=7",
              "--config.index.refresh.spawn_indexer=false")
  try:
    assert run.wait(300) == 0, run.logs()
  finally:
    run.kill()
  assert "are newer than the resumed step 6" in run.err.read_text()
  assert versions.version_steps(workdir) == [0, 4]
  switches = json.loads((workdir / "index_refresh.json").read_text())["switches"]
  assert [(s["step"], s["version"]) for s in switches] == [(6, 0), (6, 4)]
  assert read_metrics(workdir)[-1]["step"] == 7 and read_metrics(workdir)[-1]["index_version"] == 4
