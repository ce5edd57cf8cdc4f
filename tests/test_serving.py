"""Serving: the bundle (hashes, atomic publish), the engine against the training code's own
decoding, the RAG marginal score against numpy, and a real `ragjax serve` subprocess on
127.0.0.1 (routes, errors, 429, metrics, live index reload, SIGTERM drain)."""
import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import httpx
import jax
import numpy as np
import pytest

from ragjax import config as config_lib
from ragjax.cli import main
from ragjax.errors import BundleError, UsageError
from ragjax.evaluation.evaluate import decode_batch, gather
from ragjax.joint import versions
from ragjax.models.rag import RagModel
from ragjax.retrieval.embed import corpus_fingerprint
from ragjax.serving import bundle as bundle_lib
from ragjax.serving.engine import Engine

ONE_DEVICE = ["--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
              "--config.mesh.num_devices=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  w = tmp_path_factory.mktemp("served")
  assert main(["train", "--config", "experiments/bios.py:smoke", "--workdir", str(w),
               "--config.train.total_steps=2", "--config.train.tensorboard=false",
               *ONE_DEVICE]) == 0
  return w


@pytest.fixture(scope="module")
def bundle_dir(trained, tmp_path_factory):
  out = tmp_path_factory.mktemp("bundles") / "bios"
  bundle_lib.export_bundle(trained, out)
  return out


@pytest.fixture(scope="module")
def engine(bundle_dir):
  return Engine(bundle_lib.load_bundle(bundle_dir), buckets=(1, 4),
                decodings=("rag_token", "rag_sequence_fast"))


def test_bundle_manifest_hashes_and_atomic_publish(bundle_dir, trained, tmp_path, monkeypatch):
  m = json.loads((bundle_dir / "manifest.json").read_text())
  assert m["format_version"] == 1 and m["checkpoint_step"] == 2
  assert m["index_version"] is None and m["index_embedded_step"] == 2  # frozen passage encoder
  assert m["eval"]["step"] == 2 and "exact_match" in m["eval"]
  assert m["versions"]["jax"] == jax.__version__
  for rel, digest in m["files"].items():  # relative paths, every one hashed
    assert not pathlib.Path(rel).is_absolute()
    assert bundle_lib.sha256_file(bundle_dir / rel) == digest
  assert {"weights/generator.safetensors", "tokenizers/retriever.json", "config.json",
          "index/embeddings.npy"} <= set(m["files"])
  # One flipped byte is named.
  bad = tmp_path / "bad"
  shutil.copytree(bundle_dir, bad)
  f = bad / "weights" / "generator.safetensors"
  data = bytearray(f.read_bytes())
  data[-1] ^= 1
  f.write_bytes(bytes(data))
  with pytest.raises(BundleError, match="weights/generator.safetensors: sha256 differs"):
    bundle_lib.load_bundle(bad)
  # A killed export leaves no loadable bundle, and an existing one stays as it was.
  good = tmp_path / "good"
  shutil.copytree(bundle_dir, good)

  def die(*a, **k):
    raise KeyboardInterrupt("killed")
  monkeypatch.setattr(bundle_lib, "build_corpus_dataset", die)
  with pytest.raises(KeyboardInterrupt):
    bundle_lib.export_bundle(trained, good)
  with pytest.raises(KeyboardInterrupt):
    bundle_lib.export_bundle(trained, tmp_path / "new")
  assert bundle_lib.read_manifest(good)["files"] == m["files"]
  assert not (tmp_path / "new").exists()
  leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".new.tmp-")]
  assert leftovers == []  # cleaned up on the exception; a SIGKILL would leave one
  with pytest.raises(BundleError, match="manifest.json: missing"):
    bundle_lib.load_bundle(tmp_path / "bad" / "weights")


