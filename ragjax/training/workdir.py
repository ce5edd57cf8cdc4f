"""A run's workdir: the resolved config, the shape-defining config of its checkpoints, and
`metrics.jsonl` + TensorBoard.

  workdir/
    config.json            the resolved config (what `ragjax eval` / `generate` / the indexer
                           rebuild from: `ragjax.config.load_workdir_config`)
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

import ml_collections
from tensorboardX import SummaryWriter

from ragjax.fsutil import write_json_atomic


def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json_best_effort())


def save_config(cfg, workdir: pathlib.Path, spec: str | None, overrides) -> None:
  write_json_atomic(workdir / "config.json", {"spec": spec, "overrides": list(overrides or []),
                                              "config": config_to_json(cfg)})


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
