"""The RAG trainer: `ragjax train --config FILE[:arg] --workdir DIR [--config.key=value ...]`.

`train(cfg, workdir)` reads top to bottom: config check (`ragjax.config.validate`), mesh, system
(data, towers), optimiser, abstract state and shardings, checkpoint restore or init, index
refresh (`ragjax.joint.refresh`), the jitted step (`ragjax.training.step`), then the loop with
logging, checkpoints, evaluation and preemption. The workdir's layout is in
`ragjax.training.workdir`; the passage embeddings of a frozen passage encoder are cached in
`index/embeddings-<key>` (resumable shards + manifest).

A run resumes from the newest checkpoint in its workdir by itself; metrics logged after that
checkpoint by the interrupted run are dropped so `metrics.jsonl` reads as one run. SIGTERM
(preemption) saves a checkpoint at the next step boundary (with several processes: the next
logged step, where they agree) and exits cleanly with status 0; a SIGTERM during an evaluation
is acted on after it.
Only process 0 writes files other than checkpoints.
"""
from __future__ import annotations

import logging
import pathlib
import signal
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ragjax import config as config_lib
from ragjax import sharding as sh
from ragjax.checkpoint import Checkpointer
from ragjax.data import pipeline
from ragjax.errors import ConfigError, NonFiniteLossError, NotFoundError
from ragjax.evaluation import evaluate as evaluation
from ragjax.fsutil import write_json_atomic
from ragjax.joint import versions
from ragjax.joint.refresh import IndexRefresh
from ragjax.retrieval.embed import corpus_fingerprint, embed_corpus, load_embeddings
from ragjax.system import feed
from ragjax.system.build import build_system, corpus_key
from ragjax.training.optim import make_optimizer
from ragjax.training.state import abstract_state, build_mesh, init_state
from ragjax.training.step import jit_train_step
from ragjax.training.workdir import MetricsWriter, check_resumed_config, save_config

log = logging.getLogger("ragjax")


def _gather_tree(tree):
  return jax.tree.map(evaluation.gather, tree)


