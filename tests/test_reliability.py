"""Every failure a one-line error, no stale or corrupt state used silently, and a corrupt newest
checkpoint set aside for the last intact one.

The CLI cases run `ragjax` as a real subprocess and assert exit status 2 with a single
`ragjax <command>: error: ...` line naming the file, line or key (no traceback). Training runs
are `experiments/bios.py:smoke` on one CPU device with a persistent compilation cache shared by
the module, as in test_train_resume.py.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_tiny_bert

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE = ["--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
       "--config.optim.schedule=constant"]


@pytest.fixture(scope="module")
def env():
  out = dict(os.environ)
  out.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                       "--xla_backend_optimization_level=0",
             # the session's compilation cache (conftest: its directory and size limit)
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  out.pop("RAGJAX_DEBUG", None)
  return out


def ragjax(env, *args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "ragjax.cli", *map(str, args)], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def one_line_error(proc, command, *words):
  """Exit status 2, no traceback, and a last stderr line `ragjax <command>: error: ...` holding
  every one of `words`. Returns that line."""
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith(f"ragjax {command}: error: "), line
  for w in words:
    assert w in line, (w, line)
  return line


# ---------------------------------------------------------------------------------------------
# Config errors, before any data is read.

def test_config_file_errors_name_the_file_and_line(env, tmp_path):
  bad = tmp_path / "bad_cfg.py"
  bad.write_text("from ragjax import config as config_lib\ndef get_config(arg=None)\n"
                 "  return config_lib.base_config()\n")
  one_line_error(ragjax(env, "train", "--config", bad, "--workdir", tmp_path / "w"), "train",
                 f"{bad}:2", "syntax error")
  raising = tmp_path / "raising_cfg.py"
  raising.write_text("def get_config(arg=None):\n  x = {}\n  return x['model']\n")
  one_line_error(ragjax(env, "train", "--config", raising, "--workdir", tmp_path / "w"),
                 "train", f"{raising}:3", "KeyError", "get_config(None)")


@pytest.mark.parametrize("override,words", [
    ("--config.mesh.axes=data", ("--config.mesh.axes=data", "expected a tuple", "('data',)")),
    ("--config.model.loss=rag_tokn", ("model.loss 'rag_tokn'", "rag_token")),
    ("--config.train.total_steps=-3", ("train.total_steps=-3", "expected a number of steps >= 1")),
])
def test_bad_config_values_are_one_line_errors(env, tmp_path, override, words):
  proc = ragjax(env, "train", "--config", "experiments/bios.py:smoke", "--workdir",
                tmp_path / "w", override)
  one_line_error(proc, "train", *words)
  assert not (tmp_path / "w" / "checkpoints").exists()  # refused before anything was built


def test_unwritable_outputs_are_refused_before_any_work(env, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  one_line_error(ragjax(env, "train", "--config", "experiments/bios.py:smoke", "--workdir",
                        blocker / "w"), "train", "--workdir", str(blocker), "is a file")
  one_line_error(ragjax(env, "embed", "--corpus", "nonexistent.jsonl", "--out", blocker / "e"),
                 "embed", "--out", "is a file")
  if os.geteuid() == 0:
    pytest.skip("root writes into a 0555 directory; the read-only case needs another user")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    one_line_error(ragjax(env, "train", "--config", "experiments/bios.py:smoke", "--workdir",
                          ro / "w"), "train", "--workdir", "cannot write in")
  finally:
    ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Stale embeddings, the encoder an index was built with, input statistics.

@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  from ragjax.data.synthetic import write_bios
  d = tmp_path_factory.mktemp("bios")
  write_bios(d, 12, seed=0, eval_fraction=0.5)
  write_tiny_bert(d / "enc32", hidden=32)
  write_tiny_bert(d / "enc48", seed=1, hidden=48)
  return d


def test_stale_embeddings_and_another_encoder_are_refused(env, corpus_dir, tmp_path):
  corpus, enc32, enc48 = corpus_dir / "corpus.jsonl", corpus_dir / "enc32", corpus_dir / "enc48"
  emb = tmp_path / "emb"
  proc = ragjax(env, "embed", "--corpus", corpus, "--retriever", enc32, "--out", emb,
                "--batch-size", 4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  idx = tmp_path / "idx"
  proc = ragjax(env, "index", "--kind", "exact", "--embeddings", emb, "--corpus", corpus,
                "--out", idx)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # the index names the encoder it was built with, before a query is encoded
  one_line_error(ragjax(env, "retrieve", "who was born", "--index", idx, "--retriever", enc48),
                 "retrieve", str(idx), "dim 32", "dim 48", str(enc48.resolve()))
  # one passage edited (same id): every reader of those vectors refuses, naming it
  rows = [json.loads(l) for l in corpus.read_text().splitlines()]
  rows[5]["text"] += " Edited."
  edited = tmp_path / "edited.jsonl"
  edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
  questions = corpus_dir / "eval_questions.jsonl"
  one_line_error(ragjax(env, "eval-retrieval", "--corpus", edited, "--questions", questions,
                        "--retriever", enc32, "--embeddings", emb, "--k", "1"),
                 "eval-retrieval", "stale", f"id {rows[5]['id']!r}", "1 passage(s)")
  one_line_error(ragjax(env, "index", "--kind", "exact", "--embeddings", emb, "--corpus", edited,
                        "--out", tmp_path / "idx2"), "index", "stale", f"id {rows[5]['id']!r}")
  one_line_error(ragjax(env, "retrieve", "who", "--index", idx, "--corpus", edited), "retrieve",
                 "stale", str(edited))
  # the unedited corpus still works with the same vectors
  proc = ragjax(env, "retrieve", "who", "--index", idx, "--k", "1")
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_embed_reports_skipped_records_and_truncated_passages(env, corpus_dir, tmp_path):
  rows = corpus_dir.joinpath("corpus.jsonl").read_text().splitlines()[:6]
  long_text = " ".join(["paris"] * 300)  # 300 tokens > the tiny encoder's 64
  rows.insert(2, '{"id": "bad", "title": 3, "text": "x"}')
  rows.append(json.dumps({"id": "long", "title": "t", "text": long_text}))
  src = tmp_path / "c.jsonl"
  src.write_text("\n".join(rows) + "\n")
  emb = tmp_path / "emb"
  proc = ragjax(env, "embed", "--corpus", src, "--retriever", corpus_dir / "enc32", "--out", emb,
                "--skip-invalid", "--batch-size", 4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "1 truncated to 64 tokens" in proc.stdout
  assert "1 invalid records skipped" in proc.stdout
  assert f"{src}:3: field 'title'" in proc.stdout  # the reason, with file and line
  manifest = json.loads((emb / "manifest.json").read_text())
  assert manifest["count"] == 7 and manifest["truncated"] == 1
  assert manifest["input"]["skipped"] == 1
  assert manifest["input"]["errors"][0].startswith(f"{src}:3:")
  assert "truncated" in proc.stderr  # and a warning in the log


def test_one_huge_record_takes_bounded_memory(corpus_dir):
  """A 10 MiB passage is cut before tokenizing: peak RSS (a fresh process) stays far below the
  ~2.5 GB that tokenizing it whole took, and it counts as truncated."""
  code = f"""
