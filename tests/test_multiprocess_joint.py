"""A joint run as one local multi-process job (`launch/local.sh`): 2 trainer processes on
127.0.0.1 (gloo collectives, one workdir) and 1 asynchronous indexer worker train, refresh the
index, and after one trainer process is SIGKILLed and the job restarted, resume from the last
checkpoint and the index version it recorded, and finish.

The whole job is real processes: the launcher, two `ragjax train` processes and one `ragjax
indexer` worker (issue 13: "A two-process joint run ... resumes (test with real subprocesses)").
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 16  # the smoke config: log_every=1, checkpoint_every=2
JOINT = ("--config.train.tensorboard=false", "--config.optim.freeze=()",
         "--config.model.reencode_passages=true", "--config.optim.schedule=constant",
         "--config.index.refresh.mode=async", "--config.index.refresh.poll_seconds=0.2",
         "--config.index.refresh.idle_timeout=300", "--config.data.num_people=64",
         f"--config.train.total_steps={STEPS}")


def launch(workdir, log) -> subprocess.Popen:
  """`INDEXERS=1 launch/local.sh 2 2 ...` in its own session, output in `log`."""
  env = dict(os.environ, INDEXERS="1", KILL_GRACE="5", RAGJAX=f"{sys.executable} -m ragjax.cli")
  with open(log, "w") as out:
    return subprocess.Popen(["bash", str(ROOT / "launch" / "local.sh"), "2", "2", "--config",
                             "experiments/bios.py:smoke", "--workdir", str(workdir), *JOINT],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def read_metrics(workdir) -> list[dict]:
  path = workdir / "metrics.jsonl"
  out = []
  for line in (path.read_text().splitlines() if path.is_file() else ()):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:  # a line being written
      pass
  return out


def trainer_pid(workdir, process_id: int) -> int | None:
  """The pid of `ragjax train ... --workdir W ... --process-id i` (from /proc)."""
  for d in pathlib.Path("/proc").iterdir():
    if not d.name.isdigit():
      continue
    try:
      argv = (d / "cmdline").read_bytes().split(b"\0")
    except OSError:
      continue
    args = [a.decode(errors="replace") for a in argv]
    if ("train" in args and str(workdir) in args and "--process-id" in args
        and args[args.index("--process-id") + 1] == str(process_id)):
      return int(d.name)
  return None


def poll(condition, timeout: float, what: str, proc, log):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    if proc.poll() is not None:
      pytest.fail(f"the job exited ({proc.returncode}) before {what}:\n{log.read_text()[-6000:]}")
    time.sleep(1.0)
  pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()[-6000:]}")


# ~4 min on a 2-core AVX2 host (two launches, each compiling 2 trainers and an indexer). CI keeps
# the parts: 2-process training (tests/test_sharded_topk.py, tests/test_multihost_index.py), the
# launcher with indexer workers (tests/test_launch.py), a SIGKILLed joint run resuming its index
# version (tests/test_train_resume.py, pretrain).
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_joint_job_refreshes_and_resumes_after_a_trainer_is_killed(tmp_path):
  from ragjax.checkpoint import Checkpointer
  w = tmp_path / "w"
  first = launch(w, tmp_path / "first.log")
  try:
    # wait for a finished checkpoint trained with a refreshed index (a version the worker
    # published after step 0), then kill trainer process 1 mid-run
    reader = None
    def refreshed():
      nonlocal reader
      if reader is None and (w / "checkpoints").is_dir():
        reader = Checkpointer.reader(w / "checkpoints")
      try:
        step = reader.latest_step() if reader is not None else None
        return step is not None and step < STEPS - 4 and \
            (reader.metadata(step).get("index_version") or 0) > 0
      except (OSError, ValueError, KeyError):  # a step deleted (keep_checkpoints) while read
        return False
    poll(refreshed, 600, "checkpoint trained with a refreshed index", first,
         tmp_path / "first.log")
    pid = trainer_pid(w, 1)
    assert pid is not None, (tmp_path / "first.log").read_text()[-4000:]
    os.kill(pid, signal.SIGKILL)
    assert first.wait(120) != 0  # the launcher stops the peer and the worker, and fails
  finally:
    stop(first)
  killed_after = read_metrics(w)[-1]["step"]
  assert killed_after < STEPS
  first_log = (tmp_path / "first.log").read_text()
  assert re.search(r"process 1 exited with status (137|-9)", first_log) or \
      "process 1 failed" in first_log, first_log[-4000:]
  assert trainer_pid(w, 0) is None and trainer_pid(w, 1) is None  # nothing left running
  saved = reader.latest_step()
  assert saved is not None and saved <= killed_after
  recorded = reader.metadata(saved).get("index_version")
  assert recorded is not None and recorded > 0, reader.metadata(saved)

  second = launch(w, tmp_path / "second.log")  # the job restarted: the same command
  try:
    rc = second.wait(600)
  finally:
    stop(second)
  log = (tmp_path / "second.log").read_text()
  assert rc == 0, log[-6000:]
  resumed = {int(s) for s in re.findall(r"\[p\d\].*resumed at step (\d+)", log)}
  assert resumed == {saved}, (resumed, saved, log[-4000:])  # both processes, the same step
  # the resumed job installs the version its checkpoint was trained with first
  installs = [int(v) for v in re.findall(r"\[p0\].*index version (\d+) installed", log)]
  assert installs and installs[0] == recorded, (installs, recorded, log[-4000:])
  ms = read_metrics(w)
  assert [m["step"] for m in ms] == list(range(1, STEPS + 1))  # once each: process 0 writes
  assert all(m["index_version"] >= recorded for m in ms if m["step"] > saved)
  assert reader.latest_step() == STEPS
  assert (w / "eval" / f"step_{STEPS}.json").is_file()
  assert "indexer 0 exited with status 0" in log  # the worker saw the trainer's end marker
