"""TFDS array_record store: round trips, order, reuse, atomic builds, and no TensorFlow."""
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import pytest

from ragjax.data import synthetic, tfds_store
from ragjax.data.corpus import Passage
from ragjax.data.qa import Question
from ragjax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _passages(n=300):
  out = list(synthetic.iter_bio_passages(n - 3, seed=7))
  out += [Passage("ü-1", "Zoë Åström", "Köln liegt am Rhein. 北京是中国的首都。 🚀"),
          Passage("empty", "", ""),
          Passage("ws", "  tabs\tand\nnewlines ", "line one\nline two\r\n\x00nul")]
  return out


def _questions():
  bios = synthetic.make_bios(60, seed=7)
  out = bios.train_questions + bios.eval_questions
  out += [Question("q-ü", "Wo liegt Köln?", ("am Rhein", "Nordrhein-Westfalen"), ("ü-1",)),
          Question("q-none", "No answers, no gold?", (), ()),
          Question("q-re", "Regex?", (r"\d{4}", "北京"), ("a", "b", "c"), answers_are_regex=True)]
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  passages, questions = _passages(), _questions()
  corpus_dir = tfds_store.build_corpus_dataset(iter(passages), data_dir, examples_per_shard=128)
  questions_dir = tfds_store.build_questions_dataset((q for q in questions), data_dir,
                                                      name="bio_questions")
  return data_dir, corpus_dir, questions_dir, passages, questions


def test_layout(built):
  data_dir, corpus_dir, questions_dir, passages, _ = built
  assert corpus_dir == data_dir / "corpus" / "1.0.0"
  assert questions_dir == data_dir / "bio_questions" / "1.0.0"
  shards = sorted(p.name for p in corpus_dir.glob("corpus-full.array_record-*"))
  assert len(shards) == 3  # 300 records, 128 per shard
  assert (corpus_dir / "dataset_info.json").exists() and (corpus_dir / "features.json").exists()
  assert sorted(os.listdir(data_dir / "corpus")) == ["1.0.0"]  # no temporary directory left


def test_corpus_round_trip_in_order(built):
  data_dir, corpus_dir, _, passages, _ = built
  src = tfds_store.CorpusSource(data_dir)
  assert len(src) == len(passages)
  assert list(src) == passages
  assert src[0] == passages[0] and src[-1] == passages[-1] and src[297] == passages[297]
  assert src.batch(120, 140) == passages[120:140]  # crosses a shard boundary
  assert src.batch(290, 10_000) == passages[290:]
  assert src.batch(5, 5) == []
  assert src[10:20] == passages[10:20]
  with pytest.raises(IndexError):
    src[len(passages)]
  assert list(tfds_store.CorpusSource(corpus_dir)) == passages  # the returned path works too


def test_questions_round_trip(built):
  data_dir, _, questions_dir, _, questions = built
  src = tfds_store.QuestionSource(data_dir, name="bio_questions")
  assert list(src) == questions
  got = src[len(questions) - 1]
  assert got.answers_are_regex is True and got.answers == (r"\d{4}", "北京")
  assert got.gold_passage_ids == ("a", "b", "c")
  assert src[len(questions) - 2].answers == () and src[len(questions) - 2].gold_passage_ids == ()
  assert tfds_store.QuestionSource(questions_dir).batch(0, 3) == questions[:3]


def test_source_pickles(built):
  data_dir, _, _, passages, _ = built
  src = pickle.loads(pickle.dumps(tfds_store.CorpusSource(data_dir)))
  assert len(src) == len(passages) and src[3] == passages[3]


def test_build_is_reused(built):
  data_dir, corpus_dir, _, passages, _ = built
  before = {p.name: p.stat().st_mtime_ns for p in corpus_dir.iterdir()}

  def must_not_be_read():
    raise AssertionError("the existing build should have been reused")
    yield  # pylint: disable=unreachable

  assert tfds_store.build_corpus_dataset(must_not_be_read(), data_dir) == corpus_dir
  assert {p.name: p.stat().st_mtime_ns for p in corpus_dir.iterdir()} == before
  assert list(tfds_store.CorpusSource(data_dir)) == passages


def test_overwrite_replaces(tmp_path):
  first = [Passage("a", "A", "one")]
  second = [Passage("b", "B", "two"), Passage("c", "C", "three")]
  tfds_store.build_corpus_dataset(first, tmp_path)
  tfds_store.build_corpus_dataset(second, tmp_path, overwrite=True)
  assert list(tfds_store.CorpusSource(tmp_path)) == second
  assert sorted(os.listdir(tmp_path / "corpus")) == ["1.0.0"]


