"""The asynchronous indexer of joint retriever training: re-embeds the corpus from checkpoints
and publishes index versions (`ragjax.joint.versions`).

REALM (Guu et al. 2020, §3.4) and Atlas (Izacard et al. 2022, §2.4) train the passage encoder
and refresh the index from a recent checkpoint while training goes on. Here the refresher is a
separate process (`ragjax indexer --workdir W`, or started by `ragjax train`) that talks to the
trainer through the workdir only:

  W/checkpoints/<step>/        the trainer's orbax checkpoints (the indexer reads the passage
                               encoder's parameters alone: `Checkpointer.restore_subtree`)
  W/index/<step>/              a published version: the corpus embedded by the passage encoder
                               of checkpoint <step>: `embeddings.npy` `[N, D]` float32, `scann/`
                               (when the run searches with ScaNN), `manifest.json` (written
                               last). Assembled under a temporary name and renamed into place:
                               a directory named by a step is complete.
  W/index/.job-<step>/         work in progress: `passage_encoder.safetensors` (the tower, copied
                               out of the checkpoint when the job opens, so checkpoint garbage
                               collection cannot take it away) and one resumable `embed_corpus`
                               directory per worker, `shard-<i>-of-<n>/`
  W/index/END                  the trainer's end marker: indexers exit when they see it
  W/index/.worker-<i>.lock     flock held by the live worker i (a second one waits for it)

Worker 0 leads: it opens a job for the newest checkpoint newer than the newest version, embeds
its share, waits for the other workers' shards, assembles, publishes, deletes the job and
garbage-collects versions. Workers 1..n-1 embed their share of the open job. A worker killed at
any point leaves finished shard files; its restart resumes the open job from them. Waiting is
`Event.wait` with a poll interval (no busy loop).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import shutil
import threading
import time

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from ragjax import config as config_lib
from ragjax.checkpoint import Checkpointer
from ragjax.data.sources import load_data
from ragjax.errors import IndexFormatError, UsageError
from ragjax.fsutil import atomic_file, write_json_atomic
from ragjax.joint.versions import (collect_garbage, index_dir, latest_version, publish_version,
                                   read_end_marker)
from ragjax.retrieval.embed import corpus_fingerprint, embed_corpus, load_embeddings
from ragjax.retrieval.multihost import shard_range
from ragjax.system.build import build_retriever
from ragjax.system.feed import choose_index_kind

log = logging.getLogger("ragjax")
PASSAGE_ENCODER = ("params", "bi_encoder", "passage_encoder")


def checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoint steps in `W/checkpoints/`, ascending."""
  return Checkpointer.reader(pathlib.Path(workdir) / "checkpoints").all_steps()


# ------------------------------------------------------------------------ passage encoder I/O

def restore_passage_encoder(workdir, step: int) -> dict:
  """The passage encoder's parameters (host numpy pytree) of checkpoint `step`, read alone
  (`Checkpointer.restore_subtree`: no optimiser state, no other tower).

  Raises: NotFoundError (a FileNotFoundError) when the checkpoint is gone (garbage-collected by
  the trainer).
  """
  return Checkpointer.reader(pathlib.Path(workdir) / "checkpoints").restore_subtree(
      step, PASSAGE_ENCODER)


def save_tower(path, tower: dict) -> None:
  """safetensors file of a parameter pytree, written through a temporary name."""
  with atomic_file(path) as tmp:
    save_file({k: np.asarray(v) for k, v in flatten_dict(tower, sep="/").items()}, str(tmp))


def load_tower(path) -> dict:
  return unflatten_dict(load_file(str(path)), sep="/")


# ---------------------------------------------------------------------------------- worker

def end_marker_written(workdir, stale: str | None = None) -> bool:
  """Whether the trainer has written its end marker: one is there and its content is not
  `stale` (the marker an earlier job left, read when this worker started)."""
  marker = read_end_marker(workdir)
  return marker is not None and marker != stale


def wait_for_run(workdir, timeout: float, poll_seconds: float = 1.0) -> None:
  """Wait up to `timeout` seconds for `W/config.json`, which `ragjax train` writes at start (an
  indexer launched beside the trainer may start first). Raises: UsageError after `timeout`."""
  path = pathlib.Path(workdir) / "config.json"
  deadline = time.monotonic() + float(timeout)
  while not path.is_file():
    if time.monotonic() > deadline:
      raise UsageError(f"{path}: not there after --wait-for-trainer {timeout:g} s; start "
                       f"`ragjax train --workdir {workdir}` (or give it longer)")
    time.sleep(poll_seconds)


