"""Index versions of a joint-training workdir: publish, load, garbage-collect, end marker.

  W/index/<step>/   a published version: the corpus embedded by the passage encoder of
                    checkpoint <step>: `embeddings.npy` `[N, D]` float32, `scann/` (when the run
                    searches with ScaNN), `manifest.json` (written last). Assembled under a
                    temporary name and renamed into place: a directory named by a step is
                    complete.
  W/index/END       the trainer's end marker: indexers exit when they see it

Both sides of joint training use this module: the trainer (`ragjax.joint.refresh`) installs
versions, the indexer (`ragjax.joint.indexer`) publishes them. It depends on no run object: the
checkpoints a version is protected by are read through `ragjax.checkpoint.Checkpointer`.
"""
from __future__ import annotations

import pathlib
import shutil
import time

import numpy as np

from ragjax.checkpoint import Checkpointer
from ragjax.errors import IndexFormatError
from ragjax.fsutil import atomic_directory, write_json_atomic
from ragjax.retrieval.index import read_manifest
from ragjax.retrieval.registry import load_index
from ragjax.retrieval.scann_index import ScannIndex

VERSION_FORMAT = "ragjax.index_version/1"
END_MARKER = "END"


def index_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "index"


def version_steps(workdir) -> list[int]:
  """Steps of the published versions in `W/index/`, ascending (`publish_version` renames a
  version into place when it is complete)."""
  d = index_dir(workdir)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def discard_versions_after(workdir, step: int) -> list[int]:
  """Delete the versions (and open indexer jobs) of steps after `step`: after a resume from an
  older checkpoint (a corrupt newest one moved aside), they were embedded by parameters of a
  trajectory the run no longer continues. Returns the version steps deleted."""
  gone = [v for v in version_steps(workdir) if v > step]
  for v in gone:
    shutil.rmtree(index_dir(workdir) / str(v), ignore_errors=True)
  for job_step, p in _job_dirs(workdir):
    if job_step > step:
      shutil.rmtree(p, ignore_errors=True)
  return gone


def _job_dirs(workdir) -> list[tuple[int, pathlib.Path]]:
  """`(step, path)` of the indexer jobs `W/index/.job-<step>/` (open or abandoned)."""
  d = index_dir(workdir)
  return [(int(p.name[5:]), p) for p in (d.glob(".job-*") if d.is_dir() else ())
          if p.name[5:].isdigit()]


def latest_version(workdir) -> int | None:
  steps = version_steps(workdir)
  return steps[-1] if steps else None


def publish_version(workdir, step: int, embeddings_nd: np.ndarray, *, passage_ids, corpus_sha256,
                    encoder: dict, index_kind: str = "exact", scann_params=None,
                    extra: dict | None = None) -> dict:
  """Write `W/index/<step>/` atomically: `embeddings.npy` `[N, D]` float32, a ScaNN index when
  `index_kind == "scann"` (the run's resolved `ragjax.system.feed` kind), and the manifest
  (checkpoint
  step, corpus fingerprint, count, dimension, encoder, build seconds, plus `extra` such as embed
  seconds). Returns the manifest."""
  emb = np.ascontiguousarray(embeddings_nd, np.float32)
  t0 = time.perf_counter()
  with atomic_directory(index_dir(workdir) / str(int(step))) as tmp:
    np.save(tmp / "embeddings.npy", emb)
    if index_kind == "scann":
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
    scann = load_index(path / "scann", expect_dim=expect_dim, expect_count=expect_count)
  return emb, manifest, scann


def referenced_versions(workdir) -> set[int]:
  """Index versions that the kept checkpoints were trained with (their meta's `index_version`,
  read through a read-only `Checkpointer`)."""
  reader = Checkpointer.reader(pathlib.Path(workdir) / "checkpoints")
  out = set()
  for step in reader.all_steps():
    try:
      v = reader.metadata(step).get("index_version")
    except (OSError, ValueError, KeyError):  # deleted by the trainer while we looked
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
  for job_step, p in _job_dirs(workdir):  # jobs overtaken by a newer version
    if job_step <= newest:
      shutil.rmtree(p, ignore_errors=True)
  return deleted


def write_end_marker(workdir) -> None:
  index_dir(workdir).mkdir(parents=True, exist_ok=True)
  write_json_atomic(index_dir(workdir) / END_MARKER, {"unix": time.time()})


def clear_end_marker(workdir) -> None:
  (index_dir(workdir) / END_MARKER).unlink(missing_ok=True)


def read_end_marker(workdir) -> str | None:
  """The end marker's content, or None when there is none."""
  try:
    return (index_dir(workdir) / END_MARKER).read_text()
  except FileNotFoundError:
    return None
