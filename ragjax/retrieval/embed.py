"""Embed a corpus into resumable shards: `shard-00000.npy ... + manifest.json`.

Layout of an embedding directory:
  progress.json      what is being embedded (encoder identity, corpus fingerprint, shard size);
                     a rerun with different inputs is refused instead of mixing shards
  shard-NNNNN.npy    `[n, D]` float32, or bfloat16 stored as uint16 bits; each written to a
                     temporary name and renamed, so a file that exists is complete
  shard-NNNNN.json   that shard's input statistics (passages truncated to the max length)
  passage_digests.npy  `[N]` uint64: the first 8 bytes of each passage's sha256 (id, title, text),
                     so a reader finds which passage changed since it was embedded
  manifest.json      written last: shard files, passage ids in order, dimension, dtype, encoder,
                     corpus sha256, passages truncated, records skipped (`input`)

A run killed half-way leaves finished shards; the rerun skips them and produces byte-identical
output (each shard is encoded on its own, in a fixed length-sorted order).
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from typing import Sequence

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from ragjax.errors import IndexFormatError
from ragjax.fsutil import atomic_file, write_json_atomic
from ragjax.retrieval.index import read_manifest

FORMAT = "ragjax.embeddings/1"


def _passage_bytes(p) -> bytes:
  return b"".join(len(b).to_bytes(8, "little") + b
                  for b in (f.encode("utf-8") for f in (p.id, p.title, p.text)))


def corpus_fingerprint(passages) -> str:
  """sha256 over every passage's (id, title, text), in order: identifies a corpus's content."""
  h = hashlib.sha256()
  for p in passages:
    h.update(_passage_bytes(p))
  return h.hexdigest()


def passage_digests(passages) -> np.ndarray:
  """`[N]` uint64: the first 8 bytes (little-endian) of sha256(id, title, text) per passage."""
  return np.array([int.from_bytes(hashlib.sha256(_passage_bytes(p)).digest()[:8], "little")
                   for p in passages], np.uint64)


def check_corpus(path, manifest: dict, passages, corpus_name: str = "the corpus") -> None:
  """Refuse embeddings (or an index) at `path` whose passages are not `passages`: other ids, or
  any text or title changed since they were embedded (stale vectors).

  Raises: IndexFormatError naming the first passage id that differs (from the stored
    `passage_digests.npy`, or the corpus sha256 when the directory has none).
  """
  path = pathlib.Path(path)
  ids = manifest.get("passage_ids")
  if ids is not None and list(ids) != [p.id for p in passages]:
    first = next((i for i, (a, p) in enumerate(zip(ids, passages)) if a != p.id),
                 min(len(ids), len(passages)))
    raise IndexFormatError(f"{path}: passage ids differ from {corpus_name} (first at position "
                           f"{first}; {len(ids)} embedded, {len(passages)} in the corpus)")
  want = manifest.get("corpus_sha256")
  if want is None or want == corpus_fingerprint(passages):
    return
  digests_file = path / "passage_digests.npy"
  if digests_file.is_file():
    changed = np.flatnonzero(np.load(digests_file) != passage_digests(passages))
    if changed.size:
      raise IndexFormatError(f"{path}: stale: {changed.size} passage(s) of {corpus_name} changed "
                             f"since they were embedded (first: id {passages[changed[0]].id!r}); "
                             "re-embed them (`ragjax embed` into a new directory)")
  raise IndexFormatError(f"{path}: stale: {corpus_name}'s content (sha256) differs from what "
                         "was embedded; re-embed it (`ragjax embed` into a new directory)")


def _save_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  with atomic_file(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array)


ENCODER_KEYS = ("sha256", "dim", "pooling", "normalize")  # what makes two encoders' vectors alike


def check_encoder(path, built_with: dict | None, retriever, flag: str = "--retriever") -> None:
  """Refuse to search the vectors at `path` (embeddings or an index) with a `retriever` other
  than the one that `built_with` (their manifest's encoder identity) names: another dimension,
  pooling, normalisation or weights (sha256). Checked before any text is encoded.

  Raises: IndexFormatError naming both encoders.
  """
  if not built_with:
    return
  ours = retriever.identity
  keys = [k for k in ENCODER_KEYS if k in built_with and k in ours] or ["name"]
  diff = [f"{k} {built_with.get(k)!r} there, {ours.get(k)!r} here" for k in keys
          if built_with.get(k) != ours.get(k)]
  if diff:
    raise IndexFormatError(f"{path}: built with encoder {built_with.get('name')!r} (dim "
                           f"{built_with.get('dim')}), not the {flag} {ours.get('name')!r} (dim "
                           f"{ours.get('dim')}): {'; '.join(diff)}")


def embed_corpus(retriever, passages: Sequence, out_dir, *, shard_size: int = 16384,
                 batch_size: int = 64, dtype: str = "float32", max_shards: int | None = None,
                 progress: bool = True, input_stats: dict | None = None) -> dict | None:
  """Embed `passages` (objects with `.id`, `.title`, `.text`) with the passage encoder.

  Args:
    retriever: a `ragjax.models.retriever.Retriever`.
    out_dir: embedding directory; created, or resumed when it holds a run of the same inputs.
    shard_size: passages per shard file.
    dtype: `"float32"` or `"bfloat16"`.
    max_shards: stop after this many new shards (returns None; used to split work and in tests).
    input_stats: what reading the corpus skipped (`ErrorPolicy.stats`), kept in the manifest.
  Returns:
    The manifest dict once every shard exists, else None.
  Raises:
    IndexFormatError: `out_dir` holds a run with another encoder, corpus or shard size.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  plan = {"format": FORMAT, "encoder": retriever.identity, "count": len(passages),
          "corpus_sha256": corpus_fingerprint(passages), "shard_size": int(shard_size),
          "dtype": dtype, "dim": retriever.dim}
  progress_file = out / "progress.json"
  if progress_file.is_file():
    previous = json.loads(progress_file.read_text())
    diff = sorted(k for k in plan if previous.get(k) != plan[k])
    if diff:
      raise IndexFormatError(f"{out}: holds embeddings of different inputs ({', '.join(diff)} "
                             "differ); use an empty directory")
  else:
    write_json_atomic(progress_file, plan)

  num_shards = max(1, -(-len(passages) // shard_size))
  names = [f"shard-{s:05d}.npy" for s in range(num_shards)]
  todo = [s for s in range(num_shards) if not (out / names[s]).is_file()]
  bar = tqdm(total=len(passages), desc="embed", unit="psg", disable=not progress,
             initial=len(passages) - sum(min(shard_size, len(passages) - s * shard_size)
                                         for s in todo))
  t0 = time.perf_counter()
  for done, s in enumerate(todo):
    if max_shards is not None and done >= max_shards:
      bar.close()
      return None
    chunk = passages[s * shard_size:(s + 1) * shard_size]
    stats = {"truncated": 0}
    vecs = retriever.encode_passages([p.title for p in chunk], [p.text for p in chunk],
                                     batch_size=batch_size, progress=bar, stats=stats)
    if dtype == "bfloat16":
      vecs = vecs.astype(ml_dtypes.bfloat16).view(np.uint16)
    write_json_atomic((out / names[s]).with_suffix(".json"), stats)  # before the shard: a
    _save_npy_atomic(out / names[s], vecs)                          # shard that exists has it
  bar.close()
  stat_files = [(out / n).with_suffix(".json") for n in names]
  truncated = sum(json.loads(f.read_text())["truncated"] for f in stat_files if f.is_file())
  if truncated:
    logging.getLogger(__name__).warning(
        "%s: %d of %d passages were longer than the encoder's max length (%s tokens) and were "
        "truncated", out, truncated, len(passages), retriever.identity.get("max_length"))
  _save_npy_atomic(out / "passage_digests.npy", passage_digests(passages))
  manifest = {**plan, "shards": names, "passage_ids": [p.id for p in passages],
              "embed_seconds": round(time.perf_counter() - t0, 3), "truncated": truncated,
              "input": {k: (input_stats or {}).get(k) for k in ("records", "skipped", "errors")
                        if k in (input_stats or {})}}
  write_json_atomic(out / "manifest.json", manifest)
  return manifest


def load_embeddings(path, passages=None, corpus_name: str = "the corpus"
                    ) -> tuple[np.ndarray, list[str], dict]:
  """`(embeddings [N, D] float32, passage ids [N], manifest)` of a finished embedding directory;
  with `passages`, first checked to be the embeddings of exactly those (`check_corpus`).

  Raises:
    IndexFormatError: no manifest (unfinished run), a missing shard, shapes that disagree with
      the manifest, or (with `passages`) other ids or stale content.
  """
  path = pathlib.Path(path)
  manifest = read_manifest(path, FORMAT)
  if passages is not None:
    check_corpus(path, manifest, passages, corpus_name)
  parts = []
  for name in manifest["shards"]:
    try:
      a = np.load(path / name)
    except (OSError, ValueError) as e:
      raise IndexFormatError(f"{path / name}: unreadable shard: {e}") from e
    if manifest["dtype"] == "bfloat16":
      a = a.view(ml_dtypes.bfloat16)
    if a.ndim != 2 or a.shape[1] != manifest["dim"]:
      raise IndexFormatError(f"{path / name}: shape {a.shape}, manifest dimension is "
                             f"{manifest['dim']}")
    parts.append(a.astype(np.float32))
  emb = np.concatenate(parts) if parts else np.zeros((0, manifest["dim"]), np.float32)
  if emb.shape[0] != manifest["count"] or len(manifest["passage_ids"]) != manifest["count"]:
    raise IndexFormatError(f"{path}: {emb.shape[0]} vectors and {len(manifest['passage_ids'])} "
                           f"ids, manifest count is {manifest['count']}")
  return emb, manifest["passage_ids"], manifest