def test_engine_decodes_as_the_training_code(trained, engine, capsys):
  """The bundle (safetensors weights, tfds passage store, saved index) decodes exactly what the
  workdir's checkpoint decodes through the Run that `ragjax eval` / `generate` use."""
  from ragjax.training.loop import Run
  cfg = config_lib.load_workdir_config(trained)
  run = Run(cfg, trained)
  state, _ = run.restore_latest()
  run.feeder.set_corpus(run.corpus_embeddings(state.params))
  qs = run.system.eval_questions[:4]
  batch = run.feeder.batch(state.params, qs)
  seqs, scores = decode_batch(run.feeder, state.params, batch, cfg.eval)
  rows = gather(batch["doc_ids"])
  e_seqs, e_rows, _, e_prior = engine.decode([q.question for q in qs])
  np.testing.assert_array_equal(e_rows, rows)
  np.testing.assert_array_equal(e_seqs, seqs)
  prior = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
  np.testing.assert_allclose(e_prior, prior, atol=1e-5)
  # A question's answer does not depend on its batch companions (bucket 1 vs bucket 4).
  alone = engine.decode([qs[2].question])
  np.testing.assert_array_equal(alone[0][0], e_seqs[2])
  np.testing.assert_array_equal(alone[1][0], e_rows[2])
  np.testing.assert_allclose(alone[3][0], e_prior[2], atol=1e-5)
  # Another compiled decoding, chosen per call, decodes as evaluation does with that decoding.
  fast = types.SimpleNamespace(decoding="rag_sequence_fast", num_beams=cfg.eval.num_beams,
                               max_new_tokens=cfg.eval.max_new_tokens)
  f_seqs, _ = decode_batch(run.feeder, state.params, batch, fast)
  np.testing.assert_array_equal(engine.decode([q.question for q in qs], "rag_sequence_fast")[0],
                                f_seqs)
  with pytest.raises(UsageError, match="--decodings 'sampling'"):
    Engine(engine.bundle, buckets=(1,), decodings=("sampling",))
  # `ragjax generate --bundle` prints the engine's answer and passages.
  capsys.readouterr()
  assert main(["generate", "--bundle", str(engine.bundle.path), "--json", qs[0].question]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert [p["id"] for p in printed["passages"]] == [run.system.passages[r].id for r in rows[0]]
  assert printed["answer"] == run.system.gen_tok.decode(seqs[0])


def test_generate_needs_one_of_workdir_or_bundle(bundle_dir, trained, capsys):
  assert main(["generate", "Where?"]) == 2
  assert main(["generate", "Where?", "--workdir", str(trained), "--bundle", str(bundle_dir)]) == 2
  assert "one of --workdir W or --bundle B" in capsys.readouterr().err


def test_score_is_the_rag_token_marginal(engine):
  """log p(y|x) = sum_t log sum_k p(z_k|x) p(y_t|x,z_k,y<t) (Lewis et al. 2020 eq. 2), here
  from each passage's logits in numpy."""
  q, answers = engine.system.passages[3].title, ["paris", "a much longer answer than that"]
  got = engine.score(f"Where was {q} born?", answers)
  model = engine.system.model
  for a, lp in zip(answers, got):
    from ragjax.data.qa import Question
    batch, _ = engine._batch([Question("x", f"Where was {q} born?", (a,))])
    k = engine.system.reader_k
    labels = np.asarray(batch["labels"])[:1]
    logits = np.asarray(model.apply({"params": engine.params}, batch["context_input_ids"][:1, :k],
                                    batch["context_attention_mask"][:1, :k], labels,
                                    method=RagModel.generator_logits), np.float64)[0]
    s = np.asarray(engine.feeder.doc_scores(engine.params, batch))[0, :k].astype(np.float64)
    prior = np.exp(s - np.logaddexp.reduce(s))
    pad = model.generator_cfg.pad_token_id
    targets = np.append(labels[0, 1:], pad)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # [K, T, V]
    total = 0.0
    for t, y in enumerate(targets):
      if y == pad:
        break
      total += np.log(np.sum(prior * np.exp(logp[:, t, y])))
    assert abs(total - lp) < 1e-4, (a, total, lp)
  assert got[0] != got[1]


# ------------------------------------------------------------------------------ the server

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
  follow = tmp_path_factory.mktemp("follow")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  log = open(follow / "server.log", "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "ragjax.cli", "serve", str(bundle_dir), "--host", "127.0.0.1",
       "--port", str(port), "--buckets", "1,4", "--max-queue", "4", "--max-wait-ms", "20",
       "--follow", str(follow), "--follow-seconds", "0.3",
       "--decodings", "rag_token,rag_sequence_fast"],
      stdout=log, stderr=subprocess.STDOUT, env=env)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:
    assert proc.poll() is None, (follow / "server.log").read_text()
    try:
      if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
        break
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  else:
    proc.kill()
    pytest.fail("server not healthy in 240 s:\n" + (follow / "server.log").read_text())
  yield url, proc, follow
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def test_server_routes_match_the_engine(server, engine):
  url, _, _ = server
  qs = [p.title for p in engine.system.passages[:3]]
  qs = [f"Where was {t} born?" for t in qs]
  one = httpx.post(f"{url}/v1/answer", json={"question": qs[0]}, timeout=30).json()
  assert set(one) == {"answer", "passages", "index_version", "checkpoint_step"}
  assert one["checkpoint_step"] == 2 and one["index_version"] is None
  ref = engine.answer(qs)
  assert one["answer"] == ref[0]["answer"]
  assert [p["id"] for p in one["passages"]] == [p["id"] for p in ref[0]["passages"]]
  assert set(one["passages"][0]) == {"id", "title", "text", "score", "prior"}
  many = httpx.post(f"{url}/v1/answer", json={"question": qs, "k": 1}, timeout=30).json()
  assert [len(m["passages"]) for m in many] == [1, 1, 1]
  assert [m["passages"][0]["id"] for m in many] == [r["passages"][0]["id"] for r in ref]
  got = httpx.post(f"{url}/v1/retrieve", json={"question": qs[1], "k": 5}, timeout=30).json()
  want = engine.retrieve([qs[1]], 5)[0]
  assert [p["id"] for p in got["passages"]] == [p["id"] for p in want]
  np.testing.assert_allclose([p["score"] for p in got["passages"]],
                             [p["score"] for p in want], atol=1e-4)
  scored = httpx.post(f"{url}/v1/score", json={"question": qs[0], "answers": ["tbilisi", "x"]},
                      timeout=30).json()
  np.testing.assert_allclose(scored["logprobs"], engine.score(qs[0], ["tbilisi", "x"]),
                             atol=1e-4)
  fast = httpx.post(f"{url}/v1/answer", json={"question": qs, "decoding": "rag_sequence_fast"},
                    timeout=30).json()
  assert [f["answer"] for f in fast] == [
      r["answer"] for r in engine.answer(qs, decoding="rag_sequence_fast")]
  info = httpx.get(f"{url}/v1/info", timeout=10).json()
  assert info["manifest"]["checkpoint_step"] == 2 and info["buckets"] == [1, 4]
  # A reload re-reads and re-warms the bundle while requests go on.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    reloading = pool.submit(httpx.post, f"{url}/v1/reload", timeout=120)
    while not reloading.done():
      r = httpx.post(f"{url}/v1/answer", json={"question": qs[0]}, timeout=30)
      assert r.status_code == 200 and r.json()["answer"] == ref[0]["answer"]
    assert reloading.result().json()["checkpoint_step"] == 2