class Run:
  """One run's static pieces: mesh, system, optimiser, abstract state, checkpointer, feeder."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir):
    self.cfg, self.workdir = cfg, pathlib.Path(workdir)
    config_lib.validate(cfg)                  # before any device, data or array is touched
    self.mesh, self.rules = build_mesh(cfg)
    config_lib.validate(cfg, self.mesh)       # the batch splits over this mesh
    config_lib.check_indexer_placement(cfg.index.refresh, self.mesh.devices.flat[0].platform)
    self.system = build_system(cfg)
    self.init_step, self.init_index_version = self._init_from_workdir()
    self.model = self.system.model
    self.tx, self.schedule = make_optimizer(cfg.optim, int(cfg.train.total_steps))
    replicated = []
    self.shapes = abstract_state(self.model, self.tx, self.mesh, self.rules,
                                 log_fn=replicated.append)
    for line in replicated:
      log.info(line)
    self.ckpt = Checkpointer(self.workdir / "checkpoints",
                             max_to_keep=int(cfg.train.keep_checkpoints),
                             config=config_lib.shape_config(cfg),
                             async_save=bool(cfg.train.async_checkpointing))
    kind = feed.choose_index_kind(cfg.index.kind, len(self.system.passages),
                                  self.system.retriever.dim, int(cfg.index.device_max_bytes))
    self.feeder = feed.Feeder(self.system, self.mesh, self.rules, kind)

  def _init_from_workdir(self) -> tuple[int | None, int | None]:
    """`init.from_workdir` W: the towers named in `init.towers` (default all three) start from
    W's checkpoint (`init.step`, 0 = newest; a fresh optimiser at step 0), the others from this
    run's own init; with W's passage encoder, the frozen corpus embeddings are W's too. Returns `(W's step, its checkpoint's index version or None)`, or
    `(None, None)` without `init.from_workdir`.

    Raises: NotFoundError when W has no such checkpoint.
    """
    i = self.cfg.get("init", {})
    if not i or not i.get("from_workdir"):
      return None, None
    src = pathlib.Path(i.from_workdir)
    reader = Checkpointer.reader(src / "checkpoints")
    step = int(i.step) or reader.latest_step()
    if step is None or step not in reader.all_steps():
      raise NotFoundError(f"init.from_workdir={src}: no checkpoint "
                          f"{'at step ' + str(i.step) if int(i.step) else 'at all'} in "
                          f"{src / 'checkpoints'} (steps: {reader.all_steps()})")
    params = reader.restore_subtree(step, ("params",))
    towers = tuple(i.get("towers", config_lib.TOWERS))
    retriever = self.system.retriever
    retriever.params = {t: params["bi_encoder"][t] if t in towers else retriever.params[t]
                        for t in ("query_encoder", "passage_encoder")}
    if "passage_encoder" in towers or "query_encoder" in towers:
      retriever.identity = {**retriever.identity, "init_from_workdir": str(src.resolve()),
                            "init_step": int(step), "init_towers": list(towers)}
    if "generator" in towers:
      self.system.generator_params = params["generator"]
    version = reader.metadata(step).get("index_version")
    log.info("init.from_workdir: %s from %s step %d (index version %s, index %s)",
             ", ".join(towers), src, step, version, i.index)
    return int(step), version

  def initial_embeddings(self, params) -> np.ndarray:
    """The corpus embeddings a run starts from: with `init.index="keep"` the index version W's
    checkpoint was trained with (or W's newest), else `corpus_embeddings(params)`.

    Raises: NotFoundError when W has no published version; IndexFormatError when it does not
    match this corpus."""
    i = self.cfg.get("init", {})
    if self.init_step is None or i.index != "keep" or self.system.closed_book:
      return self.corpus_embeddings(params)
    src = pathlib.Path(i.from_workdir)
    version = self.init_index_version
    if version is None:
      version = versions.latest_version(src)
    if version is None:
      raise NotFoundError(f"init.index='keep': {src} has no published index version (its "
                          "passage encoder was frozen); use init.index='reembed'")
    emb, _, _ = versions.load_version(src, int(version), expect_count=len(self.system.passages),
                                      expect_dim=self.system.retriever.dim,
                                      expect_corpus=corpus_fingerprint(self.system.passages))
    log.info("init.index=keep: index version %d of %s", version, src)
    return emb

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  def restore_or_init(self):
    """`(state, meta or None)`: the newest checkpoint, or a fresh state."""
    return self.ckpt.restore_or(
        lambda: init_state(self.model, self.tx, self.shapes, self.system.host_towers(),
                           int(self.cfg.seed)), self.shapes.state)

  def restore_latest(self):
    """`(state, meta)` of the newest checkpoint. Raises: NotFoundError when there is none."""
    step = self.ckpt.latest_step()
    if step is None:
      raise NotFoundError(f"{self.workdir / 'checkpoints'}: no checkpoint to evaluate")
    self.ckpt.verify(step)  # a corrupt step: one line naming the file (train sets it aside)
    return self.ckpt.restore(step, self.shapes.state)

  def corpus_embeddings(self, params) -> np.ndarray:
    """Passage embeddings `[N, D]` float32 of the corpus under the state's passage encoder
    (cached in `index/embeddings-<key>` when the passage encoder is frozen)."""
    system = self.system
    if system.closed_book:
      return np.zeros((0, system.retriever.dim), np.float32)
    retriever = system.retriever
    bs = int(self.cfg.retriever.embed_batch_size)
    frozen = "passage_encoder" in config_lib.frozen_towers(self.cfg.optim)
    if not frozen:  # same shapes: the jitted encoder is reused, not recompiled
      retriever.params = {**retriever.params,
                          "passage_encoder": _gather_tree(params["bi_encoder"]["passage_encoder"])}
    if not frozen or jax.process_count() > 1:  # not cached: changing, or several writers
      return retriever.encode_passages([p.title for p in system.passages],
                                       [p.text for p in system.passages], batch_size=bs)
    out = self.workdir / "index" / f"embeddings-{corpus_key(system)}"
    t0 = time.perf_counter()
    embed_corpus(retriever, system.passages, out, batch_size=bs, progress=False)
    emb, ids, _ = load_embeddings(out)
    log.info("corpus: %d passages x %d embedded or loaded in %.1f s (%s)", len(ids),
             emb.shape[1], time.perf_counter() - t0, out)
    return emb

  def evaluate(self, params, step: int, questions=None, name_suffix: str = "") -> dict | None:
    """Evaluate and write `eval/step_<step><name_suffix>.json` (process 0); None when there are
    no questions."""
    questions = self.system.eval_questions if questions is None else questions
    if not questions:
      return None
    report = evaluation.evaluate(self.feeder, params, questions, self.cfg.eval, step)
    if self.is_main:
      (self.workdir / "eval").mkdir(parents=True, exist_ok=True)
      write_json_atomic(self.workdir / "eval" / f"step_{step}{name_suffix}.json", report)
    if "exact_match" in report:
      log.info("eval step %d: EM %.4f F1 %.4f answer recall %s (%d questions, %.1f s)", step,
               report["exact_match"], report["f1"], report.get("answer_recall"),
               report["num_questions"], report["seconds"])
    else:  # a retriever-only run
      log.info("eval step %d: answer recall %s gold recall %s (%d questions, %.1f s)", step,
               report["answer_recall"], report.get("gold_recall"), report["num_questions"],
               report["seconds"])
    return report


class _Preemption:
  """SIGTERM -> a flag checked at step boundaries (agreed across processes)."""

  def __init__(self):
    self.flag = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: will save a checkpoint at the next step boundary and exit")
    self.flag = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def train(cfg: ml_collections.ConfigDict, workdir, *, spec: str | None = None,
          overrides=()) -> dict:
  """Train (or resume) in `workdir`. Returns a summary: `final_step`, `stopped` ("done" |
  "preempted"), `last_eval` (the final evaluation report or None).

  Raises: ConfigError (bad config), DataError (bad data), CheckpointError (incompatible
  checkpoint), NonFiniteLossError (stops the run; earlier checkpoints are kept).
  """
  workdir = pathlib.Path(workdir)
  t_setup = time.perf_counter()
  run = Run(cfg, workdir)
  log.info("process %d/%d, %d local / %d global devices, mesh %s, index %s",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count(), dict(run.mesh.shape), run.feeder.kind)
  if run.is_main:
    log.info("resolved config (also in %s):\n%s", workdir / "config.json", cfg)
  state, meta = run.restore_or_init()  # a refused checkpoint leaves config.json as it was
  if meta:
    check_resumed_config(cfg, workdir, int(meta["step"]), write=run.is_main)
  if run.is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, workdir, spec, overrides)
  start = int(jax.device_get(state.step))
  log.info("%s at step %d", "resumed" if meta else "initialised", start)
  if start > int(cfg.train.total_steps):
    raise ConfigError(f"train.total_steps={cfg.train.total_steps}: the newest checkpoint in "
                      f"{run.ckpt.directory} is at step {start}; expected total_steps >= {start} "
                      "to resume it (or a new --workdir)")
  log.info("largest parameters:\n%s", sh.sharding_summary(state.params, top=8))
  refresh = IndexRefresh(run)
  refresh.start(state.params, start, recorded=(meta or {}).get("index_version"))
  tcfg = cfg.train
  total, g = int(tcfg.total_steps), int(tcfg.global_batch)
  step_fn = jit_train_step(run.model, cfg, run.tx, run.schedule, run.shapes, run.mesh,
                           run.rules)
  rng = jax.random.key(int(cfg.seed))
  writer = MetricsWriter(workdir, start, run.is_main, bool(tcfg.tensorboard))
  preempt = _Preemption()
  train_q = run.system.train_questions
  log_every, ckpt_every = int(tcfg.log_every), int(tcfg.checkpoint_every)
  eval_every = int(tcfg.eval_every)
  bar = tqdm(total=total, initial=start, desc="train", unit="step",
             disable=not (run.is_main and tcfg.progress_bar))
  pending, t_last, n_last, stopped, last_eval = [], None, start, "done", None
  checked = -1  # the last step whose non-finite flag was read
  log.info("set-up took %.1f s", time.perf_counter() - t_setup)

  def save(done, state, preempted=False):
    meta = {"examples_seen": done * g, "data_seed": int(cfg.data.seed),
            **({"index_version": refresh.version} if refresh.active else {}),
            **({"preempted": True} if preempted else {})}
    run.ckpt.save(done, state, meta=meta, force=True)
    refresh.exported(done)

  def export_now(step, state):
    check_finite()
    save(step, state)

  def check_finite():
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      run.ckpt.wait()
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {bad}; the update was not applied. Last good "
          f"checkpoint: step {run.ckpt.latest_step()} in {run.ckpt.directory}")

  try:
    for step in range(start, total):
      refresh.before_step(step, state, export_now)
      idx = pipeline.batch_indices(step, g, len(train_q), int(cfg.data.seed))[
          run.feeder.local_rows(g)]
      batch = run.feeder.batch(state.params, [train_q[i] for i in idx])
      state, metrics = step_fn(state, batch, rng)
      pending.append(metrics)
      done = step + 1
      if t_last is None:  # the first step compiles: time from its end
        jax.block_until_ready(metrics)
        t_last, n_last = time.perf_counter(), done
        log.info("first step (with compilation) done")
      if done % log_every == 0 or done == total:
        if pending:
          host = jax.device_get(pending)
          now = time.perf_counter()
          record = {"step": done, **refresh.record(step)}
          for key in host[0]:
            record[key] = float(np.mean([m[key] for m in host]))
          if done > n_last:  # the first step's compilation is not counted
            record["examples_per_second"] = round(g * (done - n_last) / max(now - t_last, 1e-9),
                                                  3)
          t_last, n_last, pending = now, done, []
          writer.write(record)
          bar.set_postfix(loss=f"{record['loss']:.4f}")
        check_finite()
        checked = done
      stop = done < total and (jax.process_count() == 1 or done % log_every == 0) \
          and preempt.requested()
      if done % ckpt_every == 0 or done == total or stop or refresh.wants_export(done):
        if checked != done:
          check_finite()
        save(done, state, preempted=stop)
      bar.update(1)
      if stop:
        run.ckpt.wait()
        stopped = "preempted"
        log.warning("preempted: checkpoint at step %d saved; exiting", done)
        break
      if done < total and eval_every and done % eval_every == 0:
        last_eval = run.evaluate(state.params, done)
    else:
      run.ckpt.wait()  # the final checkpoint is on disk before the (long) final evaluation
      if start < total or not (workdir / "eval" / f"step_{total}.json").is_file():
        last_eval = run.evaluate(state.params, total)
  finally:
    bar.close()
    writer.close()
    preempt.restore()
    run.ckpt.close()
    refresh.finish()
  final = int(jax.device_get(state.step))
  summary = refresh.summary() if refresh.active else None
  if summary and run.is_main:
    write_json_atomic(workdir / "index_refresh.json", summary)
  return {"final_step": final, "stopped": stopped, "last_eval": last_eval,
          "index_refresh": summary}
