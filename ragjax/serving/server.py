"""`ragjax serve B`: an HTTP server (FastAPI + uvicorn) over a serving bundle.

Routes (JSON; request models refuse unknown fields):
  POST /v1/answer    {"question": str | [str], "k"?, "decoding"?, "max_new_tokens"?}
                     -> {"answer", "passages": [{"id", "title", "text", "score", "prior"}],
                         "index_version", "checkpoint_step"}   (a list in, a list out)
  POST /v1/retrieve  {"question": str | [str], "k"} -> {"passages": [...]} (a list in, a list out)
  POST /v1/score     {"question", "answers": [str]} -> {"logprobs": [float]} (RAG marginal
                     log-likelihood, nats: `Engine.score`)
  (every response also names the "index_version" and "checkpoint_step" that computed it)
  POST /v1/reload    reload the bundle from disk (also SIGHUP) -> {"checkpoint_step", "reloads",
                     ...}; 409 naming the file when the bundle on disk does not load (the old
                     one keeps serving)
  GET  /v1/health    200 {"status": "ok", "bundle", "index_version", "reloads"} once warm, else
                     503
  GET  /v1/info      the config, the manifest (without its file list) and the limits
  GET  /metrics      Prometheus: requests by route and code, latency, batch sizes, queue depth

Every compiled shape is warmed before the port opens, so no request compiles. Bad requests get
4xx naming the field (422 from the request models, 413 for an over-long question, 429 when the
queue is full); an engine failure is a 503 that names it, and the server stays up. With
`follow=W` a thread polls W's newest published index version (`ragjax.joint.versions`) and swaps
it in between batches. SIGTERM stops accepting, finishes the requests in flight, exits 0
(uvicorn's graceful shutdown).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import signal
import threading
import time

import prometheus_client as prom
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ragjax.errors import BundleError
from ragjax.joint import versions
from ragjax.serving.batcher import Batcher, QueueFull
from ragjax.serving.bundle import load_bundle, load_published_version
from ragjax.serving.engine import DEFAULT_BUCKETS, Engine

log = logging.getLogger("ragjax")


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class AnswerRequest(_Strict):
  question: str | list[str]
  k: int | None = Field(None, ge=1)
  decoding: str | None = None
  max_new_tokens: int | None = Field(None, ge=1)


class RetrieveRequest(_Strict):
  question: str | list[str]
  k: int = Field(5, ge=1)


class ScoreRequest(_Strict):
  question: str
  answers: list[str] = Field(min_length=1)


class ServerState:
  """The engine, its batcher, the metrics and the follow thread of one server."""

  def __init__(self, bundle_path, *, buckets=DEFAULT_BUCKETS, max_wait_ms: float = 5.0,
               max_queue: int = 256, follow=None, follow_every_s: float = 2.0,
               registry: prom.CollectorRegistry | None = None, decodings=None):
    self.bundle_path = pathlib.Path(bundle_path)
    self.decodings = tuple(decodings) if decodings else None
    self.buckets, self.max_wait_s, self.max_queue = tuple(buckets), max_wait_ms / 1e3, max_queue
    self.registry = registry or prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("ragjax_requests", "HTTP requests by route and status code",
                                 ["route", "code"], registry=r)
    self.latency = prom.Histogram("ragjax_request_seconds", "request latency by route",
                                  ["route"], registry=r,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    self.batch_sizes = prom.Histogram("ragjax_batch_questions", "questions per engine batch",
                                      ["op"], registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
    self.queue_depth = prom.Gauge("ragjax_queue_depth", "requests waiting for the engine",
                                  registry=r)
    self.index_version_gauge = prom.Gauge("ragjax_index_version", "index version serving",
                                          registry=r)
    self.ready, self.reloads, self._reload_lock = False, 0, threading.Lock()
    self.engine = self._engine(self.bundle_path)
    self.batcher = Batcher(self.engine, max_wait_s=self.max_wait_s, max_queue=max_queue,
                           stats=self._stats)
    self.follow = pathlib.Path(follow) if follow else None
    self._stop = threading.Event()
    if self.follow is not None:
      threading.Thread(target=self._follow_loop, args=(follow_every_s,), daemon=True,
                       name="ragjax-follow").start()
    self.ready = True

  def _engine(self, path) -> Engine:
    engine = Engine(load_bundle(path), buckets=self.buckets, decodings=self.decodings)
    engine.warm()
    return engine

  def _stats(self, op: str, n: int, depth: int) -> None:
    self.batch_sizes.labels(op).observe(n)
    self.queue_depth.set(depth)

  # ------------------------------------------------------------------------ index / reload

  def _set_version(self, version: int) -> None:
    emb = load_published_version(self.engine.bundle, self.follow, version)
    self.batcher.control(lambda: self.engine.set_index(emb, version)).result()
    self.index_version_gauge.set(version)
    log.info("serving index version %d of %s", version, self.follow)

  def _follow_loop(self, every_s: float) -> None:
    while not self._stop.wait(every_s):
      try:
        v = versions.latest_version(self.follow)
        if v is not None and v != self.engine.index_version:
          self._set_version(v)
      except Exception:  # a half-published or foreign version: keep serving the current one
        log.exception("follow %s: version not loaded", self.follow)

  def reload(self) -> dict:
    """Load and warm the bundle again (a new export at the same path), then swap it in between
    batches; requests keep being served by the old engine meanwhile. One reload at a time; with
    `--follow`, the new engine serves the followed index version from its first request.

    Raises:
      BundleError: the bundle at the path does not load (the old engine keeps serving).
    """
    with self._reload_lock:
      engine = self._engine(self.bundle_path)
      v = versions.latest_version(self.follow) if self.follow is not None else None
      if v is not None:
        engine.set_index(load_published_version(engine.bundle, self.follow, v), v)

      def swap():
        self.engine = self.batcher.engine = engine
      self.batcher.control(swap).result()
      self.reloads += 1
      log.info("reloaded %s (step %d, index version %s)", self.bundle_path,
               engine.bundle.checkpoint_step, engine.index_version)
      return self.info_short()

  def reload_logged(self) -> None:
    """SIGHUP's reload: a bundle that does not load is logged and the old one kept."""
    try:
      self.reload()
    except Exception:
      log.exception("reload of %s failed; still serving the previous bundle", self.bundle_path)

  def info_short(self) -> dict:
    return {"bundle": str(self.bundle_path), "checkpoint_step": self.engine.bundle.checkpoint_step,
            "index_version": self.engine.index_version, "reloads": self.reloads}

  def close(self) -> None:
    self._stop.set()
    self.batcher.stop()


