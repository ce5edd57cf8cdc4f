"""Corpora and question sets larger than memory: TFDS array_record datasets, written and read
without TensorFlow.

Writing streams an iterable through `tfds.core.SequentialWriter` (array_record shards of
`examples_per_shard` records, in the order given; records serialized as tf.train.Example protos
by TFDS's own pure-Python serializer) into a temporary directory that is renamed into place only
when complete. Reading goes through `tfds.builder_from_directory(path).as_data_source()`, random
access over the array_record shards, decoded with numpy; TensorFlow is never imported.

Why not `tfds.core.GeneratorBasedBuilder`: it also runs without TensorFlow, but only while a split
fits its in-memory shuffle buffer (1 GB of serialized records): past that it spills to temporary
buckets through `tf.io.gfile` and fails with `ModuleNotFoundError: tensorflow` (tfds 4.9.10,
`core/shuffle.py`). It also reorders records by key hash unless `disable_shuffling` is set, and
`dataset_info_from_configs` wants the builder to live in a dataset package directory. The adhoc
`tfds.dataset_builders.store_as_tfds_dataset` is the same builder underneath, and its
`_split_generators` tests `isinstance(ds, tf.data.Dataset)`, which touches the lazy TF module (in
this environment it fails earlier still, on a missing `importlib_resources`).

Layout (the usual TFDS one, so `tfds.data_source(name, data_dir=data_dir, split="full")` also
reads it):

  data_dir/<name>/1.0.0/dataset_info.json, features.json,
                        <name>-full.array_record-00000, <name>-full.array_record-00001, ...

  path = build_corpus_dataset(iter_bio_passages(10_000_000), "runs/data", name="bios10m",
                              check_unique_ids=False)  # ids unique by construction
  corpus = CorpusSource("runs/data", name="bios10m")    # or CorpusSource(path)
  corpus[123], len(corpus), corpus.batch(0, 1024)       # -> Passage, int, list[Passage]
"""
from __future__ import annotations

import collections.abc
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.errors import DataError

VERSION = "1.0.0"
SPLIT = "full"  # the one split of every dataset written here
_WRITE_BATCH = 4096  # records per SequentialWriter.add_examples (it rewrites metadata per call)
_READ_BATCH = 1024  # records per read when iterating
_INCOMPLETE_PREFIX = "incomplete."  # TFDS's own prefix for directories being generated
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")

CORPUS_FEATURE_NAMES = ("id", "title", "text")
QUESTION_FEATURE_NAMES = ("id", "question", "answers", "gold_passage_ids", "answers_are_regex")


def corpus_features() -> tfds.features.FeaturesDict:
  """TFDS features of a corpus record: {id, title, text}, all UTF-8 strings."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "title": tfds.features.Text(),
      "text": tfds.features.Text(),
  })


def question_features() -> tfds.features.FeaturesDict:
  """TFDS features of a question record: strings, string sequences, and a bool."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "question": tfds.features.Text(),
      "answers": tfds.features.Sequence(tfds.features.Text()),
      "gold_passage_ids": tfds.features.Sequence(tfds.features.Text()),
      "answers_are_regex": tfds.features.Scalar(dtype=np.bool_),
  })


# ----------------------------------------------------------------------------------------------
# Writing.

def _check_str(value, *, where, index: int, field: str) -> str:
  if not isinstance(value, str):
    raise DataError(f"record {index}: expected a string, got {type(value).__name__}",
                    path=where, field=field)
  return value


def _check_str_tuple(values, *, where, index: int, field: str) -> list[str]:
  if isinstance(values, (str, bytes)) or not isinstance(values, collections.abc.Sequence):
    raise DataError(f"record {index}: expected a tuple of strings, got {type(values).__name__}",
                    path=where, field=field)
  return [_check_str(v, where=where, index=index, field=field) for v in values]