def test_evaluate_scores_alike_from_workdir_bundle_and_server(trained, bundle_dir, server,
                                                              engine, tmp_path):
  """`ragjax evaluate` (TruthfulQA MC by log-likelihood) gives the same per-choice scores from
  the workdir, its bundle and the server serving it, equal to the engine's RAG marginal (checked
  against numpy above), and MC1 / MC2 recomputed by hand from them."""
  url, _, _ = server
  titles = [p.title for p in engine.system.passages[:3]]
  rows = [{"question": f"Where was {t} born?",
           "mc1_targets": {"tbilisi": 1, "paris": 0, "a city by the sea": 0},
           "mc2_targets": {"tbilisi": 1, "oslo": 1, "paris": 0}} for t in titles]
  data = tmp_path / "tqa.json"
  data.write_text(json.dumps(rows))
  got = {}
  for name, src in (("workdir", ["--workdir", str(trained)]), ("bundle", ["--bundle",
                                                                       str(bundle_dir)]),
                    ("server", ["--server", url])):
    out = tmp_path / f"{name}.json"
    assert main(["evaluate", *src, "--task", "truthfulqa_mc", "--data", str(data), "--out",
                 str(out), "--batch-size", "4"]) == 0
    result = json.loads(out.read_text())
    recs = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert result["task"] == "truthfulqa_mc" and result["num_examples"] == 3 and len(recs) == 3
    assert result["source"]["checkpoint_step"] == 2
    got[name] = (result, recs)
  for i, row in enumerate(rows):
    want = dict(zip(["tbilisi", "paris", "a city by the sea", "oslo"],
                    engine.score(row["question"], ["tbilisi", "paris", "a city by the sea",
                                                   "oslo"])))
    for name, (_, recs) in got.items():
      lp = recs[i]["score"]["logprobs"]
      np.testing.assert_allclose([lp[c] for c in want], list(want.values()), atol=1e-4,
                                 err_msg=name)
      assert recs[i]["passages"] == [p["id"] for p in engine.retrieve([row["question"]],
                                                                      engine.system.reader_k)[0]]
  mc1 = np.mean([float(max(["tbilisi", "paris", "a city by the sea"],
                           key=lambda c, r=r: r["score"]["logprobs"][c]) == "tbilisi")
                 for r in got["bundle"][1]])
  mc2 = np.mean([np.exp(r["score"]["logprobs"]["tbilisi"]) / sum(
      np.exp(r["score"]["logprobs"][c]) for c in ("tbilisi", "oslo", "paris")) +
      np.exp(r["score"]["logprobs"]["oslo"]) / sum(
      np.exp(r["score"]["logprobs"][c]) for c in ("tbilisi", "oslo", "paris"))
      for r in got["bundle"][1]])
  for name, (result, _) in got.items():
    assert result["metrics"]["mc1"] == pytest.approx(mc1), name
    assert result["metrics"]["mc2"] == pytest.approx(mc2, abs=1e-5), name


