"""`ragjax evaluate`: one command and one result format for every benchmark of the suite.

  scorer = open_scorer(bundle="bundles/bios")            # or workdir=W, or server=URL
  result, records = evaluate_task("truthfulqa_mc", scorer, max_examples=100)
  write_result("out/tqa.json", result, records)          # out/tqa.json + out/tqa.jsonl

A workdir is exported to a temporary bundle (`export_bundle`: the checkpoint's weights and the
index version it was trained with) and read like any bundle, so a workdir, its bundle and a
`ragjax serve` of that bundle give the same scores: the same `Engine` answers all three, the
server over HTTP. `--corpus FILE` (or a task's own corpus, FinanceBench's evidence pages)
replaces the bundle's passages, embedded here by the bundle's passage encoder (exact search).

OUT.json: `{"task", "num_examples", "metrics", "config", "source", "data", "input", "seconds"}`;
OUT.jsonl beside it (same stem): one record per example `{"id", "question", "prediction", "gold",
"passages", "score"}`. `report(paths)` makes a Markdown table of several OUT.json files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

from ragjax.data import corpus as corpus_lib
from ragjax.errors import DataError, UsageError
from ragjax.evaluation.tasks import Scorer, get_task
from ragjax.fsutil import atomic_file, write_json_atomic
from ragjax.serving import bundle as bundle_lib
from ragjax.serving.engine import Engine

log = logging.getLogger("ragjax")
DEFAULT_RECALL_KS = (1, 5, 20)


class EngineScorer:
  """A `Scorer` over an in-process `Engine` (one compiled batch size, `batch`)."""

  def __init__(self, engine: Engine, source: dict):
    self.engine, self.source = engine, source
    lim = engine.limits
    self.max_batch, self.max_retrieve_k = lim.max_batch, lim.max_retrieve_k
    self.max_answers, self.reader_k = lim.max_answers, engine.system.reader_k
    self.config = engine.cfg.to_dict()

  def answer(self, questions):
    return self.engine.answer(questions)

  def retrieve(self, questions, k):
    return self.engine.retrieve(questions, k)

  def score(self, question, answers):
    return self.engine.score(question, answers)


class HttpScorer:
  """A `Scorer` over a running `ragjax serve` (`/v1/answer`, `/v1/retrieve`, `/v1/score`); a 429
  (queue full) is retried with backoff, at most `retries` times per request."""

  def __init__(self, url: str, timeout_s: float = 120.0, retries: int = 20):
    self.url, self.timeout_s, self.retries = url.rstrip("/"), float(timeout_s), int(retries)
    info = self._call("GET", "/v1/info")
    lim, self.config = info["limits"], info["config"]
    self.max_batch, self.max_retrieve_k = int(lim["max_batch"]), int(lim["max_retrieve_k"])
    self.max_answers = int(lim["max_answers"])
    closed = self.config["model"]["loss"] == "closed_book"
    self.reader_k = 1 if closed else int(self.config["model"]["k"])
    self.source = {"server": self.url, "checkpoint_step": info["checkpoint_step"],
                   "index_version": info["index_version"]}

  def _call(self, method: str, route: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(self.retries + 1):
      req = urllib.request.Request(self.url + route, data=data, method=method,
                                   headers={"Content-Type": "application/json"})
      try:
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
          return json.loads(r.read())
      except urllib.error.HTTPError as e:
        if e.code == 429 and attempt < self.retries:
          time.sleep(min(2.0, 0.05 * 2 ** attempt))
          continue
        detail = e.read().decode(errors="replace")[:300]
        raise UsageError(f"--server {self.url}{route}: HTTP {e.code}: {detail}") from None
      except urllib.error.URLError as e:
        raise UsageError(f"--server {self.url}: not reachable ({e.reason})") from None
    raise AssertionError("unreachable")

  def answer(self, questions):
    return self._call("POST", "/v1/answer", {"question": list(questions)})

  def retrieve(self, questions, k):
    return [r["passages"] for r in self._call("POST", "/v1/retrieve",
                                               {"question": list(questions), "k": int(k)})]

  def score(self, question, answers):
    return self._call("POST", "/v1/score", {"question": question,
                                            "answers": list(answers)})["logprobs"]


def with_corpus(bundle: bundle_lib.Bundle, passages: list) -> bundle_lib.Bundle:
  """The bundle answering from `passages` instead of its own, embedded by its passage encoder
  (exact search, no index version). Raises: UsageError for a closed-book bundle."""
  system = bundle.system
  if system.closed_book:
    raise UsageError("--corpus: this bundle is closed-book (model.loss=closed_book); it reads "
                     "no passages")
  new = system.with_passages(passages)
  t0 = time.perf_counter()
  emb = bundle_lib.embed_corpus(new, bundle.params)
  log.info("corpus: %d passages embedded by the bundle's passage encoder in %.1f s",
           len(passages), time.perf_counter() - t0)
  manifest = {**bundle.manifest, "index_kind": "exact", "index_version": None}
  return dataclasses.replace(bundle, system=new, embeddings=emb, index=None, manifest=manifest)


def open_scorer(*, workdir=None, bundle=None, server=None, step=None, passages=None,
                batch_size: int = 8, max_retrieve_k: int = max(DEFAULT_RECALL_KS),
                max_answers: int = 32) -> Scorer:
  """A Scorer over exactly one of a training `workdir` (its checkpoint `step`, default newest),
  a serving `bundle` directory, or a `server` URL. `passages` replaces the corpus (not with a
  server). Raises: UsageError (not exactly one source; passages with a server), BundleError,
  CheckpointError, NotFoundError."""
  if sum(x is not None for x in (workdir, bundle, server)) != 1:
    raise UsageError("evaluate: give exactly one of --workdir, --bundle, --server")
  if server is not None:
    if passages is not None:
      raise UsageError("--corpus with --server: the server answers from its own corpus; "
                       "evaluate its bundle with --bundle instead")
    return HttpScorer(server)
  b, source = load_system(workdir=workdir, bundle=bundle, step=step)
  if passages is not None:
    b = with_corpus(b, passages)
  return engine_scorer(b, source, batch_size=batch_size, max_retrieve_k=max_retrieve_k,
                       max_answers=max_answers)


def load_system(*, workdir=None, bundle=None, step=None) -> tuple[bundle_lib.Bundle, dict]:
  """`(bundle in memory, source)` of a training `workdir`'s checkpoint `step` (exported to a
  temporary bundle) or of a `bundle` directory. Raises: as `open_scorer`."""
  if workdir is not None:
    with tempfile.TemporaryDirectory(prefix="ragjax-eval-") as tmp:
      bundle_lib.export_bundle(workdir, pathlib.Path(tmp) / "bundle", step)
      b = bundle_lib.load_bundle(pathlib.Path(tmp) / "bundle")
      b.embeddings = np.array(b.embeddings)  # read into memory before the directory goes
    return b, {"workdir": str(workdir)}
  return bundle_lib.load_bundle(bundle), {"bundle": str(bundle)}


def engine_scorer(b: bundle_lib.Bundle, source: dict, *, batch_size: int = 8,
                  max_retrieve_k: int = max(DEFAULT_RECALL_KS), max_answers: int = 32
                  ) -> EngineScorer:
  """An in-process Scorer over bundle `b` (one compiled batch size, search depth capped at the
  corpus size)."""
  n = len(b.system.passages)
  engine = Engine(b, buckets=(int(batch_size),), max_retrieve_k=min(int(max_retrieve_k), n),
                  max_answers=int(max_answers))
  return EngineScorer(engine, {**source, "checkpoint_step": b.checkpoint_step,
                               "index_version": engine.index_version})


def task_passages(task_name: str, data, corpus=None, skip_invalid: bool = False):
  """The passages a task reads: `corpus` (a passage file) if given, else the task's own (e.g.
  FinanceBench's evidence pages), else None (the system's own corpus)."""
  if corpus is not None:
    return corpus_lib.read_passages(corpus, skip_invalid=skip_invalid)
  task = get_task(task_name)
  return task.corpus(task.data_path(data)) if task.corpus is not None else None


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A task's examples read from `path` (the first `max_examples`), with the reader's `stats`."""
  task: object
  path: pathlib.Path
  examples: list
  stats: dict


