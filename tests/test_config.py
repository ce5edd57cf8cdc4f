"""Experiment config files, arguments and command-line overrides."""
import ml_collections
import pytest

from ragjax import config as config_lib
from ragjax.config import apply_overrides, load_config, parse_arg
from ragjax.errors import ConfigError


def test_parse_arg_types_and_unknown_keys():
  a = parse_arg("smoke,loss=rag_token,k=3,lr=1e-4", smoke=False, loss="rag_sequence", k=5, lr=0.1)
  assert (a.smoke, a.loss, a.k, a.lr) == (True, "rag_token", 3, 1e-4)
  assert parse_arg(None, smoke=False).smoke is False
  with pytest.raises(ConfigError, match=r"'smok': unknown; known: \['smoke'\]"):
    parse_arg("smok", smoke=False)


def _cfg():
  c = ml_collections.ConfigDict()
  c.total_steps, c.lr, c.name, c.frozen = 10, 0.1, "x", True
  c.retriever = ml_collections.ConfigDict({"top_k": 5, "init": "minilm"})
  c.mesh = [("data", -1)]
  return c


def test_overrides_are_typed():
  c = apply_overrides(_cfg(), ["--config.total_steps=50", "--config.retriever.top_k=8",
                               "--config.lr=3e-4", "--config.frozen=false", "name=y",
                               "--config.mesh=[('data', 2), ('tensor', 4)]"])
  assert (c.total_steps, c.retriever.top_k, c.lr, c.frozen, c.name) == (50, 8, 3e-4, False, "y")
  assert c.mesh == [("data", 2), ("tensor", 4)]


def test_unknown_key_lists_valid_ones():
  with pytest.raises(ConfigError) as e:
    apply_overrides(_cfg(), ["--config.retriever.topk=3"])
  assert "unknown key 'topk' in retriever" in str(e.value) and "'top_k'" in str(e.value)
  with pytest.raises(ConfigError, match="expected an integer"):
    apply_overrides(_cfg(), ["--config.total_steps=ten"])
  with pytest.raises(ConfigError, match="expected --config.key=value"):
    apply_overrides(_cfg(), ["--config.total_steps"])


