"""The `ragjax` command line end to end on the built-in synthetic biographies."""
import json
import subprocess
import sys

import pytest

from ragjax.cli import main


def run(*args):
  return main([str(a) for a in args])


@pytest.fixture(scope="module")
def bios(tmp_path_factory):
  out = tmp_path_factory.mktemp("bios")
  assert run("make-bios", "--num-people", 60, "--out", out) == 0
  return out


def test_help_lists_subcommands():
  out = subprocess.run([sys.executable, "-m", "ragjax.cli", "--help"], capture_output=True,
                       text=True, check=True).stdout
  for cmd in ("make-bios", "embed", "index", "retrieve", "eval-retrieval"):
    assert cmd in out


@pytest.mark.parametrize("retriever,index", [("minilm", "exact"), ("minilm", "scann"),
                                             ("bm25", "exact")])
def test_eval_retrieval_contract(bios, tmp_path, retriever, index):
  out = tmp_path / "r.json"
  assert run("eval-retrieval", "--corpus", bios / "corpus.jsonl", "--questions",
             bios / "eval_questions.jsonl", "--retriever", retriever, "--index", index,
             "--k", "1,5,20", "--out", out) == 0
  report = json.loads(out.read_text())
  assert report["num_questions"] == 12 * 5  # 20% of 60 people, 5 attributes each
  for measure in ("gold", "answer"):
    r = report["recall"][measure]
    assert set(r) == {"1", "5", "20"}
    assert all(0 <= v <= 1 for v in r.values())
    assert r["1"] <= r["5"] <= r["20"]
  # Each biography names its person: both retrievers find the gold passage in the top 5.
  assert report["recall"]["gold"]["5"] >= 0.9
  # The gold passage contains the answer, so answer recall can only be higher.
  assert report["recall"]["answer"]["20"] >= report["recall"]["gold"]["20"]


def test_embed_index_retrieve(bios, tmp_path, capsys):
  assert run("embed", "--corpus", bios / "corpus.jsonl", "--out", tmp_path / "emb",
             "--shard-size", 25) == 0
  assert run("index", "--kind", "scann", "--embeddings", tmp_path / "emb", "--corpus",
             bios / "corpus.jsonl", "--out", tmp_path / "idx") == 0
  first = json.loads((bios / "corpus.jsonl").read_text().splitlines()[7])
  capsys.readouterr()
  assert run("retrieve", f"Where was {first['title']} born?", "--index", tmp_path / "idx",
             "--k", 3, "--json") == 0
  results = json.loads(capsys.readouterr().out)
  assert [r["rank"] for r in results] == [1, 2, 3]
  assert results[0]["id"] == first["id"] and results[0]["title"] == first["title"]
  assert results[0]["score"] >= results[1]["score"]


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
  bad = tmp_path / "c.jsonl"
  bad.write_text('{"id": "a", "title": "t", "text": "x"}\n{"id": "b", "title": "t"}\n')
  assert run("eval-retrieval", "--corpus", bad, "--questions", bad, "--retriever", "bm25") == 2
  err = capsys.readouterr().err
  assert f"{bad}:2" in err and "text" in err
  with pytest.raises(SystemExit):
    run("eval-retrieval", "--corpus", bad, "--questions", bad, "--k", "1,x")


def test_store_then_embed_from_array_record(bios, tmp_path, capsys):
  assert run("store", "--corpus", bios / "corpus.jsonl", "--out", tmp_path / "tfds",
             "--name", "bios") == 0
  path = capsys.readouterr().out.split(" at ")[-1].strip()
  assert run("embed", "--corpus", path, "--out", tmp_path / "a") == 0
  assert run("embed", "--corpus", bios / "corpus.jsonl", "--out", tmp_path / "b") == 0
  a = json.loads((tmp_path / "a" / "manifest.json").read_text())
  b = json.loads((tmp_path / "b" / "manifest.json").read_text())
  assert a["corpus_sha256"] == b["corpus_sha256"] and a["passage_ids"] == b["passage_ids"]
  assert (tmp_path / "a" / "shard-00000.npy").read_bytes() == \
      (tmp_path / "b" / "shard-00000.npy").read_bytes()


def test_split_words_splits_long_documents(tmp_path):
  doc = {"id": "d", "title": "Long", "text": " ".join(f"w{i}" for i in range(250))}
  (tmp_path / "c.jsonl").write_text(json.dumps(doc) + "\n")
  (tmp_path / "q.jsonl").write_text(json.dumps(
      {"id": "q", "question": "w210?", "answers": ["w210"], "gold_passage_ids": ["d-2"]}) + "\n")
  out = tmp_path / "r.json"
  assert run("eval-retrieval", "--corpus", tmp_path / "c.jsonl", "--questions",
             tmp_path / "q.jsonl", "--retriever", "bm25", "--split-words", 100, "--k", "1,3",
             "--out", out) == 0
  report = json.loads(out.read_text())
  assert report["num_passages"] == 3
  assert report["recall"]["gold"]["1"] == 1.0 and report["recall"]["answer"]["1"] == 1.0


def test_help_imports_no_jax():
  """`ragjax --help` (and argument parsing) loads neither jax nor the models: it stays fast."""
  code = ("import sys, ragjax.cli as c; c.build_parser().format_help(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'flax', 'numpy', 'orbax', 'tokenizers', 'scann')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_every_error_is_one_line_with_status_2_and_debug_shows_the_traceback(tmp_path, capsys,
                                                                              monkeypatch):
  """Each user-facing error type derives from RagjaxError; the CLI prints `error: ...` alone
  unless --debug (or RAGJAX_DEBUG=1) asks for the traceback."""
  from ragjax import errors
  for name in ("ConfigError", "DataError", "IndexFormatError", "WeightImportError",
               "CheckpointError", "NotFoundError", "UsageError", "NonFiniteLossError"):
    assert issubclass(getattr(errors, name), errors.RagjaxError), name
  missing = tmp_path / "no_such_index"
  monkeypatch.delenv("RAGJAX_DEBUG", raising=False)
  assert run("retrieve", "q", "--index", missing) == 2
  err = capsys.readouterr().err
  assert err.startswith("ragjax retrieve: error: ") and str(missing) in err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert run("--debug", "retrieve", "q", "--index", missing) == 2
  assert "Traceback" in capsys.readouterr().err
  assert run("retrieve", "q", "--index", missing, "--debug") == 2  # after the command too
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.setenv("RAGJAX_DEBUG", "1")
  assert run("retrieve", "q", "--index", missing) == 2
  assert "Traceback" in capsys.readouterr().err