def load_examples(task_name: str, data=None, *, max_examples: int | None = None,
                  skip_invalid: bool = False) -> Loaded:
  """Read and check a task's data before any model is loaded. Raises: UsageError (unknown task,
  missing data, `max_examples` < 1), DataError (a bad data file, naming file and line)."""
  task = get_task(task_name)
  path = task.data_path(data)
  if max_examples is not None and max_examples < 1:
    raise UsageError(f"--max-examples {max_examples}: expected >= 1")
  stats: dict = {}
  examples = task.load(path, skip_invalid=skip_invalid, stats=stats)
  if stats.get("skipped"):
    log.warning("%s: skipped %d invalid records; first: %s", path, stats["skipped"],
                "; ".join(stats["errors"][:3]))
  return Loaded(task, path, examples[:max_examples] if max_examples else examples, stats)


def run_loaded(loaded: Loaded, scorer: Scorer, recall_ks=DEFAULT_RECALL_KS
               ) -> tuple[dict, list[dict]]:
  """Score loaded examples. Returns `(result, records)`, result as OUT.json (module docstring)."""
  t0 = time.perf_counter()
  metrics, records = loaded.task.run(scorer, loaded.examples, recall_ks=tuple(recall_ks))
  stats = loaded.stats
  result = {"task": loaded.task.name, "num_examples": len(loaded.examples), "metrics": metrics,
            "config": scorer.config, "source": scorer.source, "data": str(loaded.path),
            "input": {"records": stats.get("records", len(loaded.examples)),
                      "skipped": stats.get("skipped", 0), "errors": stats.get("errors", []),
                      **{k: v for k, v in stats.items()
                         if k not in ("records", "skipped", "errors")}},
            "seconds": round(time.perf_counter() - t0, 2)}
  return result, records


