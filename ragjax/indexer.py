"""Index versions for joint retriever training, and the asynchronous indexer that publishes them.

REALM (Guu et al. 2020, §3.4) and Atlas (Izacard et al. 2022, §2.4) train the passage encoder
and refresh the index from a recent checkpoint while training goes on. Here the refresher is a
separate process (`ragjax indexer --workdir W`, or started by `ragjax train`) that talks to the
trainer through the workdir only:

  W/checkpoints/<step>/        the trainer's orbax checkpoints (the indexer reads the passage
                               encoder's parameters alone, `partial_restore`)
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
from dataclasses import dataclass

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ragjax.errors import IndexFormatError
from ragjax.retrieval.index import (atomic_directory, atomic_file, read_manifest,
                                    write_json_atomic)

log = logging.getLogger("ragjax")
VERSION_FORMAT = "ragjax.index_version/1"
END_MARKER = "END"
PASSAGE_ENCODER = ("params", "bi_encoder", "passage_encoder")


# ------------------------------------------------------------------------------- schedules

@dataclass(frozen=True)
class RefreshSchedule:
  """Which steps export a checkpoint for the indexer (Atlas's `"0-1000:500,1000-10000:1000"`:
  every 500 steps in [0, 1000), every 1000 in [1000, 10000)), or `asap`: whenever the indexer has
  caught up with the last export."""
  ranges: tuple[tuple[int, int, int], ...] = ()
  asap: bool = False

  @classmethod
  def parse(cls, spec: str, key: str = "index.refresh.schedule") -> "RefreshSchedule":
    """`"asap"`, `""` (no exports), or comma-separated `start-end:every`.

    Raises: ValueError naming `key` and the malformed part.
    """
    spec = (spec or "").strip()
    if spec == "asap":
      return cls(asap=True)
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
      try:
        span, every = part.split(":")
        start, end = (int(x) for x in span.split("-"))
        every = int(every)
      except ValueError:
        raise ValueError(f"{key}: {part!r} is not start-end:every (e.g. "
                         "'0-1000:500,1000-10000:1000', or 'asap')") from None
      if not (0 <= start < end and every > 0):
        raise ValueError(f"{key}: {part!r} needs 0 <= start < end and every > 0")
      ranges.append((start, end, every))
    return cls(tuple(ranges))

  def exports(self, step: int) -> bool:
    """Whether a checkpoint at `step` (steps done) is exported by the schedule (not `asap`)."""
    return any(a <= step < b and step > 0 and (step - a) % e == 0 for a, b, e in self.ranges)


# -------------------------------------------------------------------------------- versions

def passage_encoder_start(cfg) -> int:
  """`optim.start_steps.passage_encoder`: checkpoints up to this step hold the initial passage
  encoder, so there is nothing to re-embed before it."""
  return int(cfg.optim.start_steps.get("passage_encoder", 0))


def index_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "index"


def _step_dirs(d: pathlib.Path) -> list[int]:
  """The steps named by the sub-directories of `d`, ascending (both orbax and
  `publish_version` rename a step into place when it is complete)."""
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def version_steps(workdir) -> list[int]:
  """Steps of the published versions in `W/index/`, ascending."""
  return _step_dirs(index_dir(workdir))


def latest_version(workdir) -> int | None:
  steps = version_steps(workdir)
  return steps[-1] if steps else None


def publish_version(workdir, step: int, embeddings_nd: np.ndarray, *, passage_ids, corpus_sha256,
                    encoder: dict, index_kind: str = "exact", scann_params=None,
                    extra: dict | None = None) -> dict:
  """Write `W/index/<step>/` atomically: `embeddings.npy` `[N, D]` float32, a ScaNN index when
  `index_kind == "scann"` (the run's resolved `ragjax.feed` kind), and the manifest (checkpoint
  step, corpus fingerprint, count, dimension, encoder, build seconds, plus `extra` such as embed
  seconds). Returns the manifest."""
  emb = np.ascontiguousarray(embeddings_nd, np.float32)
  t0 = time.perf_counter()
  with atomic_directory(index_dir(workdir) / str(int(step))) as tmp:
    np.save(tmp / "embeddings.npy", emb)
    if index_kind == "scann":
      from ragjax.retrieval.scann_index import ScannIndex
      ScannIndex.build(emb, list(passage_ids), encoder=encoder, **dict(scann_params or {})
                       ).save(tmp / "scann")
    manifest = {"format": VERSION_FORMAT, "checkpoint_step": int(step), "count": len(emb),
                "dim": int(emb.shape[1]), "corpus_sha256": corpus_sha256, "encoder": encoder,
                "index_kind": index_kind, "build_seconds": round(time.perf_counter() - t0, 3),
                "published_unix": time.time(), **(extra or {})}
    write_json_atomic(tmp / "manifest.json", manifest)
  return manifest


def load_version(workdir, step: int, *, expect_count: int, expect_dim: int,
                 expect_corpus: str | None = None, with_scann: bool = False):
  """`(embeddings [N, D] float32, manifest, scann index or None)` of version `step`.

  Raises: IndexFormatError when the version is incomplete, or its count, dimension or corpus
  fingerprint differs from what the run expects (the message names the file and the field).
  """
  path = index_dir(workdir) / str(int(step))
  manifest = read_manifest(path, VERSION_FORMAT)
  problems = []
  if manifest["count"] != expect_count:
    problems.append(f"count {manifest['count']}, expected {expect_count}")
  if manifest["dim"] != expect_dim:
    problems.append(f"dim {manifest['dim']}, expected {expect_dim}")
  if expect_corpus is not None and manifest["corpus_sha256"] != expect_corpus:
    problems.append("corpus_sha256 differs from this run's corpus")
  if problems:
    raise IndexFormatError(f"{path / 'manifest.json'}: " + "; ".join(problems))
  try:
    emb = np.load(path / "embeddings.npy")
  except (OSError, ValueError) as e:
    raise IndexFormatError(f"{path / 'embeddings.npy'}: unreadable: {e}") from e
  if emb.shape != (expect_count, expect_dim):
    raise IndexFormatError(f"{path / 'embeddings.npy'}: shape {emb.shape}, manifest says "
                           f"{(expect_count, expect_dim)}")
  scann = None
  if with_scann and manifest.get("index_kind") == "scann":
    from ragjax.retrieval.index import load_index
    scann = load_index(path / "scann", expect_dim=expect_dim, expect_count=expect_count)
  return emb, manifest, scann


def checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoint steps in `W/checkpoints/`, ascending."""
  return _step_dirs(pathlib.Path(workdir) / "checkpoints")