def test_interrupted_build_is_never_read(tmp_path):
  def dies_halfway():
    yield from synthetic.iter_bio_passages(50)
    raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

  with pytest.raises(KeyboardInterrupt):
    tfds_store.build_corpus_dataset(dies_halfway(), tmp_path, examples_per_shard=10)
  assert os.listdir(tmp_path / "corpus") == []  # temp dir removed, nothing renamed into place
  with pytest.raises(DataError, match="no complete corpus"):
    tfds_store.CorpusSource(tmp_path)
  # A process killed outright leaves its temp dir: it is ignored, and the next build completes.
  (tmp_path / "corpus" / "incomplete.deadbeef_1.0.0").mkdir()
  (tmp_path / "corpus" / "incomplete.deadbeef_1.0.0" / "dataset_info.json").write_text("{}")
  with pytest.raises(DataError):
    tfds_store.CorpusSource(tmp_path)
  tfds_store.build_corpus_dataset(synthetic.iter_bio_passages(20), tmp_path)
  assert len(tfds_store.CorpusSource(tmp_path)) == 20


def test_empty_dataset(tmp_path):
  tfds_store.build_questions_dataset([], tmp_path)
  src = tfds_store.QuestionSource(tmp_path)
  assert len(src) == 0 and list(src) == [] and src.batch(0, 10) == []


def test_stream_from_generator(tmp_path):
  consumed = []

  def gen():
    for p in synthetic.iter_bio_passages(5000, seed=1):
      consumed.append(p.id)
      yield p

  path = tfds_store.build_corpus_dataset(gen(), tmp_path, name="bios5k", examples_per_shard=2000)
  assert len(consumed) == 5000
  src = tfds_store.CorpusSource(path)
  assert len(src) == 5000 and src[4321] == next(
      p for i, p in enumerate(synthetic.iter_bio_passages(5000, seed=1)) if i == 4321)


def test_bad_input(tmp_path):
  with pytest.raises(DataError, match="record 1: expected a Passage"):
    tfds_store.build_corpus_dataset([Passage("a", "", "x"), ("b", "", "y")], tmp_path)
  with pytest.raises(DataError, match="field 'text'.*got int"):
    tfds_store.build_corpus_dataset([Passage("a", "", 3)], tmp_path)
  with pytest.raises(DataError, match="duplicate id 'a'"):
    tfds_store.build_corpus_dataset([Passage("a", "", "x"), Passage("a", "", "y")], tmp_path)
  with pytest.raises(DataError, match="field 'answers'"):
    tfds_store.build_questions_dataset([Question("q", "?", "not a tuple")], tmp_path)
  with pytest.raises(ValueError, match="dataset name"):
    tfds_store.build_corpus_dataset([], tmp_path, name="Bad-Name")
  assert not (tmp_path / "corpus" / "1.0.0").exists()
  tfds_store.build_corpus_dataset([Passage("a", "", "x")], tmp_path)
  with pytest.raises(DataError, match="not a question set"):
    tfds_store.QuestionSource(tmp_path, name="corpus")
  with pytest.raises(DataError, match="not a question set"):
    tfds_store.build_questions_dataset([], tmp_path, name="corpus")


def test_reading_does_not_import_tensorflow(built):
  data_dir, _, _, passages, questions = built
  script = textwrap.dedent(f"""
      import json, sys
      import tensorflow_datasets as tfds
      from ragjax.data import tfds_store
      corpus = tfds_store.CorpusSource({str(data_dir)!r})
      qs = tfds_store.QuestionSource({str(data_dir)!r}, name="bio_questions")
      plain = tfds.data_source("corpus", data_dir={str(data_dir)!r}, split="full")
      out = {{"n": len(corpus), "last": corpus[-1].text,
             "batch": [p.id for p in corpus.batch(0, 5)],
             "q": list(qs[len(qs) - 3].answers), "n_q": len(list(qs)), "plain_tfds": len(plain),
             "tf_modules": sorted(m for m in sys.modules
                                  if m == "tensorflow" or m.startswith("tensorflow."))}}
      print(json.dumps(out))
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "Failed to import TensorFlow" not in proc.stdout + proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["tf_modules"] == []
  assert out["n"] == len(passages) and out["last"] == passages[-1].text
  assert out["batch"] == [p.id for p in passages[:5]]
  assert out["q"] == list(questions[-3].answers) and out["n_q"] == len(questions)
  assert out["plain_tfds"] == len(passages)


def test_writing_does_not_import_tensorflow(tmp_path):
  script = textwrap.dedent(f"""
      import json, sys
      from ragjax.data import synthetic, tfds_store
      tfds_store.build_corpus_dataset(synthetic.iter_bio_passages(100), {str(tmp_path)!r})
      bios = synthetic.make_bios(20)
      tfds_store.build_questions_dataset(bios.train_questions, {str(tmp_path)!r})
      print(json.dumps(sorted(m for m in sys.modules
                              if m == "tensorflow" or m.startswith("tensorflow."))))
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
