"""A run's workdir: the resolved config, the shape-defining config of its checkpoints, and
`metrics.jsonl` + TensorBoard.

  workdir/
    config.json            the resolved config (what `ragjax eval` / `generate` / the indexer
                           rebuild from: `ragjax.config.load_workdir_config`)
    config.<step>.json     the config the steps before <step> were trained with, kept when a
                           resume at <step> changed it (`check_resumed_config`)
    checkpoints/<step>/    orbax: TrainState + JSON meta (`ragjax.checkpoint`)
    metrics.jsonl          one JSON object per logged step
    tb/                    TensorBoard event files (tensorboardX)
    eval/step_<N>.json     exact match, F1, answer recall@k (`ragjax.evaluation.evaluate`)
    index/                 passage embeddings, and the index versions of joint training
                           (`ragjax.joint.versions`)
"""
from __future__ import annotations

import json
import os
import pathlib

import logging

import ml_collections
from tensorboardX import SummaryWriter

from ragjax import config as config_lib
from ragjax.errors import ConfigError
from ragjax.fsutil import write_json_atomic

log = logging.getLogger(__name__)
# Keys a resumed run may change freely: they do not change what the steps compute.
RESUME_FREE_KEYS = ("train.total_steps", "train.progress_bar", "train.log_every",
                    "train.eval_every", "train.checkpoint_every", "train.tensorboard",
                    "train.allow_config_change", "eval.batch_size", "index.refresh.indexer_nice")


def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def save_config(cfg, workdir: pathlib.Path, spec: str | None, overrides) -> None:
  write_json_atomic(workdir / "config.json", {"spec": spec, "overrides": list(overrides or []),
                                              "config": config_to_json(cfg)})


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def check_resumed_config(cfg, workdir: pathlib.Path, step: int, write: bool) -> list[str]:
  """Compare the config of a run resumed at `step` with the one its workdir's `config.json`
  recorded. Differences are logged; any outside `RESUME_FREE_KEYS` (and `init.*`, read only at
  step 0) is refused unless `train.allow_config_change`; when allowed, the old config is kept as
  `config.<step>.json` (with `write`, process 0) before `save_config` overwrites it. Returns the
  differences as `"key: old -> new"`.

  Raises: ConfigError naming the changed keys and both values.
  """
  path = workdir / "config.json"
  if not path.is_file():
    return []
  before = json.loads(path.read_text())
  old, new = _flat(before.get("config", {})), _flat(config_to_json(cfg))
  defaults = _flat(config_to_json(config_lib.base_config()))  # a key added since W was written
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                and not (k not in old and k in defaults and new.get(k) == defaults[k]))
  changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff]
  refused = [c for k, c in zip(diff, changes) if k not in RESUME_FREE_KEYS
             and not k.startswith("init.")]
  if refused and not cfg.train.get("allow_config_change", False):
    raise ConfigError(f"{path}: resuming at step {step} with a changed config ("
                      f"{'; '.join(refused[:8])}); the steps so far used the old values. Use a "
                      "new --workdir, or --config.train.allow_config_change=true (the old config "
                      f"is then kept as config.{step}.json)")
  if changes:
    log.warning("resuming at step %d with config changes: %s", step, "; ".join(changes))
    if write and refused:
      write_json_atomic(workdir / f"config.{step}.json", before)
  return changes


class MetricsWriter:
  """`metrics.jsonl` + TensorBoard (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int, enabled: bool,
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if not enabled:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    if self.path.is_file():  # drop what the interrupted run logged after its last checkpoint
      kept = []
      for line in self.path.read_text().splitlines():
        try:  # a line cut short by a kill is dropped, not fatal
          if json.loads(line)["step"] <= resume_step:
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
          continue
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      os.replace(tmp, self.path)
    if tensorboard:
      self.tb = SummaryWriter(str(workdir / "tb"))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self.tb.add_scalar(f"train/{k}", v, record["step"])

  def close(self):
    if self.tb is not None:
      self.tb.close()