def test_evaluate_open_qa_and_a_replaced_corpus(bundle_dir, engine, tmp_path, capsys):
  """A QA task's predictions are the engine's answers and its EM the SQuAD EM of them; with
  --corpus the system retrieves from the given passages, embedded by the bundle's encoder."""
  ps = engine.system.passages[:4]
  qs = [{"id": f"q{i}", "question": f"Where was {p.title} born?", "answers": [p.title]}
        for i, p in enumerate(ps)]
  data = tmp_path / "q.jsonl"
  data.write_text("\n".join(json.dumps(q) for q in qs) + "\n")
  out = tmp_path / "qa.json"
  assert main(["evaluate", "--bundle", str(bundle_dir), "--task", "squad_open", "--data",
               str(data), "--out", str(out), "--batch-size", "4", "--recall-ks", "1,2"]) == 0
  result = json.loads(out.read_text())
  recs = [json.loads(x) for x in (tmp_path / "qa.jsonl").read_text().splitlines()]
  ref = engine.answer([q["question"] for q in qs])
  assert [r["prediction"] for r in recs] == [a["answer"] for a in ref]
  from ragjax.evaluation.metrics import exact_match
  assert result["metrics"]["exact_match"] == pytest.approx(
      np.mean([exact_match(a["answer"], [q["answers"][0]]) for a, q in zip(ref, qs)]))
  assert set(result["metrics"]["answer_recall"]) == {"1", "2"}
  other = tmp_path / "other.jsonl"
  other.write_text("\n".join(json.dumps({"id": f"x{i}", "title": p.title, "text": p.text})
                              for i, p in enumerate(ps)) + "\n")
  out2 = tmp_path / "qa2.json"
  assert main(["evaluate", "--bundle", str(bundle_dir), "--task", "squad_open", "--data",
               str(data), "--corpus", str(other), "--out", str(out2), "--batch-size", "4",
               "--recall-ks", "1,2"]) == 0
  recs2 = [json.loads(x) for x in (tmp_path / "qa2.jsonl").read_text().splitlines()]
  assert all(pid.startswith("x") for r in recs2 for pid in r["passages"])
  # The same 4 passages under other ids: each question's top-1 among them is the first of them
  # in its full-corpus ranking (the bundle's own index, searched all the way down).
  rename = {p.id: f"x{i}" for i, p in enumerate(ps)}
  for q, r2 in zip(qs, recs2):
    full = engine.retrieve([q["question"]], engine.limits.max_retrieve_k)[0]
    assert len(full) == len(engine.system.passages)
    assert r2["passages"][0] == next(rename[p["id"]] for p in full if p["id"] in rename)
  capsys.readouterr()
  assert main(["evaluate", "--report", str(out), str(out2)]) == 0
  assert capsys.readouterr().out.count("| squad_open |") == 2