def referenced_versions(workdir) -> set[int]:
  """Index versions that the kept checkpoints were trained with (their meta's `index_version`)."""
  out = set()
  for step in checkpoint_steps(workdir):
    f = pathlib.Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata"
    try:
      v = json.loads(f.read_text()).get("index_version")
    except (OSError, json.JSONDecodeError):
      continue
    if v is not None:
      out.add(int(v))
  return out


def collect_garbage(workdir, keep: int) -> list[int]:
  """Delete versions other than the newest `keep` and those a kept checkpoint refers to, and
  leftover temporary directories of killed publishes. Returns the deleted steps."""
  steps = version_steps(workdir)
  protected = set(steps[-max(1, keep):]) | referenced_versions(workdir)
  deleted = []
  for s in steps:
    if s not in protected:
      shutil.rmtree(index_dir(workdir) / str(s), ignore_errors=True)
      deleted.append(s)
  for pattern, sep in ((".*.tmp-*", ".tmp-"), (".*.old-*", ".old-")):  # killed publishes
    for p in index_dir(workdir).glob(pattern):
      if p.name.split(sep)[0].lstrip(".").isdigit():
        shutil.rmtree(p, ignore_errors=True)
  newest = steps[-1] if steps else -1
  for p in index_dir(workdir).glob(".job-*"):  # jobs overtaken by a newer version
    if p.name[5:].isdigit() and int(p.name[5:]) <= newest:
      shutil.rmtree(p, ignore_errors=True)
  return deleted


def write_end_marker(workdir) -> None:
  index_dir(workdir).mkdir(parents=True, exist_ok=True)
  write_json_atomic(index_dir(workdir) / END_MARKER, {"unix": time.time()})


def clear_end_marker(workdir) -> None:
  (index_dir(workdir) / END_MARKER).unlink(missing_ok=True)


