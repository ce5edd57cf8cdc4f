"""`ragjax train` killed mid-run: it resumes from its newest checkpoint by itself and computes
exactly what an uninterrupted run computes; SIGTERM (preemption) saves and exits with status 0.

Each run is a real `ragjax train` subprocess of `experiments/bios.py:smoke` on one CPU device
(the multi-device and multi-process paths are in test_multiprocess_train.py). All runs share a
persistent XLA compilation cache, so compilation (~25 s of a ~40 s cold run on a loaded 2-core
machine) is paid about once per module.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

DEVICES = 1
# Constant learning rate after the 1-step warm-up: the compiled step then does not depend on
# total_steps, so the 8-step, 200-step and rerun commands share one compilation.
COMMON = ("--config.optim.schedule=constant",)
# Timing-free metrics every step logs; they must match between a killed-and-resumed run and an
# uninterrupted one.
COMPARED = ("loss", "grad_norm", "learning_rate", "nll_per_token", "retrieval_entropy",
            "posterior_entropy", "doc_score_max", "top1_prior")


@pytest.fixture(scope="module")
def env():
  out = dict(os.environ)
  out.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={DEVICES} "
                        # compiles ~2x faster on CPU; every compared run uses the same flags
                        "--xla_backend_optimization_level=0"),
             # the session's compilation cache (conftest: its directory and size limit)
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return out


def train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "ragjax.cli", "train", "--config", "experiments/bios.py:smoke",
          "--workdir", str(workdir), *COMMON, *overrides]


class Train:
  """One `ragjax train` process in its own session (so its whole group can be signalled), its
  stdout and stderr in `<log>.out` / `<log>.err`."""

  def __init__(self, cmd, env, log):
    self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
    with self.out.open("w") as out, self.err.open("w") as err:
      self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err,
                                   start_new_session=True)

  def logs(self) -> str:
    err = "\n".join(l for l in self.err.read_text().splitlines() if not l.startswith("["))
    return f"--- stdout\n{self.out.read_text()[-3000:]}\n--- stderr\n{err[-6000:]}"

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"ragjax train still running after {timeout} s\n{self.logs()}")

  def signal_group(self, sig):
    try:
      os.killpg(self.proc.pid, sig)
    except ProcessLookupError:
      pass

  def kill(self):
    if self.proc.poll() is None:
      self.signal_group(signal.SIGKILL)
      self.proc.wait(30)

  def summary(self) -> dict:
    """The JSON line `ragjax train` prints last (`final_step`, `stopped`, ...)."""
    return json.loads(self.out.read_text().strip().splitlines()[-1])

  def resumed_at(self) -> list[int]:
    return [int(s) for s in re.findall(r"resumed at step (\d+)", self.err.read_text())]


def read_metrics(path) -> list[dict]:
  """Complete lines of `metrics.jsonl` (a line being written may be cut short)."""
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return out


def wait_for_step(run: Train, metrics_path, step: int, timeout: float = 300) -> int:
  """Poll `metrics.jsonl` until a step >= `step` is logged; returns the newest logged step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [m["step"] for m in read_metrics(metrics_path)]
    if steps and max(steps) >= step:
      return max(steps)
    if run.proc.poll() is not None:
      pytest.fail(f"ragjax train exited ({run.proc.returncode}) before logging step {step}\n"
                  f"{run.logs()}")
    time.sleep(0.05)
  run.kill()
  pytest.fail(f"no step >= {step} logged within {timeout} s\n{run.logs()}")


def checkpoint_meta(workdir, step: int) -> dict:
  from ragjax.checkpoint import Checkpointer
  ckpt = Checkpointer(workdir / "checkpoints")
  try:
    assert step in ckpt.all_steps(), ckpt.all_steps()
    return ckpt.metadata(step)
  finally:
    ckpt.close()


# Joint salient-span pretraining: trainable passage encoder, index re-embedded in process every 3
# steps (versions 0, 3, 6), so a resumed run must also come back on the right index version. It
# runs the QA variant's resume path and more, so CI runs it and the QA variant is in the slow tier.
PRETRAIN = ("--config.data.pretrain.objective=salient_span", "--config.optim.freeze=()",
            "--config.model.reencode_passages=true", "--config.index.refresh.mode=sync",
            "--config.index.refresh.schedule=0-100:3")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", [pytest.param("qa", marks=pytest.mark.slow), "pretrain"])
