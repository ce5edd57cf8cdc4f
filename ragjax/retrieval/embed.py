"""Embed a corpus into resumable shards: `shard-00000.npy ... + manifest.json`.

Layout of an embedding directory:
  progress.json      what is being embedded (encoder identity, corpus fingerprint, shard size);
                     a rerun with different inputs is refused instead of mixing shards
  shard-NNNNN.npy    `[n, D]` float32, or bfloat16 stored as uint16 bits; each written to a
                     temporary name and renamed, so a file that exists is complete
  manifest.json      written last: shard files, passage ids in order, dimension, dtype, encoder

A run killed half-way leaves finished shards; the rerun skips them and produces byte-identical
output (each shard is encoded on its own, in a fixed length-sorted order).
"""
from __future__ import annotations

import hashlib
import json
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


def corpus_fingerprint(passages) -> str:
  """sha256 over every passage's (id, title, text), in order: identifies a corpus's content."""
  h = hashlib.sha256()
  for p in passages:
    for field in (p.id, p.title, p.text):
      b = field.encode("utf-8")
      h.update(len(b).to_bytes(8, "little"))
      h.update(b)
  return h.hexdigest()


def _save_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  with atomic_file(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array)


def embed_corpus(retriever, passages: Sequence, out_dir, *, shard_size: int = 16384,
                 batch_size: int = 64, dtype: str = "float32", max_shards: int | None = None,
                 progress: bool = True) -> dict | None:
  """Embed `passages` (objects with `.id`, `.title`, `.text`) with the passage encoder.

  Args:
    retriever: a `ragjax.models.retriever.Retriever`.
    out_dir: embedding directory; created, or resumed when it holds a run of the same inputs.
    shard_size: passages per shard file.
    dtype: `"float32"` or `"bfloat16"`.
    max_shards: stop after this many new shards (returns None; used to split work and in tests).
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
    vecs = retriever.encode_passages([p.title for p in chunk], [p.text for p in chunk],
                                     batch_size=batch_size, progress=bar)
    if dtype == "bfloat16":
      vecs = vecs.astype(ml_dtypes.bfloat16).view(np.uint16)
    _save_npy_atomic(out / names[s], vecs)
  bar.close()
  manifest = {**plan, "shards": names, "passage_ids": [p.id for p in passages],
              "embed_seconds": round(time.perf_counter() - t0, 3)}
  write_json_atomic(out / "manifest.json", manifest)
  return manifest


def load_embeddings(path) -> tuple[np.ndarray, list[str], dict]:
  """`(embeddings [N, D] float32, passage ids [N], manifest)` of a finished embedding directory.

  Raises:
    IndexFormatError: no manifest (unfinished run), a missing shard, or shapes that disagree
      with the manifest.
  """
  path = pathlib.Path(path)
  manifest = read_manifest(path, FORMAT)
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