def _questions(q: str | list[str], limits, field: str = "question") -> list[str]:
  qs = [q] if isinstance(q, str) else list(q)
  if not qs:
    raise HTTPException(422, f"{field}: an empty list; expected 1..{limits.max_batch} questions")
  if len(qs) > limits.max_batch:
    raise HTTPException(422, f"{field}: {len(qs)} questions; at most {limits.max_batch}")
  for i, x in enumerate(qs):
    where = field if isinstance(q, str) else f"{field}[{i}]"
    if not x.strip():
      raise HTTPException(422, f"{where}: empty question")
    if len(x) > limits.max_question_chars:
      raise HTTPException(413, f"{where}: {len(x)} characters; at most "
                               f"{limits.max_question_chars}")
  return qs


def make_app(state: ServerState) -> FastAPI:
  """The FastAPI app of a `ServerState` (module docstring)."""
  app = FastAPI(title="ragjax", version="1")

  @app.middleware("http")
  async def observe(request: Request, call_next):
    t0 = time.perf_counter()
    response = await call_next(request)
    route = request.url.path
    state.requests.labels(route, str(response.status_code)).inc()
    state.latency.labels(route).observe(time.perf_counter() - t0)
    return response

  @app.exception_handler(Exception)
  async def unexpected(request: Request, exc: Exception):
    log.exception("%s failed", request.url.path)
    return JSONResponse({"detail": f"{type(exc).__name__}: {exc}"}, status_code=503)

  async def run(op: str, items: list, key: tuple = ()):
    try:
      fut = state.batcher.submit(op, items, key)
    except QueueFull as e:
      raise HTTPException(429, f"queue full: {e}") from None
    state.queue_depth.set(state.batcher.depth)
    try:
      return await asyncio.wrap_future(fut)
    except ValueError as e:  # a request the engine refuses (limits)
      raise HTTPException(422, str(e)) from None
    except Exception as e:
      raise HTTPException(503, f"engine failed: {type(e).__name__}: {e}") from None

  @app.post("/v1/answer")
  async def answer(req: AnswerRequest):
    lim = state.engine.limits
    qs = _questions(req.question, lim)
    if req.decoding is not None and req.decoding not in lim.decodings:
      raise HTTPException(422, f"decoding: {req.decoding!r}; this server decodes "
                               f"{list(lim.decodings)}")
    if req.max_new_tokens is not None and req.max_new_tokens > lim.max_new_tokens:
      raise HTTPException(422, f"max_new_tokens: {req.max_new_tokens}; at most "
                               f"{lim.max_new_tokens}")
    if req.k is not None and req.k > lim.retrieved_k:
      raise HTTPException(422, f"k: {req.k}; the bundle retrieves {lim.retrieved_k} passages")
    out = await run("answer", qs, (("k", req.k), ("max_new_tokens", req.max_new_tokens),
                                   ("decoding", req.decoding)))
    return out[0] if isinstance(req.question, str) else out

  @app.post("/v1/retrieve")
  async def retrieve(req: RetrieveRequest):
    lim = state.engine.limits
    qs = _questions(req.question, lim)
    if req.k > lim.max_retrieve_k:
      raise HTTPException(422, f"k: {req.k}; at most {lim.max_retrieve_k}")
    out = await run("retrieve", qs, (("k", req.k),))
    return out[0] if isinstance(req.question, str) else out

  @app.post("/v1/score")
  async def score(req: ScoreRequest):
    lim = state.engine.limits
    _questions(req.question, lim)
    if len(req.answers) > lim.max_answers:
      raise HTTPException(422, f"answers: {len(req.answers)}; at most {lim.max_answers}")
    for i, a in enumerate(req.answers):
      if len(a) > lim.max_question_chars:
        raise HTTPException(413, f"answers[{i}]: {len(a)} characters; at most "
                                 f"{lim.max_question_chars}")
    (out,) = await run("score", [(req.question, list(req.answers))])
    return out

  @app.post("/v1/reload")
  async def reload():
    try:
      return await asyncio.to_thread(state.reload)
    except BundleError as e:
      raise HTTPException(409, f"bundle does not load, still serving step "
                               f"{state.engine.bundle.checkpoint_step}: {e}") from None

  @app.get("/v1/health")
  async def health():
    if not state.ready:
      return JSONResponse({"status": "warming"}, status_code=503)
    return {"status": "ok", **state.info_short()}

  @app.get("/v1/info")
  async def info():
    m = {k: v for k, v in state.engine.bundle.manifest.items() if k != "files"}
    return {"manifest": m, "config": state.engine.cfg.to_dict(),
            "limits": vars(state.engine.limits), "buckets": list(state.engine.buckets),
            **state.info_short()}

  @app.get("/metrics")
  async def metrics():
    state.queue_depth.set(state.batcher.depth)
    return Response(prom.generate_latest(state.registry), media_type=prom.CONTENT_TYPE_LATEST)

  return app