def _passage_record(p, *, where, index: int) -> dict[str, Any]:
  if not isinstance(p, Passage):
    raise DataError(f"record {index}: expected a Passage, got {type(p).__name__}", path=where)
  return {"id": _check_str(p.id, where=where, index=index, field="id"),
          "title": _check_str(p.title, where=where, index=index, field="title"),
          "text": _check_str(p.text, where=where, index=index, field="text")}


def _question_record(q, *, where, index: int) -> dict[str, Any]:
  if not isinstance(q, Question):
    raise DataError(f"record {index}: expected a Question, got {type(q).__name__}", path=where)
  if not isinstance(q.answers_are_regex, (bool, np.bool_)):
    raise DataError(f"record {index}: expected a bool, got {type(q.answers_are_regex).__name__}",
                    path=where, field="answers_are_regex")
  return {
      "id": _check_str(q.id, where=where, index=index, field="id"),
      "question": _check_str(q.question, where=where, index=index, field="question"),
      "answers": _check_str_tuple(q.answers, where=where, index=index, field="answers"),
      "gold_passage_ids": _check_str_tuple(q.gold_passage_ids, where=where, index=index,
                                           field="gold_passage_ids"),
      "answers_are_regex": bool(q.answers_are_regex),
  }


def _dataset_dir(data_dir, name: str) -> pathlib.Path:
  if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
    raise ValueError(f"dataset name must be lower-case letters, digits and '_', starting with a "
                     f"letter (a TFDS name), got {name!r}")
  return pathlib.Path(data_dir) / name / VERSION


def _check_feature_names(path: pathlib.Path, info, expected: tuple[str, ...], kind: str) -> None:
  got = tuple(sorted(info.features.keys()))
  if got != tuple(sorted(expected)):
    raise DataError(f"not a {kind} dataset: features {list(got)}, expected {sorted(expected)}",
                    path=path)


def _build(records: Iterable, data_dir, *, name: str, kind: str, features_fn: Callable,
           feature_names: tuple[str, ...], to_record: Callable, examples_per_shard: int,
           overwrite: bool, check_unique_ids: bool) -> pathlib.Path:
  """Writes `records` to `data_dir/name/VERSION` (see `build_corpus_dataset`)."""
  if examples_per_shard < 1:
    raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
  final_dir = _dataset_dir(data_dir, name)
  if (final_dir / "dataset_info.json").exists() and not overwrite:
    # Reuse: only complete builds are ever renamed to `final_dir`.
    _check_feature_names(final_dir, tfds.builder_from_directory(final_dir).info, feature_names,
                         kind)
    return final_dir
  final_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = final_dir.parent / f"{_INCOMPLETE_PREFIX}{uuid.uuid4().hex}_{VERSION}"
  try:
    tmp_dir.mkdir()
    identity = tfds.core.DatasetIdentity(name=name, version=tfds.core.Version(VERSION),
                                         data_dir=os.fspath(tmp_dir), module_name="")
    info = tfds.core.DatasetInfo(builder=identity, features=features_fn(),
                                 description=f"ragjax {kind}, written by ragjax.data.tfds_store")
    writer = tfds.core.SequentialWriter(info, max_examples_per_shard=examples_per_shard,
                                        file_format="array_record")
    writer.initialize_splits([SPLIT])
    seen_ids = set() if check_unique_ids else None
    batch = []
    for index, item in enumerate(records):
      record = to_record(item, where=final_dir, index=index)
      if seen_ids is not None:
        if record["id"] in seen_ids:
          raise DataError(f"record {index}: duplicate id {record['id']!r}", path=final_dir,
                          field="id")
        seen_ids.add(record["id"])
      batch.append(record)
      if len(batch) >= _WRITE_BATCH:
        writer.add_examples({SPLIT: batch})
        batch = []
    if batch:
      writer.add_examples({SPLIT: batch})
    writer.close_all()
    if overwrite and final_dir.exists():
      old_dir = final_dir.parent / f"{_INCOMPLETE_PREFIX}{uuid.uuid4().hex}_old_{VERSION}"
      os.rename(final_dir, old_dir)
      os.rename(tmp_dir, final_dir)
      shutil.rmtree(old_dir, ignore_errors=True)
    else:
      try:
        os.rename(tmp_dir, final_dir)
      except OSError:
        # Another process finished the same build first: keep theirs.
        if not (final_dir / "dataset_info.json").exists():
          raise
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)
  return final_dir