import resource
from ragjax.data.tokenize import WordPieceTokenizer
tok = WordPieceTokenizer.from_dir({str(corpus_dir / 'enc32')!r}, max_length=64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stats = {{}}
ids = tok.tokenize(["paris london " * (10 * 2**20 // 13)], stats=stats)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(ids[0]), stats["truncated"], (after - before) // 1024)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  n, truncated, grown_mib = map(int, out.stdout.split())
  assert n == 64 and truncated == 1
  assert grown_mib < 200, grown_mib


# ---------------------------------------------------------------------------------------------
# Resuming with another config; corrupt checkpoints.

@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
  """A finished 4-step smoke run, a checkpoint every step (3 kept: steps 2, 3, 4)."""
  w = tmp_path_factory.mktemp("trained") / "w"
  proc = ragjax(env, "train", "--config", "experiments/bios.py:smoke", "--workdir", w,
                "--config.train.total_steps=4", "--config.train.checkpoint_every=1", *ONE)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return w


def test_resume_with_a_changed_config_is_refused_or_recorded(env, trained, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(trained, w)
  resume = ["train", "--config", "experiments/bios.py:smoke", "--workdir", w,
            "--config.train.total_steps=5", "--config.train.checkpoint_every=1", *ONE]
  one_line_error(ragjax(env, *resume, "--config.model.k=3"), "train", "model.k: 2 -> 3",
                 "allow_config_change", "step 4")
  assert json.loads((w / "config.json").read_text())["config"]["model"]["k"] == 2
  proc = ragjax(env, *resume, "--config.model.k=3", "--config.train.allow_config_change=true")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "config changes: " in proc.stderr and "model.k: 2 -> 3" in proc.stderr
  assert json.loads((w / "config.4.json").read_text())["config"]["model"]["k"] == 2
  assert json.loads((w / "config.json").read_text())["config"]["model"]["k"] == 3


def _largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((f for f in step_dir.rglob("*") if f.is_file() and f.name != "ragjax.sha256.json"),
             key=lambda f: f.stat().st_size)


# truncation: ~42 s more in the slow tier; the same-size flipped byte (only the checksums can
# catch it) stays in CI
@pytest.mark.parametrize("damage", [pytest.param("truncate", marks=pytest.mark.slow), "flip_byte"])
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes(env, trained, tmp_path,
                                                                       damage):
  w = tmp_path / "w"
  shutil.copytree(trained, w)
  ckpts = w / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 3, 4]
  assert (ckpts / "4" / "ragjax.sha256.json").is_file()
  victim = _largest_file(ckpts / "4")
  data = bytearray(victim.read_bytes())
  if damage == "truncate":
    victim.write_bytes(data[:len(data) // 2])
  else:  # same size: only the checksum can tell
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
  rel = str(victim.relative_to(ckpts / "4"))
  # eval refuses it in one line naming the file
  one_line_error(ragjax(env, "eval", "--workdir", w, "--max-questions", 8), "eval", rel,
                 "truncated" if damage == "truncate" else "sha256 differs")
  # train moves it aside, says so, and resumes from step 3
  proc = ragjax(env, "train", "--config", "experiments/bios.py:smoke", "--workdir", w,
                "--config.train.total_steps=5", "--config.train.checkpoint_every=1", *ONE)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert (ckpts / "4.corrupt" / rel).is_file()
  assert "checkpoint step 4 is corrupt" in proc.stderr and rel in proc.stderr
  assert "resumed at step 3" in proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1])["final_step"] == 5
  steps = [json.loads(l)["step"] for l in (w / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(steps) and steps[-1] == 5 and steps.count(4) == 1


# ---------------------------------------------------------------------------------------------
# Smaller points.

def test_make_bios_files_have_the_umask_mode(tmp_path):
  from ragjax.cli import main
  old = os.umask(0o022)
  try:
    for layout in ("single", "documents"):
      assert main(["make-bios", "--num-people", "6", "--layout", layout, "--out",
                   str(tmp_path / layout)]) == 0
      modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / layout).iterdir()}
      assert set(modes.values()) == {0o644}, modes
  finally:
    os.umask(old)


def test_question_errors_say_missing_and_suggest_no_api_flag(tmp_path):
  from ragjax.data.qa import read_questions
  from ragjax.errors import DataError
  f = tmp_path / "q.jsonl"
  f.write_text('{"id": "q1", "answers": ["x"]}\n')
  with pytest.raises(DataError, match=r"q.jsonl:1: field 'question': missing; expected a "
                                      r"non-empty string"):
    read_questions(f)
  f.write_text('{"id": "q1", "question": "who?", "answers": []}\n')
  with pytest.raises(DataError) as e:
    read_questions(f)
  assert "require_answers" not in str(e.value) and "expected at least one answer" in str(e.value)


def test_bm25s_debug_logging_is_off_unless_verbose(monkeypatch):
  import logging
  from ragjax.retrieval import bm25_index
  monkeypatch.delenv("RAGJAX_VERBOSE", raising=False)
  bm25_index._bm25s()
  assert logging.getLogger("bm25s").getEffectiveLevel() == logging.WARNING
  monkeypatch.setenv("RAGJAX_VERBOSE", "1")
  logging.getLogger("bm25s").setLevel(logging.DEBUG)
  bm25_index._bm25s()
  assert logging.getLogger("bm25s").level == logging.DEBUG