def test_load_config_file(tmp_path):
  f = tmp_path / "exp.py"
  f.write_text("import ml_collections\nfrom ragjax.config import parse_arg\n"
               "def get_config(arg=None):\n"
               "  a = parse_arg(arg, smoke=False)\n"
               "  return ml_collections.ConfigDict({'steps': 3 if a.smoke else 100})\n")
  assert load_config(f"{f}:smoke").steps == 3 and load_config(str(f)).steps == 100
  with pytest.raises(ConfigError, match="not found"):
    load_config(str(tmp_path / "missing.py"))
  (tmp_path / "bad.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="defines no get_config"):
    load_config(str(tmp_path / "bad.py"))


def _smoke(*overrides):
  cfg = load_config("experiments/bios.py:smoke")
  return apply_overrides(cfg, ["mesh.axes=(('data', 1), ('fsdp', 1), ('tensor', 1))",
                               "mesh.num_devices=1", *overrides])


@pytest.mark.parametrize("override, words", [
    ("model.loss=rag_tokn", "model.loss 'rag_tokn': expected one of"),
    ("eval.decoding=beam", "eval.decoding 'beam'"),
    ("index.kind=gpu", "index.kind 'gpu'"),
    ("optim.schedule=step", "optim.schedule 'step'"),
    ("optim.freeze=('quary_encoder',)", "optim.freeze: unknown tower(s) ['quary_encoder']"),
    ("model.rerank_candidates=2", "model.rerank_candidates=2: expected K=2 < it"),
    ("index.refresh.max_staleness_steps=-1", "max_staleness_steps must be >= 0"),
    ("generator.init=gpt:x", "generator.init"),
    ("retriever.init=/no/such/dir", "retriever.init"),
    ("data.bios_layout=pages", "data.bios_layout 'pages'"),
    ("model.retriever_loss=adist", "needs model.reader='fid'"),
    ("model.retriever_loss=pdsit", "model.retriever_loss 'pdsit'"),
    ("model.retriever_temperature=0.0", "model.retriever_temperature=0.0: expected a positive"),
])
def test_validate_names_the_key(override, words):
  import re
  from ragjax import config as config_lib
  with pytest.raises(ValueError, match=re.escape(words)):
    config_lib.validate(_smoke(override))


def test_every_retriever_loss_validate_accepts_is_one_its_reader_runs():
  """`model.retriever_loss` names: each reader's loss accepts exactly the ones validate lets
  through for it (adist: FiD only), and emdr2_token refuses the null baseline by key."""
  from ragjax import config as config_lib
  from ragjax.models.fid import FID_RETRIEVER_LOSSES
  from ragjax.models.rag import RAG_RETRIEVER_LOSSES
  assert set(FID_RETRIEVER_LOSSES) == set(config_lib.RETRIEVER_LOSSES)
  assert set(RAG_RETRIEVER_LOSSES) == set(config_lib.RETRIEVER_LOSSES) - {"adist"}
  config_lib.validate(_smoke("model.retriever_loss=emdr2_token"))
  with pytest.raises(ConfigError, match="model.retriever_null_baseline: emdr2_token"):
    config_lib.validate(_smoke("model.retriever_loss=emdr2_token",
                               "model.retriever_null_baseline=true"))


def test_validate_runs_before_any_data_is_read(monkeypatch):
  """A bad value stops `Run` in `validate`, before the data source or a tower is touched; a
  mesh-dependent one (eval batch over 8 data-parallel devices) likewise."""
  from ragjax.training import loop
  def never(*a, **k):
    raise AssertionError("data read before the config was checked")
  monkeypatch.setattr(loop, "build_system", never)
  with pytest.raises(ConfigError, match="model.loss"):
    loop.Run(_smoke("model.loss=rag_tokn"), "/nonexistent/workdir")
  cfg = apply_overrides(load_config("experiments/bios.py:smoke"), ["eval.batch_size=6"])
  with pytest.raises(ConfigError, match="eval.batch_size=6"):
    loop.Run(cfg, "/nonexistent/workdir")


def test_the_loss_names_validate_accepts_are_the_losses_that_exist():
  from ragjax import config as config_lib
  from ragjax.objectives import rag_losses
  for name in config_lib.LOSSES:
    assert callable(rag_losses.get_loss_fn(name))
  with pytest.raises(ValueError, match="unknown loss"):
    rag_losses.get_loss_fn("rag_tokn")


def test_a_spawned_indexer_never_competes_for_the_trainers_accelerators():
  """On an accelerator host an async trainer refuses to spawn its indexer unless told to pin it
  to the CPU, whose environment then hides every accelerator; on a CPU host it spawns."""
  from ragjax.config_checks import indexer_spawn_env
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  r = cfg.index.refresh
  r.mode = "async"
  config_lib.check_indexer_placement(r, "cpu")
  with pytest.raises(ConfigError, match=r"runs on the host's gpu devices .* "
                                        r"--config.index.refresh.indexer_device=cpu"):
    config_lib.check_indexer_placement(r, "gpu")
  r.spawn_indexer = False
  config_lib.check_indexer_placement(r, "tpu")  # workers started apart
  r.spawn_indexer, r.indexer_device = True, "cpu"
  config_lib.check_indexer_placement(r, "gpu")
  r.indexer_env = {"XLA_FLAGS": "--foo"}
  assert indexer_spawn_env(r) == {"XLA_FLAGS": "--foo", "JAX_PLATFORMS": "cpu",
                                  "CUDA_VISIBLE_DEVICES": "", "TPU_VISIBLE_CHIPS": ""}
  r.indexer_device = "gpu0"
  with pytest.raises(ConfigError, match="index.refresh.indexer_device 'gpu0'"):
    config_lib.check_indexer_placement(r, "gpu")