def test_export_with_a_replaced_corpus(trained, engine, tmp_path):
  """`ragjax export --corpus`: the bundle serves the given passages (index hot-swap), embedded
  by the checkpoint's passage encoder: the same vectors as the original bundle's for the passages
  it shares, a new vector for the edited one."""
  ps = engine.system.passages
  edited = [{"id": p.id, "title": p.title, "text": p.text if i else p.text + " She moved to Oslo."}
            for i, p in enumerate(ps[:10])]
  corpus = tmp_path / "updated.jsonl"
  corpus.write_text("\n".join(json.dumps(r) for r in edited) + "\n")
  out = tmp_path / "swapped"
  assert main(["export", "--workdir", str(trained), "--out", str(out), "--corpus",
               str(corpus)]) == 0
  b = bundle_lib.load_bundle(out)
  assert b.manifest["corpus_replaced"] and b.manifest["index_version"] is None
  assert [p.id for p in b.system.passages] == [r["id"] for r in edited]
  assert b.system.passages[0].text.endswith("She moved to Oslo.")
  np.testing.assert_allclose(b.embeddings[1:], engine.bundle.embeddings[1:10], atol=1e-5)
  assert np.abs(b.embeddings[0] - engine.bundle.embeddings[0]).max() > 1e-3
  hits = Engine(b, buckets=(1,)).retrieve([f"Where was {ps[3].title} born?"], 3)[0]
  assert {h["id"] for h in hits} <= {r["id"] for r in edited}


def test_sighup_reloads_and_a_bundle_that_does_not_load_is_409(server, bundle_dir):
  url, proc, _ = server
  q = {"question": "Where was anyone born?"}
  n = httpx.get(f"{url}/v1/health", timeout=10).json()["reloads"]
  proc.send_signal(signal.SIGHUP)
  deadline = time.monotonic() + 120
  while httpx.get(f"{url}/v1/health", timeout=10).json()["reloads"] == n:
    assert time.monotonic() < deadline, "SIGHUP did not reload in 120 s"
    assert httpx.post(f"{url}/v1/answer", json=q, timeout=30).status_code == 200
  f = bundle_dir / "weights" / "generator.safetensors"
  good = f.read_bytes()
  try:
    f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    r = httpx.post(f"{url}/v1/reload", timeout=120)
    assert r.status_code == 409 and "weights/generator.safetensors" in r.text, r.text
  finally:
    f.write_bytes(good)
  assert httpx.post(f"{url}/v1/answer", json=q, timeout=30).status_code == 200
  assert httpx.get(f"{url}/v1/health", timeout=10).json()["reloads"] == n + 1