def test_sigkill_mid_run_resumes_to_identical_metrics(tmp_path, env, kind):
  steps = 8  # checkpoint_every=2, log_every=1 (the smoke config), async checkpointing
  extra = PRETRAIN if kind == "pretrain" else ()
  cmd_a = train_cmd(tmp_path / "a", f"--config.train.total_steps={steps}", *extra)
  cmd_b = train_cmd(tmp_path / "b", f"--config.train.total_steps={steps}", *extra)
  # Sequential, not side by side: on a busy machine the cached compilation is worth more.
  a = Train(cmd_a, env, tmp_path / "a")  # uninterrupted
  try:
    assert a.wait(300) == 0, a.logs()
  finally:
    a.kill()
  b = Train(cmd_b, env, tmp_path / "b0")
  restarts = []
  try:
    killed_after = wait_for_step(b, tmp_path / "b" / "metrics.jsonl", 5)
    b.signal_group(signal.SIGKILL)
    assert b.wait(60) == -signal.SIGKILL
    assert killed_after < steps, "the run finished before it could be killed"
    for attempt in range(1, 4):  # restart the same command until it finishes
      restarts.append(Train(cmd_b, env, tmp_path / f"b{attempt}"))
      if restarts[-1].wait(300) == 0:
        break
  finally:
    for run in (b, *restarts):
      run.kill()
  assert restarts[-1].proc.returncode == 0, "\n".join(r.logs() for r in restarts)
  assert len(restarts) == 1, "the first restart failed:\n" + restarts[0].logs()

  # The restart resumed from a checkpoint written before the kill. The step-4 save is async
  # and often still in flight when step 5 is logged; then the newest complete one is step 2.
  resumed = restarts[0].resumed_at()
  assert len(resumed) == 1 and resumed[0] in (2, 4, 6) and resumed[0] <= killed_after, (
      resumed, killed_after, restarts[0].logs())
  assert restarts[0].summary()["final_step"] == steps

  expected = read_metrics(tmp_path / "a" / "metrics.jsonl")
  got = read_metrics(tmp_path / "b" / "metrics.jsonl")
  assert [m["step"] for m in expected] == list(range(1, steps + 1)), expected
  assert [m["step"] for m in got] == list(range(1, steps + 1)), got
  compared = COMPARED + (("index_version", "index_staleness_steps") if kind == "pretrain" else ())
  if kind == "pretrain":
    assert {m["index_version"] for m in expected} == {0, 3, 6}, expected
    assert checkpoint_meta(tmp_path / "b", 8)["index_version"] == 6
  for m_a, m_b in zip(expected, got):
    for key in compared:
      # Bit-identical on CPU: the same data (a function of the step), dropout key
      # (fold_in(seed, step)) and compiled program, and the state restored exactly. (Also
      # checked by hand with default XLA flags, no compilation cache, the linear schedule.)
      assert m_b[key] == m_a[key], (m_a["step"], key, m_a[key], m_b[key])
  assert (tmp_path / "b" / "eval" / f"step_{steps}.json").is_file()


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, env):
  """Two 200-step runs side by side, each sent SIGTERM once it has logged step 3:
  `"off"` without periodic checkpoints (checkpoint_every=1000), `"on"` with a checkpoint every
  step (so the step where SIGTERM is noticed has just been checkpointed).
  Returns `(root, {name: Train})`; `root / name` is the workdir."""
  root = tmp_path_factory.mktemp("preempted")
  runs = {name: Train(train_cmd(root / name, "--config.train.total_steps=200",
                                f"--config.train.checkpoint_every={every}"), env, root / name)
          for name, every in (("off", 1000), ("on", 1))}
  try:
    for name, run in runs.items():
      wait_for_step(run, root / name / "metrics.jsonl", 3)
      run.signal_group(signal.SIGTERM)
    for run in runs.values():
      run.wait(120)
  finally:
    for run in runs.values():
      run.kill()
  return root, runs


@pytest.mark.timeout(600)
def test_sigterm_saves_a_preempted_checkpoint_and_exits_0(preempted, env):
  root, runs = preempted
  run, workdir = runs["off"], root / "off"
  assert run.proc.returncode == 0, run.logs()
  summary = run.summary()
  assert summary["stopped"] == "preempted", summary
  stop = summary["final_step"]
  assert 3 <= stop < 200
  # Without periodic checkpoints this one can only be the preemption save.
  meta = checkpoint_meta(workdir, stop)
  assert meta["preempted"] is True and meta["step"] == stop and meta["examples_seen"] == 8 * stop
  assert not (workdir / "eval").exists()  # preemption skips the final evaluation

  rerun = Train(train_cmd(workdir, f"--config.train.total_steps={stop + 2}",
                          "--config.train.checkpoint_every=1000"), env, root / "off-rerun")
  try:
    assert rerun.wait(300) == 0, rerun.logs()
  finally:
    rerun.kill()
  assert rerun.resumed_at() == [stop], rerun.logs()
  assert rerun.summary()["stopped"] == "done" and rerun.summary()["final_step"] == stop + 2
  metrics = read_metrics(workdir / "metrics.jsonl")
  assert [m["step"] for m in metrics] == list(range(1, stop + 3))
  assert "preempted" not in checkpoint_meta(workdir, stop + 2)
  assert (workdir / "eval" / f"step_{stop + 2}.json").is_file()


@pytest.mark.timeout(600)
def test_sigterm_on_a_checkpoint_step_exits_0(preempted):
  root, runs = preempted
  run = runs["on"]
  assert run.proc.returncode == 0, run.logs()
  stop = run.summary()["final_step"]
  assert checkpoint_meta(root / "on", stop)["preempted"] is True