def _uvicorn_server(config):
  """uvicorn's Server whose SIGTERM / SIGINT start the graceful drain and are not re-raised
  after it (uvicorn re-raises them, which would end the process by the signal, not with 0)."""
  import uvicorn

  class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
      old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for s, handler in old.items():
          signal.signal(s, handler)
  return Server(config)


def serve(bundle, host: str = "127.0.0.1", port: int = 8000, *, follow=None,
          buckets=DEFAULT_BUCKETS, max_wait_ms: float = 5.0, max_queue: int = 256,
          follow_every_s: float = 2.0, decodings=None) -> int:
  """Load, warm and serve a bundle until SIGTERM / SIGINT (returns 0 after the drain).
  `decodings`: what a request's "decoding" may name (default the bundle's `eval.decoding`)."""
  import uvicorn
  state = ServerState(bundle, buckets=buckets, max_wait_ms=max_wait_ms, max_queue=max_queue,
                      follow=follow, follow_every_s=follow_every_s, decodings=decodings)

  def on_hup(*_):
    threading.Thread(target=state.reload_logged, daemon=True, name="ragjax-reload").start()
  signal.signal(signal.SIGHUP, on_hup)
  config = uvicorn.Config(make_app(state), host=host, port=int(port), log_level="warning",
                          timeout_graceful_shutdown=30)
  server = _uvicorn_server(config)
  log.info("serving %s on http://%s:%d (step %d, index version %s)", bundle, host, port,
           state.engine.bundle.checkpoint_step, state.engine.index_version)
  try:
    server.run()
  finally:
    state.close()
  return 0
