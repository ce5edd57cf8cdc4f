"""Experiment config files, arguments and command-line overrides."""
import ml_collections
import pytest

from ragjax.config import ConfigError, apply_overrides, load_config, parse_arg


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