@pytest.mark.parametrize("body,code,field", [
    ('{"question": "x"', 422, "json"),                        # malformed JSON
    ('{"question": "x", "top_k": 3}', 422, "top_k"),          # unknown field
    ('{"question": ""}', 422, "question"),
    ('{"question": "' + "a" * 1001 + '"}', 413, "question"),
    ('{"question": "x", "k": 0}', 422, "k"),
    ('{"question": "x", "k": 99}', 422, "k"),
    ('{"question": ["a", "b", "c", "d", "e"]}', 422, "question"),
    ('{"question": "x", "decoding": "sampling"}', 422, "decoding"),
    ('{"question": "x", "max_new_tokens": 10000}', 422, "max_new_tokens"),
])
def test_bad_answer_requests_are_4xx_naming_the_field(server, body, code, field):
  url, proc, _ = server
  r = httpx.post(f"{url}/v1/answer", content=body, headers={"content-type": "application/json"},
                 timeout=30)
  assert r.status_code == code, r.text
  assert field in r.text, r.text
  assert proc.poll() is None


def test_bad_retrieve_and_score_requests(server):
  url, _, _ = server
  r = httpx.post(f"{url}/v1/retrieve", json={"question": "x", "k": 100000}, timeout=30)
  assert r.status_code == 422 and "k" in r.text
  r = httpx.post(f"{url}/v1/score", json={"question": "x", "answers": ["a"] * 17}, timeout=30)
  assert r.status_code == 422 and "answers" in r.text
  r = httpx.post(f"{url}/v1/score", json={"question": "x", "answers": []}, timeout=30)
  assert r.status_code == 422 and "answers" in r.text


def _answer_batches(url: str) -> float:
  text = httpx.get(f"{url}/metrics", timeout=10).text
  (line,) = [x for x in text.splitlines()
             if x.startswith('ragjax_batch_questions_count{op="answer"}')]
  return float(line.split()[-1])


def test_queue_full_is_429_never_5xx_and_metrics(server):
  url, _, _ = server
  batches_before = _answer_batches(url)
  with concurrent.futures.ThreadPoolExecutor(24) as pool:
    codes = list(pool.map(lambda i: httpx.post(f"{url}/v1/answer", json={"question": f"q {i}"},
                                               timeout=60).status_code, range(48)))
  assert set(codes) <= {200, 429} and 200 in codes, codes
  assert 429 in codes, codes  # 24 at once against a queue of 4
  text = httpx.get(f"{url}/metrics", timeout=10).text
  assert 'ragjax_requests_total{code="429",route="/v1/answer"}' in text
  assert "ragjax_batch_questions_bucket" in text and "ragjax_queue_depth" in text
  served = sum(c == 200 for c in codes)
  assert _answer_batches(url) - batches_before < served  # requests were batched together


def test_live_index_reload_and_sigterm_drain(server, engine):
  url, proc, follow = server
  emb = engine.bundle.embeddings[::-1].copy()  # a new version that ranks differently
  passages = engine.system.passages
  q = f"Where was {passages[0].title} born?"
  before = httpx.post(f"{url}/v1/retrieve", json={"question": q, "k": 3}, timeout=30).json()
  versions.publish_version(follow, 7, emb, passage_ids=[p.id for p in passages],
                           corpus_sha256=corpus_fingerprint(passages), encoder={})
  seen, deadline = [], time.monotonic() + 60
  while time.monotonic() < deadline:  # every request answers while the version changes
    r = httpx.post(f"{url}/v1/retrieve", json={"question": q, "k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    seen.append(r.json()["index_version"])
    if seen[-1] == 7:
      break
  assert seen[-1] == 7, seen
  after = r.json()
  assert [p["id"] for p in after["passages"]] != [p["id"] for p in before["passages"]]
  assert httpx.get(f"{url}/v1/health", timeout=10).json()["index_version"] == 7
  # SIGTERM while a request is in flight (its headers read, its body not yet sent): the
  # server stops accepting, answers it, then exits 0.
  body = json.dumps({"question": q}).encode()
  port = int(url.rsplit(":", 1)[1])
  with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
    sock.sendall(f"POST /v1/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no new connections once draining
      httpx.get(f"{url}/v1/health", timeout=5)
    sock.sendall(body)
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 10:
      chunk = sock.recv(65536)
      if not chunk:
        break
      reply += chunk
  assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
  assert b'"index_version":7' in reply
  assert proc.wait(timeout=60) == 0