def build_corpus_dataset(passages: Iterable[Passage], data_dir, *, name: str = "corpus",
                         examples_per_shard: int = 100_000, overwrite: bool = False,
                         check_unique_ids: bool = True) -> pathlib.Path:
  """Writes a corpus once to `data_dir/name/1.0.0` as TFDS array_record, in the given order.

  Streams: memory stays O(`_WRITE_BATCH` records), plus the set of seen ids when
  `check_unique_ids` (~100 bytes per record; turn it off for corpora of tens of millions).
  The build goes to a temporary `incomplete.*` sibling directory renamed into place when it is
  complete, so an interrupted build is never read (a killed process may leave that directory
  behind; it is ignored). If the dataset already exists it is reused and `passages` is not read,
  even if it differs; pass `overwrite=True` (or a new `name`) after changing the data.

  Args:
    passages: any iterable of `Passage`, e.g. a generator.
    data_dir: root directory (created if missing).
    name: TFDS dataset name: lower-case letters, digits, '_'.
    examples_per_shard: records per array_record file.
    overwrite: rebuild and replace an existing dataset.
    check_unique_ids: raise on a repeated passage id.

  Returns:
    The dataset directory `data_dir/name/1.0.0` (accepted by `CorpusSource`).

  Raises:
    DataError: a record is not a `Passage`, has a non-string field, or repeats an id; or an
      existing dataset at that name is not a corpus.
    ValueError: bad `name` or `examples_per_shard`.
  """
  return _build(passages, data_dir, name=name, kind="corpus", features_fn=corpus_features,
                feature_names=CORPUS_FEATURE_NAMES, to_record=_passage_record,
                examples_per_shard=examples_per_shard, overwrite=overwrite,
                check_unique_ids=check_unique_ids)


def build_questions_dataset(questions: Iterable[Question], data_dir, *, name: str = "questions",
                            examples_per_shard: int = 100_000, overwrite: bool = False,
                            check_unique_ids: bool = True) -> pathlib.Path:
  """Writes a question set once to `data_dir/name/1.0.0`; as `build_corpus_dataset`.

  Records keep `answers` and `gold_passage_ids` (string sequences, possibly empty) and
  `answers_are_regex`.

  Raises:
    DataError: a record is not a `Question`, has a field of the wrong type, or repeats an id;
      or an existing dataset at that name is not a question set.
    ValueError: bad `name` or `examples_per_shard`.
  """
  return _build(questions, data_dir, name=name, kind="question set",
                features_fn=question_features, feature_names=QUESTION_FEATURE_NAMES,
                to_record=_question_record, examples_per_shard=examples_per_shard,
                overwrite=overwrite, check_unique_ids=check_unique_ids)


# ----------------------------------------------------------------------------------------------
# Reading.

def _str(b) -> str:
  return b.decode("utf-8") if isinstance(b, bytes) else str(b)


def _to_passage(ex: dict) -> Passage:
  return Passage(id=_str(ex["id"]), title=_str(ex["title"]), text=_str(ex["text"]))


def _to_question(ex: dict) -> Question:
  return Question(id=_str(ex["id"]), question=_str(ex["question"]),
                  answers=tuple(_str(a) for a in ex["answers"]),
                  gold_passage_ids=tuple(_str(g) for g in ex["gold_passage_ids"]),
                  answers_are_regex=bool(ex["answers_are_regex"]))