class Indexer:
  """One indexer worker (module docstring). `run()` returns when the end marker appears, when
  `stop` is set, or after `idle_timeout` seconds without work (0: never)."""

  def __init__(self, workdir, shard: int = 0, num_shards: int = 1, *, poll_seconds: float = 1.0,
               idle_timeout: float = 0.0, stop: threading.Event | None = None,
               launched_with_trainer: bool = False):
    if not 0 <= shard < num_shards:
      raise UsageError(f"--shard {shard}: expected 0 <= shard < --num-shards ({num_shards})")
    self.workdir, self.shard, self.num_shards = pathlib.Path(workdir), shard, num_shards
    # Started beside a (re)starting trainer: an end marker already there is the previous job's,
    # which the trainer clears when it starts; only a marker written after it counts.
    self._stale_end = read_end_marker(workdir) if launched_with_trainer else None
    self.cfg = config_lib.load_workdir_config(workdir)
    r = self.cfg.index.refresh
    self.poll = float(poll_seconds)
    self.idle_timeout = float(idle_timeout)
    self.stop = stop or threading.Event()
    self.passages, _, _ = load_data(self.cfg)
    self.corpus_sha256 = corpus_fingerprint(self.passages)
    self.retriever = build_retriever(self.cfg)
    self.base_identity = dict(self.retriever.identity)
    self.keep = int(r.keep_versions)
    self.first_change = config_lib.passage_encoder_start(self.cfg)
    self.shard_size = int(r.shard_size)
    self.index_kind = choose_index_kind(self.cfg.index.kind, len(self.passages),
                                        self.retriever.dim, int(self.cfg.index.device_max_bytes))
    self.published = []  # manifests this worker published (bench, tests)
    self._lock_file = None

  # -------------------------------------------------------------------------------- helpers

  @property
  def ended(self) -> bool:
    return self.stop.is_set() or end_marker_written(self.workdir, self._stale_end)

  def _wait(self, seconds=None) -> bool:
    """Sleep a poll interval (or `seconds`); True when the worker should stop."""
    return self.stop.wait(self.poll if seconds is None else seconds) or self.ended

  def job_dir(self, step: int) -> pathlib.Path:
    return index_dir(self.workdir) / f".job-{int(step)}"

  def open_jobs(self) -> list[int]:
    d = index_dir(self.workdir)
    if not d.is_dir():
      return []
    return sorted(int(p.name[5:]) for p in d.glob(".job-*")
                  if p.name[5:].isdigit() and (p / "passage_encoder.safetensors").is_file())

  def shard_dir(self, step: int, shard: int) -> pathlib.Path:
    return self.job_dir(step) / f"shard-{shard}-of-{self.num_shards}"

  def acquire(self) -> bool:
    """Take `W/index/.worker-<shard>.lock`, waiting while another live worker holds it. False
    when told to stop first."""
    index_dir(self.workdir).mkdir(parents=True, exist_ok=True)
    f = open(index_dir(self.workdir) / f".worker-{self.shard}.lock", "a+")
    said = False
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if not said:
          log.info("indexer shard %d: another worker holds the lock; waiting", self.shard)
          said = True
        if self._wait():
          f.close()
          return False
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self._lock_file = f
    return True

  # ---------------------------------------------------------------------------------- jobs

  def next_job(self) -> int | None:
    """The job to work on: an open one (resumed), or (leader) a new one for the newest
    checkpoint newer than the newest version."""
    latest = latest_version(self.workdir)
    latest = -1 if latest is None else latest
    jobs = [s for s in self.open_jobs() if s > latest]
    if jobs:  # every worker takes the newest open job (normally the only one)
      return jobs[-1]
    if self.shard != 0:
      return None
    newer = [s for s in checkpoint_steps(self.workdir) if s > max(latest, self.first_change)]
    for step in reversed(newer):
      try:
        tower = restore_passage_encoder(self.workdir, step)
      except (FileNotFoundError, ValueError, KeyError) as e:  # deleted while we looked
        log.info("indexer: checkpoint %d unreadable (%s); trying an older one", step, e)
        continue
      job = self.job_dir(step)
      job.mkdir(parents=True, exist_ok=True)
      saved = Checkpointer.reader(self.workdir / "checkpoints").saved_unix(step)
      write_json_atomic(job / "opened.json", {"checkpoint_unix": saved,
                                              "opened_unix": time.time()})
      save_tower(job / "passage_encoder.safetensors", tower)
      log.info("indexer: job opened for checkpoint %d", step)
      return step
    return None

  def embed_shard(self, step: int) -> float:
    """Embed this worker's rows for job `step` (resumes from finished shard files). Returns the
    seconds spent."""
    t0 = time.perf_counter()
    tower = load_tower(self.job_dir(step) / "passage_encoder.safetensors")
    self.retriever.params = {**self.retriever.params, "passage_encoder": tower}
    self.retriever.identity = {**self.base_identity, "checkpoint_step": int(step)}
    lo, hi = shard_range(len(self.passages), self.shard, self.num_shards)
    embed_corpus(self.retriever, self.passages[lo:hi], self.shard_dir(step, self.shard),
                 shard_size=self.shard_size, batch_size=int(self.cfg.retriever.embed_batch_size),
                 progress=False)
    return time.perf_counter() - t0

  def assemble(self, step: int, embed_seconds: float, t_open: float) -> dict | None:
    """Leader: wait for every shard of job `step`, publish the version, drop the job, collect
    garbage. None when told to stop first."""
    checkpoint_time = json.loads((self.job_dir(step) / "opened.json").read_text())[
        "checkpoint_unix"]
    dirs = [self.shard_dir(step, i) for i in range(self.num_shards)]
    while not all((d / "manifest.json").is_file() for d in dirs):
      if self._wait():
        return None
    parts, ids, seconds = [], [], []
    for d in dirs:
      emb, pids, man = load_embeddings(d)
      parts.append(emb)
      ids += pids
      seconds.append(man.get("embed_seconds", 0.0))
    if ids != [p.id for p in self.passages]:
      raise IndexFormatError(f"{self.job_dir(step)}: shard passage ids do not match the corpus")
    manifest = publish_version(
        self.workdir, step, np.concatenate(parts), passage_ids=ids,
        corpus_sha256=self.corpus_sha256, encoder=self.retriever.identity,
        index_kind=self.index_kind, scann_params=self.cfg.index.scann,
        extra={"embed_seconds": round(embed_seconds, 3), "num_shards": self.num_shards,
               "shard_embed_seconds": seconds,
               "job_seconds": round(time.perf_counter() - t_open, 3),
               "checkpoint_to_publish_seconds": round(time.time() - checkpoint_time, 3)})
    shutil.rmtree(self.job_dir(step), ignore_errors=True)
    deleted = collect_garbage(self.workdir, self.keep)
    log.info("indexer: published version %d (%d passages, embed %.1f s, build %.1f s)%s", step,
             manifest["count"], embed_seconds, manifest["build_seconds"],
             f"; deleted versions {deleted}" if deleted else "")
    self.published.append(manifest)
    return manifest

  def run(self) -> int:
    """Serve until the end marker (or `stop`, or the idle timeout). Returns versions published."""
    if not self.acquire():
      return 0
    if self.shard == 0:  # what a worker killed between publishing and cleaning up left
      collect_garbage(self.workdir, self.keep)
    log.info("indexer shard %d/%d serving %s (%d passages)", self.shard, self.num_shards,
             self.workdir, len(self.passages))
    idle_since = time.monotonic()
    done_here = set()
    try:
      while not self.ended:
        step = self.next_job()
        if step is None or (self.shard != 0 and step in done_here):
          if self.idle_timeout and time.monotonic() - idle_since > self.idle_timeout:
            log.info("indexer: idle for %.0f s; exiting", self.idle_timeout)
            break
          self._wait()
          continue
        t_open = time.perf_counter()
        seconds = self.embed_shard(step)
        done_here.add(step)
        if self.shard == 0:
          self.assemble(step, seconds, t_open)
        idle_since = time.monotonic()
    finally:
      if self._lock_file is not None:
        self._lock_file.close()
    log.info("indexer shard %d: %s", self.shard, "end marker seen" if self.ended else "stopped")
    return len(self.published)
