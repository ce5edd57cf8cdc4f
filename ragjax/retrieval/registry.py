"""Load a published index of any kind (exact, ScaNN, BM25) by its manifest.

  index = load_index("runs/idx", expect_dim=384, expect_count=len(passage_ids))

The kinds register themselves as subclasses of `ragjax.retrieval.index.Index`; the ScaNN and
bm25s back-ends are imported here on first use (heavier imports, optional at run time).
"""
from __future__ import annotations

import json
import pathlib

from ragjax.errors import IndexFormatError
from ragjax.retrieval.index import _REGISTRY, MANIFEST, Index, read_manifest


def load_index(path, *, expect_dim: int | None = None, expect_count: int | None = None,
               expect_encoder: dict | None = None) -> Index:
  """Load a published index of any kind, checking what the caller expects.

  Raises:
    IndexFormatError: missing/invalid manifest, unknown kind, or a count, dimension or encoder
      identity that disagrees with the files or with the caller (the message says which).
  """
  path = pathlib.Path(path)
  manifest = read_manifest(path)
  kind = manifest.get("kind")
  if kind not in _REGISTRY:
    _import_backends()
  if kind not in _REGISTRY:
    raise IndexFormatError(f"{path / MANIFEST}: unknown index kind {kind!r}; known: "
                           f"{sorted(_REGISTRY)}")
  try:
    passage_ids = json.loads((path / "passage_ids.json").read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise IndexFormatError(f"{path / 'passage_ids.json'}: unreadable: {e}") from e
  problems = []
  if len(passage_ids) != manifest["count"]:
    problems.append(f"passage_ids.json has {len(passage_ids)} ids, manifest count is "
                    f"{manifest['count']}")
  if expect_count is not None and manifest["count"] != expect_count:
    problems.append(f"index holds {manifest['count']} passages, expected {expect_count}")
  if expect_dim is not None and manifest.get("dim") not in (None, expect_dim):
    problems.append(f"index dimension is {manifest.get('dim')}, expected {expect_dim}")
  if expect_encoder is not None and manifest.get("encoder") not in (None, expect_encoder):
    problems.append(f"index was built with encoder {manifest.get('encoder')}, expected "
                    f"{expect_encoder}")
  if problems:
    raise IndexFormatError(f"{path}: " + "; ".join(problems))
  index = _REGISTRY[kind]._load_files(path, passage_ids, manifest)
  if index.dim is not None and getattr(index, "_rows_dim", index.dim) != index.dim:
    raise IndexFormatError(f"{path}: stored vectors have dimension {index._rows_dim}, manifest "
                           f"says {index.dim}")
  return index


def _import_backends():
  # Register the optional back-ends on first use (ScaNN and bm25s are heavier imports).
  from ragjax.retrieval import bm25_index, scann_index  # noqa: F401
