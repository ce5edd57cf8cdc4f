"""Resumable sharded corpus embedding: manifest, resume after a kill, identical output."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ragjax.data.corpus import Passage
from ragjax.errors import IndexFormatError
from ragjax.models.retriever import load_retriever
from ragjax.retrieval.embed import embed_corpus, load_embeddings

WORDS = "the a of in paris london tokyo river mountain city capital alice bob physics music".split()


def corpus(n, seed=0):
  rng = np.random.default_rng(seed)
  return [Passage(f"p{i}", str(rng.choice(WORDS)),
                  " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40)))))
          for i in range(n)]


@pytest.fixture(scope="module")
def tiny_retriever(tmp_path_factory):
  from conftest import write_tiny_bert
  path, _ = write_tiny_bert(tmp_path_factory.mktemp("m") / "bert")
  return load_retriever(str(path), max_length=48)


def test_embeddings_and_manifest(tmp_path, tiny_retriever):
  passages = corpus(45)
  m = embed_corpus(tiny_retriever, passages, tmp_path / "e", shard_size=20, batch_size=8,
                   progress=False)
  assert m["shards"] == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
  emb, ids, manifest = load_embeddings(tmp_path / "e")
  assert ids == [p.id for p in passages] and manifest["dim"] == 32
  direct = tiny_retriever.encode_passages([p.title for p in passages[:5]],
                                          [p.text for p in passages[:5]], batch_size=8)
  np.testing.assert_allclose(emb[:5], direct, atol=1e-6)
  assert manifest["encoder"] == tiny_retriever.identity


def test_resume_after_partial_run_is_byte_identical(tmp_path, tiny_retriever):
  passages = corpus(50, seed=1)
  embed_corpus(tiny_retriever, passages, tmp_path / "full", shard_size=16, batch_size=8,
               progress=False)
  assert embed_corpus(tiny_retriever, passages, tmp_path / "part", shard_size=16, batch_size=8,
                      max_shards=2, progress=False) is None
  with pytest.raises(IndexFormatError, match="no manifest.json"):
    load_embeddings(tmp_path / "part")
  first = (tmp_path / "part" / "shard-00000.npy").stat().st_mtime_ns
  embed_corpus(tiny_retriever, passages, tmp_path / "part", shard_size=16, batch_size=8,
               progress=False)
  assert (tmp_path / "part" / "shard-00000.npy").stat().st_mtime_ns == first, "shard redone"
  for name in json.loads((tmp_path / "full" / "manifest.json").read_text())["shards"]:
    assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes()


def test_rerun_with_other_inputs_is_refused(tmp_path, tiny_retriever):
  embed_corpus(tiny_retriever, corpus(10), tmp_path / "e", shard_size=4, progress=False)
  with pytest.raises(IndexFormatError, match="corpus_sha256"):
    embed_corpus(tiny_retriever, corpus(10, seed=9), tmp_path / "e", shard_size=4,
                 progress=False)
  with pytest.raises(IndexFormatError, match="shard_size"):
    embed_corpus(tiny_retriever, corpus(10), tmp_path / "e", shard_size=5, progress=False)


def test_bfloat16_shards(tmp_path, tiny_retriever):
  passages = corpus(12)
  embed_corpus(tiny_retriever, passages, tmp_path / "f", progress=False)
  embed_corpus(tiny_retriever, passages, tmp_path / "b", dtype="bfloat16", progress=False)
  f32, _, _ = load_embeddings(tmp_path / "f")
  b16, _, m = load_embeddings(tmp_path / "b")
  assert m["dtype"] == "bfloat16" and b16.dtype == np.float32
  np.testing.assert_allclose(b16, f32, rtol=1e-2, atol=1e-2)
  assert not np.array_equal(b16, f32)


def test_sigkill_mid_run_then_resume(tmp_path):
  """A real `ragjax embed` process killed after its first shard; the rerun finishes the rest."""
  from conftest import write_tiny_bert
  model, _ = write_tiny_bert(tmp_path / "bert")
  rows = [{"id": f"p{i}", "title": p.title, "text": p.text} for i, p in enumerate(corpus(64, 3))]
  (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  cmd = [sys.executable, "-m", "ragjax.cli", "embed", "--corpus", str(tmp_path / "c.jsonl"),
         "--retriever", str(model), "--shard-size", "8", "--batch-size", "8"]
  env = dict(os.environ)
  slow = textwrap.dedent("""
    import sys, time
    import ragjax.retrieval.embed as e
    orig = e._save_npy_atomic
    def slow_save(path, a):
      orig(path, a)
      time.sleep(0.5)
    e._save_npy_atomic = slow_save
    from ragjax.cli import main
    sys.exit(main(sys.argv[1:]))
  """)
  proc = subprocess.Popen([sys.executable, "-c", slow] + cmd[3:] + ["--out", str(tmp_path / "a")],
                          env=env, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not (tmp_path / "a" / "shard-00001.npy").exists():
    assert time.time() < deadline and proc.poll() is None, "embedding did not start"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "a" / "manifest.json").exists()
  done = sorted(p.name for p in (tmp_path / "a").glob("shard-*.npy"))
  assert 2 <= len(done) < 8
  subprocess.run(cmd + ["--out", str(tmp_path / "a")], check=True, env=env,
                 stderr=subprocess.DEVNULL)
  subprocess.run(cmd + ["--out", str(tmp_path / "b")], check=True, env=env,
                 stderr=subprocess.DEVNULL)
  a, ids_a, _ = load_embeddings(tmp_path / "a")
  b, ids_b, _ = load_embeddings(tmp_path / "b")
  assert ids_a == ids_b and a.shape == (64, 32)
  np.testing.assert_array_equal(a, b)


def test_compiles_are_bounded_by_length_buckets(tmp_path):
  from conftest import write_tiny_bert
  path, _ = write_tiny_bert(tmp_path / "bert")
  r = load_retriever(str(path), max_length=64)
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, size=n)) for n in rng.integers(1, 80, size=200)]
  r.encode_queries(texts, batch_size=8)
  lengths = {r.tokenizer.encode([t]).shape[1] for t in texts}
  compiles = r._fn("query")._cache_size()
  assert 2 <= compiles <= len(lengths) <= len(r.tokenizer.buckets)
  r.encode_queries(texts[::-1], batch_size=8)  # same shapes: no new compiles
  assert r._fn("query")._cache_size() == compiles
