"""Dynamic batching: concurrent requests gathered into the engine's compiled batch shapes.

One worker thread owns the engine. It takes the oldest request, waits up to `max_wait_s` for more
of the same kind and options (up to `max_batch` questions), runs them as one call, and resolves
each request's future. The queue holds at most `max_queue` requests; `submit` on a full queue
raises `QueueFull` at once (the server answers 429). Control actions (a new index version, a
reloaded bundle) run on the worker between batches, so a request never sees half a swap.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("ragjax")


class QueueFull(Exception):
  """The request queue is at `max_queue`."""


@dataclasses.dataclass
class _Request:
  op: str                 # answer | retrieve | score
  key: tuple              # requests batch together only with equal (op, key)
  items: list             # questions (answer, retrieve) or [(question, answers)] (score)
  future: concurrent.futures.Future
  enqueued: float


class Batcher:
  """Gathers requests for `engine` (module docstring). `stats` receives
  `(op, batch_questions, queue_depth)` after every batch (for metrics)."""

  def __init__(self, engine, *, max_batch: int | None = None, max_wait_s: float = 0.005,
               max_queue: int = 256, stats: Callable[[str, int, int], None] | None = None):
    self.engine = engine
    self.max_batch = int(max_batch or engine.limits.max_batch)
    self.max_wait_s, self.max_queue = float(max_wait_s), int(max_queue)
    self.stats = stats
    self._queue: collections.deque[_Request] = collections.deque()
    self._control: collections.deque[Callable[[], None]] = collections.deque()
    self._cv = threading.Condition()
    self._stop = False
    self._thread = threading.Thread(target=self._run, name="ragjax-batcher", daemon=True)
    self._thread.start()

  @property
  def depth(self) -> int:
    return len(self._queue)

  def submit(self, op: str, items: list, key: tuple = ()) -> concurrent.futures.Future:
    """Queue a request of `len(items)` questions; its future gets one result per item.

    Raises: QueueFull."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    with self._cv:
      if self._stop:
        raise QueueFull("the server is shutting down")
      if len(self._queue) >= self.max_queue:
        raise QueueFull(f"{len(self._queue)} requests queued (max {self.max_queue})")
      self._queue.append(_Request(op, key, list(items), fut, time.monotonic()))
      self._cv.notify()
    return fut

  def control(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Run `fn()` on the worker between batches (e.g. `engine.set_index`)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run():
      try:
        fut.set_result(fn())
      except BaseException as e:  # reported to the caller, the worker goes on
        fut.set_exception(e)
    with self._cv:
      self._control.append(run)
      self._cv.notify()
    return fut

  def stop(self, timeout: float = 30.0) -> None:
    """Finish what is queued, then stop the worker."""
    with self._cv:
      self._stop = True
      self._cv.notify()
    self._thread.join(timeout)

  # ---------------------------------------------------------------------------------- worker

  def _take(self) -> list[_Request] | None:
    """The next batch: the oldest request plus later ones of the same (op, key) that fit,
    waiting up to `max_wait_s` after the first for them to arrive."""
    with self._cv:
      while not self._queue and not self._control and not self._stop:
        self._cv.wait()
      while self._control:
        self._control.popleft()()
      if not self._queue:
        return None
      first = self._queue[0]
      deadline = first.enqueued + self.max_wait_s
      while True:
        size = 0
        batch = []
        for r in self._queue:
          if (r.op, r.key) == (first.op, first.key) and size + len(r.items) <= self.max_batch:
            batch.append(r)
            size += len(r.items)
        left = deadline - time.monotonic()
        if size >= self.max_batch or left <= 0 or self._stop:
          break
        self._cv.wait(left)
      for r in batch:
        self._queue.remove(r)
      return batch

  def _run(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        if self._stop and not self._queue:
          return
        continue
      self._execute(batch)

  def _execute(self, batch: list[_Request]) -> None:
    op, key = batch[0].op, batch[0].key
    items = [x for r in batch for x in r.items]
    engine = self.engine  # every result names the index version and step that computed it
    try:
      if op == "answer":
        results = engine.answer(items, **dict(key))
      elif op == "retrieve":
        results = [{"passages": p} for p in engine.retrieve(items, **dict(key))]
      elif op == "score":  # one question per request: its answers are the batch
        results = [{"logprobs": engine.score(q, answers)} for q, answers in items]
      else:
        raise ValueError(f"unknown op {op!r}")
      results = [dict(r, index_version=engine.index_version,
                      checkpoint_step=engine.bundle.checkpoint_step) for r in results]
    except BaseException as e:
      log.exception("batch of %d %s requests failed", len(batch), op)
      for r in batch:
        r.future.set_exception(e)
      return
    at = 0
    for r in batch:
      r.future.set_result(results[at:at + len(r.items)])
      at += len(r.items)
    if self.stats is not None:
      self.stats(op, len(items), self.depth)
