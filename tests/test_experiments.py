"""Every experiment file builds and its smoke variant runs (train, or AOT compile for the
paper-scale one)."""
import json
import pathlib

import pytest

from ragjax import config as config_lib
from ragjax.cli import main

EXPERIMENTS = sorted(pathlib.Path("experiments").glob("*.py"))
ONE_DEVICE = ["--config.mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
              "--config.mesh.num_devices=1"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_configs_load_with_and_without_smoke(path):
  full, smoke = config_lib.load_config(str(path)), config_lib.load_config(f"{path}:smoke")
  assert "measured" in (path.read_text().split('"""')[1])  # the docstring reports a result
  assert full.train.total_steps > smoke.train.total_steps or full.to_dict() != smoke.to_dict()


@pytest.mark.slow  # ~70 s; the joint SQuAD smoke below covers the same data path in CI
def test_squad_open_smoke_trains_and_evaluates_on_held_out_articles(tmp_path, shared_data,
                                                                    capsys):
  squad = shared_data / "squad_v1.1" / "dev-v1.1.json.gz"
  rc = main(["train", "--config", f"experiments/squad_open.py:smoke,squad={squad}",
             "--workdir", str(tmp_path), *ONE_DEVICE])
  assert rc == 0, capsys.readouterr().err
  report = json.loads((tmp_path / "eval" / "step_2.json").read_text())
  assert report["num_questions"] == 8 and set(report["answer_recall"]) == {"1", "2"}
  from ragjax.data.splits import squad_article_split
  _, train, evals = squad_article_split(squad, 10, seed=0)
  train_articles = {q.gold_passage_ids[0].rsplit("-", 2)[1] for q in train}
  assert not train_articles & {q.gold_passage_ids[0].rsplit("-", 2)[1] for q in evals}
  assert len(train_articles) == 38


@pytest.mark.slow  # ~30 s; tests/test_aot.py compiles the step for TPU topologies in CI
def test_paper_scale_config_aot_compiles_for_a_tpu_slice_at_small_size(capsys, tmp_path):
  pytest.importorskip("libtpu", reason="libtpu (the 'test' extra) is needed for AOT compiles")
  out = tmp_path / "aot.json"
  rc = main(["aot", "--config", "experiments/nq_open_bart_large.py:smoke", "--topology",
             "v5e:2x2", "--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  report = json.loads(out.read_text())
  assert report["fits"] and 0 < report["required_bytes"] < report["hbm_bytes"] == 16 * 2**30
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report["collectives"].get("all-gather", 0) > 0  # fsdp gathers the sharded weights


@pytest.mark.slow  # ~65 s; tests/test_refresh.py's joint_run covers joint training with versions
def test_squad_open_joint_smoke_trains_both_encoders_with_index_versions(tmp_path, shared_data,
                                                                         capsys):
  squad = shared_data / "squad_v1.1" / "dev-v1.1.json.gz"
  rc = main(["train", "--config", f"experiments/squad_open_joint.py:smoke,squad={squad}",
             "--workdir", str(tmp_path), *ONE_DEVICE])
  assert rc == 0, capsys.readouterr().err
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["index_staleness_steps"] for r in records] == [0, 1]  # version 0, no indexer
  assert (tmp_path / "index" / "0" / "manifest.json").is_file()
  assert json.loads((tmp_path / "config.json").read_text())["config"]["optim"]["freeze"] == []


@pytest.mark.parametrize("row", ["closed_book", "frozen", "hybrid", "dpr", "query_ft", "joint",
                                 "pretrain", "finetune"])
def test_every_rag2_row_is_a_valid_config(row):
  extra = [f"row={row},in_batch=True", f"row={row},objective=adist"] if row in (
      "query_ft", "joint", "finetune") else []
  for arg in (f"row={row}", f"row={row},smoke", *extra):
    cfg = config_lib.load_config(f"experiments/bios_documents.py:{arg}")
    config_lib.validate(cfg, data=False)
  with pytest.raises(config_lib.ConfigError, match="row 'frozn'"):
    config_lib.load_config("experiments/bios_documents.py:row=frozn")
  with pytest.raises(config_lib.ConfigError, match="objective 'adistt'"):
    config_lib.load_config("experiments/bios_documents.py:row=query_ft,objective=adistt")
