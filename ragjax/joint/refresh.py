"""The trainer's side of joint retriever training: which index version feeds the step, and when
it is refreshed (`cfg.index.refresh`).

Modes (`index.refresh.mode`):

* `off`: the index is embedded once (passage encoder frozen; RAG §2.4).
* `async`: an indexer (`ragjax.joint.indexer`, another process) re-embeds the corpus from exported
  checkpoints and publishes versions; at a step boundary the trainer notices a newer version
  and installs it (`Feeder.set_corpus`: same shapes, no recompile). `schedule` says which steps
  export a checkpoint (Atlas's `"0-1000:500,1000-10000:1000"`, or `asap`: whenever the indexer
  has caught up). Past `max_staleness_steps` the trainer exports if it must and waits for a
  newer version, saying so in the log. `spawn_indexer` starts worker 0 as a subprocess.
* `sync`: at the schedule's steps the trainer re-embeds the corpus itself, training paused (the
  baseline the asynchronous mode is measured against).

Staleness of the step at `step` = step - the checkpoint step its index was embedded from
(`index_staleness_steps` in every logged record, with `index_version`).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from ragjax import config as config_lib
from ragjax.config_checks import indexer_spawn_env
from ragjax.joint import versions
from ragjax.retrieval.embed import corpus_fingerprint

log = logging.getLogger("ragjax")


class IndexRefresh:
  """Keeps `run.feeder` on the newest index version (module docstring)."""

  def __init__(self, run):
    self.run, self.workdir = run, run.workdir
    self.r = run.cfg.index.refresh
    self.mode = self.r.mode
    self.schedule = config_lib.RefreshSchedule.parse(self.r.schedule)
    self.max_staleness = int(self.r.max_staleness_steps)
    self.version: int | None = None
    self.proc: list[subprocess.Popen] = []
    self.staleness: list[int] = []   # per step (bench: the distribution over a run)
    self.switches: list[dict] = []   # {step, version, load_seconds}
    self.waited_seconds = 0.0
    self.sync_seconds = 0.0
    self._corpus = None
    self._last_export = -1
    self.first_change = config_lib.passage_encoder_start(run.cfg)

  @property
  def active(self) -> bool:
    return self.mode != "off" and not self.run.system.closed_book

  @property
  def corpus_sha256(self) -> str:
    if self._corpus is None:
      self._corpus = corpus_fingerprint(self.run.system.passages)
    return self._corpus

  # ------------------------------------------------------------------------------ versions

  def _latest(self) -> int:
    """The newest published version as process 0 sees it, on every process (so all switch at
    the same step); -1 when there is none."""
    latest = versions.latest_version(self.workdir) if self.run.is_main else None
    latest = -1 if latest is None else latest
    if jax.process_count() == 1:
      return latest
    return int(multihost_utils.broadcast_one_to_all(np.int32(latest)))

  def _install(self, version: int, step: int) -> None:
    t0 = time.perf_counter()
    system = self.run.system
    emb, manifest, scann = versions.load_version(
        self.workdir, version, expect_count=len(system.passages),
        expect_dim=system.retriever.dim, expect_corpus=self.corpus_sha256,
        with_scann=self.run.feeder.kind == "scann")
    self.run.feeder.set_corpus(emb, index=scann)  # no ScaNN index in the version: built here
    self.version = version
    seconds = time.perf_counter() - t0
    self.switches.append({"step": step, "version": version, "load_seconds": round(seconds, 3)})
    log.info("index version %d installed at step %d (staleness %d steps, %.2f s to load)",
             version, step, step - version, seconds)

  def start(self, params, step: int, recorded: int | None = None) -> None:
    """Install the version the resumed checkpoint recorded (`recorded`, its meta's
    `index_version`) when it is still published, else the newest one, or embed the corpus from
    `params` and publish it as version `step` when there is none (a fresh run, or an indexer
    that never finished); start the indexer subprocess when configured. Versions of steps after
    `step` (a resume from an older checkpoint than the newest) are deleted first: their
    parameters belong to a trajectory this run does not continue."""
    if not self.active:
      self.run.feeder.set_corpus(self.run.initial_embeddings(params))
      return
    if self.run.is_main:
      versions.clear_end_marker(self.workdir)
      gone = versions.discard_versions_after(self.workdir, step)
      if gone:
        log.warning("index versions %s are newer than the resumed step %d (embedded from "
                    "checkpoints this run no longer continues): deleted", gone, step)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ragjax_index_discarded")
    latest = self._latest()
    if recorded is not None and 0 <= int(recorded) <= latest:
      kept = not self.run.is_main or int(recorded) in versions.version_steps(self.workdir)
      chosen = int(recorded) if kept else latest
      if jax.process_count() > 1:  # process 0 decides; every process installs the same one
        chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
      if chosen != int(recorded):
        log.info("index version %d recorded by the checkpoint was garbage-collected; "
                 "installing the newest, %d", int(recorded), latest)
      latest = chosen  # newer versions come at the next poll, as usual
    if latest < 0:
      emb = self.run.initial_embeddings(params)
      if self.run.is_main:
        versions.publish_version(self.workdir, step, emb, passage_ids=[p.id for p in
                                                                 self.run.system.passages],
                           corpus_sha256=self.corpus_sha256,
                           encoder={**self.run.system.retriever.identity,
                                    "checkpoint_step": step},
                           index_kind=self.run.feeder.kind,
                           scann_params=self.run.cfg.index.scann,
                           extra={"published_by": "trainer"})
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ragjax_index_initial_version")
      latest = step
    self._install(latest, step)
    self._last_export = max([latest] + self.run.ckpt.all_steps())
    if self.mode == "async" and self.r.spawn_indexer and self.run.is_main:
      self.spawn()

  def spawn(self) -> None:
    """Start indexer worker 0 (and the other shards when `num_shards` > 1) as subprocesses."""
    n = int(self.r.num_shards)
    self.proc = []
    for shard in range(n):
      cmd = [sys.executable, "-m", "ragjax.cli", "indexer", "--workdir", str(self.workdir),
             "--shard", str(shard), "--num-shards", str(n),
             "--poll-seconds", str(self.r.poll_seconds),
             "--idle-timeout", str(self.r.idle_timeout), "--nice", str(self.r.indexer_nice)]
      log_file = open(self.workdir / f"indexer-{shard}.log", "a")
      env = {**os.environ, **indexer_spawn_env(self.r)}
      self.proc.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True))
      log_file.close()
    log.info("indexer started: %d worker(s), pid %s, log %s", n, [p.pid for p in self.proc],
             self.workdir / "indexer-0.log")

  # --------------------------------------------------------------------------------- steps

  def before_step(self, step: int, state, checkpoint_fn) -> None:
    """At the boundary before `step` (steps done so far): install a newer version (async), or
    re-embed (sync, at scheduled steps); wait past `max_staleness_steps`."""
    if not self.active:
      return
    if self.mode == "sync":
      if self.schedule.exports(step) and step != self.version:
        t0 = time.perf_counter()
        self.run.feeder.set_corpus(self.run.corpus_embeddings(state.params))
        self.version = step
        seconds = time.perf_counter() - t0
        self.sync_seconds += seconds
        log.info("index re-embedded in-process at step %d in %.1f s", step, seconds)
      self.staleness.append(step - self.version)
      return
    check = jax.process_count() == 1 or step % int(self.run.cfg.train.log_every) == 0
    if check:
      self._poll(step)
    # The tower is unchanged up to its start step: an older version is not stale in substance.
    if self.max_staleness and step - max(self.version, self.first_change) > self.max_staleness:
      self._wait_for_fresh(step, state, checkpoint_fn)
    self.staleness.append(step - self.version)

  def _poll(self, step: int) -> None:
    latest = self._latest()
    if latest > self.version:
      self._install(latest, step)

  def _wait_for_fresh(self, step: int, state, checkpoint_fn) -> None:
    if self._last_export <= self.version:  # the indexer has nothing newer to embed
      checkpoint_fn(step, state)
      self._last_export = step
    log.info("index staleness %d > max_staleness_steps %d at step %d: waiting for a version "
             "newer than %d", step - self.version, self.max_staleness, step, self.version)
    t0 = time.perf_counter()
    while step - max(self.version, self.first_change) > self.max_staleness:
      time.sleep(float(self.r.poll_seconds))
      self._poll(step)
      if self.proc and all(p.poll() is not None for p in self.proc):
        raise RuntimeError(f"the indexer exited (status {[p.returncode for p in self.proc]}) "
                           f"while the trainer waits for it; see {self.workdir}/indexer-0.log")
    self.waited_seconds += time.perf_counter() - t0
    log.info("waited %.1f s for index version %d", time.perf_counter() - t0, self.version)

  def wants_export(self, done: int) -> bool:
    """Whether the trainer should save a checkpoint after `done` steps for the indexer."""
    if self.mode != "async" or not self.active or done <= self.first_change:
      return False
    if self.schedule.asap:
      if jax.process_count() > 1 and done % int(self.run.cfg.train.log_every):
        return False  # the processes agree at logged steps only (one collective)
      return self._latest() >= self._last_export
    return self.schedule.exports(done)

  def exported(self, done: int) -> None:
    self._last_export = max(self._last_export, done)

  def record(self, step: int) -> dict:
    """Fields for the logged record at `step`."""
    if not self.active:
      return {}
    return {"index_version": int(self.version), "index_staleness_steps": int(step - self.version)}

  def finish(self, timeout: float = 60.0) -> None:
    """Write the end marker and wait for spawned workers to exit (terminate after `timeout`)."""
    if not self.active or self.mode != "async":
      return
    if self.run.is_main:
      versions.write_end_marker(self.workdir)
    for p in self.proc:
      try:
        p.wait(timeout)
      except subprocess.TimeoutExpired:
        p.terminate()
        p.wait(10)

  def summary(self) -> dict:
    s = np.asarray(self.staleness or [0])
    return {"mode": self.mode, "switches": self.switches, "waited_seconds":
            round(self.waited_seconds, 3), "sync_seconds": round(self.sync_seconds, 3),
            "staleness": {"mean": float(s.mean()), "p50": float(np.percentile(s, 50)),
                          "p90": float(np.percentile(s, 90)), "max": int(s.max())}}