# ------------------------------------------------------------------------ passage encoder I/O

def restore_passage_encoder(workdir, step: int) -> dict:
  """The passage encoder's parameters (host numpy pytree) of checkpoint `step`, read alone
  (orbax `partial_restore`: no optimiser state, no other tower).

  Raises: FileNotFoundError when the checkpoint is gone (garbage-collected by the trainer).
  """
  import jax
  import orbax.checkpoint as ocp
  path = pathlib.Path(workdir).resolve() / "checkpoints" / str(int(step)) / "state"
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no such checkpoint")
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns: step metadata is one level up
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  sub = tree
  for key in PASSAGE_ENCODER:
    sub = sub[key]
  item = {"params": {"bi_encoder": {"passage_encoder": jax.tree.map(
      lambda m: np.zeros(m.shape, m.dtype), sub)}}}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                        partial_restore=True))
  return out["params"]["bi_encoder"]["passage_encoder"]


def save_tower(path, tower: dict) -> None:
  """safetensors file of a parameter pytree, written through a temporary name."""
  from safetensors.numpy import save_file
  with atomic_file(path) as tmp:
    save_file({k: np.asarray(v) for k, v in flatten_dict(tower, sep="/").items()}, str(tmp))


def load_tower(path) -> dict:
  from safetensors.numpy import load_file
  return unflatten_dict(load_file(str(path)), sep="/")


# ---------------------------------------------------------------------------------- worker

def shard_range(count: int, shard: int, num_shards: int) -> tuple[int, int]:
  """Rows `[lo, hi)` of worker `shard` of `num_shards` (contiguous, sizes differ by <= 1)."""
  return count * shard // num_shards, count * (shard + 1) // num_shards


class Indexer:
  """One indexer worker (module docstring). `run()` returns when the end marker appears, when
  `stop` is set, or after `idle_timeout` seconds without work (0: never)."""

  def __init__(self, workdir, shard: int = 0, num_shards: int = 1, *, poll_seconds: float = 1.0,
               idle_timeout: float = 0.0, stop: threading.Event | None = None):
    from ragjax.system import build_retriever, load_data
    from ragjax.trainer import load_workdir_config
    from ragjax.retrieval.embed import corpus_fingerprint
    if not 0 <= shard < num_shards:
      raise ValueError(f"--shard {shard}: expected 0 <= shard < --num-shards ({num_shards})")
    self.workdir, self.shard, self.num_shards = pathlib.Path(workdir), shard, num_shards
    self.cfg = load_workdir_config(workdir)
    r = self.cfg.index.refresh
    self.poll = float(poll_seconds)
    self.idle_timeout = float(idle_timeout)
    self.stop = stop or threading.Event()
    self.passages, _, _ = load_data(self.cfg)
    self.corpus_sha256 = corpus_fingerprint(self.passages)
    self.retriever = build_retriever(self.cfg)
    self.base_identity = dict(self.retriever.identity)
    self.keep = int(r.keep_versions)
    self.first_change = passage_encoder_start(self.cfg)
    self.shard_size = int(r.shard_size)
    from ragjax.feed import choose_index_kind
    self.index_kind = choose_index_kind(self.cfg.index.kind, len(self.passages),
                                        self.retriever.dim, int(self.cfg.index.device_max_bytes))
    self.published = []  # manifests this worker published (bench, tests)
    self._lock_file = None

  # -------------------------------------------------------------------------------- helpers

  @property
  def ended(self) -> bool:
    return (index_dir(self.workdir) / END_MARKER).is_file() or self.stop.is_set()

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
      ckpt = pathlib.Path(self.workdir) / "checkpoints" / str(step)
      write_json_atomic(job / "opened.json", {"checkpoint_unix": ckpt.stat().st_mtime,
                                              "opened_unix": time.time()})
      save_tower(job / "passage_encoder.safetensors", tower)
      log.info("indexer: job opened for checkpoint %d", step)
      return step
    return None

  def embed_shard(self, step: int) -> float:
    """Embed this worker's rows for job `step` (resumes from finished shard files). Returns the
    seconds spent."""
    from ragjax.retrieval.embed import embed_corpus
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
    from ragjax.retrieval.embed import load_embeddings
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