class _Source(collections.abc.Sequence):
  """Random access over one dataset written by `_build`; see `CorpusSource`."""

  _KIND = ""
  _FEATURE_NAMES: tuple[str, ...] = ()
  _DEFAULT_NAME = ""
  _BUILD_FN = ""

  def __init__(self, data_dir, name: str | None = None):
    path = pathlib.Path(data_dir)
    if name is not None or not (path / "dataset_info.json").exists():
      path = _dataset_dir(data_dir, name or self._DEFAULT_NAME)
    if not (path / "dataset_info.json").exists():
      raise DataError(f"no complete {self._KIND} dataset here (no dataset_info.json); write one "
                      f"with {self._BUILD_FN}", path=path)
    builder = tfds.builder_from_directory(path)
    _check_feature_names(path, builder.info, self._FEATURE_NAMES, self._KIND)
    self.path = path
    self.name = builder.info.name
    if builder.info.splits[SPLIT].num_examples == 0:
      self._source, self._len = None, 0  # array_record refuses a split with no shard files
    else:
      self._source = builder.as_data_source(split=SPLIT)
      self._len = len(self._source)

  def __reduce__(self):  # picklable (e.g. for grain worker processes): reopen from the path
    return (type(self), (os.fspath(self.path),))

  def __repr__(self) -> str:
    return f"{type(self).__name__}({os.fspath(self.path)!r}, len={self._len})"

  def __len__(self) -> int:
    return self._len

  def _decode(self, ex: dict):
    raise NotImplementedError

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self._read(range(*i.indices(self._len)))
    i = int(i)  # numpy ints too
    if i < 0:
      i += self._len
    if not 0 <= i < self._len:
      raise IndexError(f"index {i} out of range for {self._len} records in {self.path}")
    return self._decode(self._source[i])

  def _read(self, indices: range | list[int]) -> list:
    indices = list(indices)
    if not indices:
      return []
    return [self._decode(ex) for ex in self._source.__getitems__(indices)]

  def batch(self, start: int, stop: int) -> list:
    """Records `start .. stop-1` (clipped to the dataset, like a slice), in one batched read."""
    return self._read(range(*slice(start, stop).indices(self._len)))

  def __iter__(self) -> Iterator:
    for start in range(0, self._len, _READ_BATCH):
      yield from self.batch(start, start + _READ_BATCH)


class CorpusSource(_Source):
  """A corpus written by `build_corpus_dataset`: `len(src)`, `src[i] -> Passage`, slices,
  `src.batch(start, stop) -> list[Passage]`, iteration in written order.

  Args:
    data_dir: the `data_dir` given to `build_corpus_dataset` (then `name` picks the dataset,
      default "corpus"), or the dataset directory it returned.
    name: dataset name under `data_dir`.

  Raises:
    DataError: no complete dataset there, or it is not a corpus.
  """
  _KIND = "corpus"
  _FEATURE_NAMES = CORPUS_FEATURE_NAMES
  _DEFAULT_NAME = "corpus"
  _BUILD_FN = "build_corpus_dataset"

  def _decode(self, ex: dict) -> Passage:
    return _to_passage(ex)


class QuestionSource(_Source):
  """A question set written by `build_questions_dataset`: `len(src)`, `src[i] -> Question`,
  slices, `src.batch(start, stop) -> list[Question]`, iteration in written order.

  Args:
    data_dir: the `data_dir` given to `build_questions_dataset` (then `name` picks the dataset,
      default "questions"), or the dataset directory it returned.
    name: dataset name under `data_dir`.

  Raises:
    DataError: no complete dataset there, or it is not a question set.
  """
  _KIND = "question set"
  _FEATURE_NAMES = QUESTION_FEATURE_NAMES
  _DEFAULT_NAME = "questions"
  _BUILD_FN = "build_questions_dataset"

  def _decode(self, ex: dict) -> Question:
    return _to_question(ex)