def evaluate_task(task_name: str, scorer: Scorer, data=None, *, max_examples: int | None = None,
                  skip_invalid: bool = False, recall_ks=DEFAULT_RECALL_KS
                  ) -> tuple[dict, list[dict]]:
  """`load_examples` then `run_loaded`."""
  return run_loaded(load_examples(task_name, data, max_examples=max_examples,
                                  skip_invalid=skip_invalid), scorer, recall_ks)


def records_path(out) -> pathlib.Path:
  """The per-example JSONL beside OUT.json (same stem)."""
  out = pathlib.Path(out)
  return out.with_name(out.stem + ".jsonl")


def write_result(out, result: dict, records: list[dict]) -> None:
  """OUT.json and its JSONL, each written atomically (records first, result last)."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  with atomic_file(records_path(out)) as tmp:
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  write_json_atomic(out, result)


def _flat(metrics: dict) -> dict[str, float]:
  """Scalar metrics, `{"answer_recall": {"5": r}}` as `answer_recall@5`; breakdowns left out."""
  out = {}
  for k, v in metrics.items():
    if isinstance(v, (int, float)):
      out[k] = float(v)
    elif isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()):
      for sub, x in v.items():
        out[f"{k}@{sub}" if sub.isdigit() else f"{k}.{sub}"] = float(x)
  return out


def report(paths) -> str:
  """A Markdown table of OUT.json files: task, source, checkpoint step, N and every scalar
  metric (blank where a task has none). Raises: DataError naming a file that is not one."""
  rows = []
  for p in paths:
    try:
      r = json.loads(pathlib.Path(p).read_text())
      rows.append((r, _flat(r["metrics"])))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataError(f"not an `ragjax evaluate` result ({type(e).__name__}: {e})",
                      path=p) from None
  cols = list(dict.fromkeys(c for _, m in rows for c in m))
  head = ["task", "source", "step", "N", *cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r, m in rows:
    src = r.get("source", {})
    where = src.get("workdir") or src.get("bundle") or src.get("server") or ""
    lines.append("| " + " | ".join([r["task"], f"`{where}`", str(src.get("checkpoint_step", "")),
                                    str(r["num_examples"]),
                                    *[f"{m[c]:.3f}" if c in m else "" for c in cols]]) + " |")
  return "\n".join(lines) + "\n"
