"""Test set-up (before jax is imported): 8 virtual CPU devices, XLA:CPU's backend optimisation
level 0 (compiles ~1.5x faster; a test's time is mostly compilation), one persistent compilation
cache for the session and every process it starts (the smoke step compiled by one module is
reused by the next; the subprocess tests' programs by each other), offline HuggingFace."""
import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _JIT_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ragjax-test-jit-")
else:
  _JIT_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# a size limit turns on the cache's file lock: the xdist workers and the `ragjax` processes the
# tests start (which inherit this environment) share the one directory side by side
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
  if _JIT_CACHE is not None:
    shutil.rmtree(_JIT_CACHE, ignore_errors=True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
  """Tiny torch models on a loaded CPU: one thread is ~100x faster than contended threads."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture
def shared_data():
  """`../shared/data`, or skip the test when the real evaluation data is not beside the repo."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real evaluation data not found at {SHARED_DATA} (see README: Data)")
  return SHARED_DATA


TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(
    "the a an of in on at to is was who what where when which born city university studied "
    "works for paris london tokyo river mountain france city capital alice bob carol dave "
    "physics chemistry history music 1990 1991 march april , . ? ' s ##s ##ed ##ing".split()))


def write_tiny_bert(path, seed=0, hidden=32, layers=2, heads=4, intermediate=37, model="bert",
                    projection_dim=0, max_positions=64):
  """A random tiny HF BERT (or DPR encoder) checkpoint directory built offline by transformers."""
  import torch
  import transformers
  torch.manual_seed(seed)
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  common = dict(vocab_size=len(TINY_VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=intermediate,
                max_position_embeddings=max_positions, type_vocab_size=2)
  if model == "bert":
    net = transformers.BertModel(transformers.BertConfig(**common))
  elif model == "dpr_question":
    net = transformers.DPRQuestionEncoder(transformers.DPRConfig(projection_dim=projection_dim,
                                                                 **common))
  elif model == "dpr_context":
    net = transformers.DPRContextEncoder(transformers.DPRConfig(projection_dim=projection_dim,
                                                                **common))
  else:
    raise ValueError(model)
  net.eval()
  net.save_pretrained(path, safe_serialization=True)
  (path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
  return path, net


@pytest.fixture
def tiny_bert_dir(tmp_path):
  path, _ = write_tiny_bert(tmp_path / "tiny_bert")
  return path


def write_bytes(path, text, *, gz=False):
  """Write `text` (str as UTF-8, or bytes) to `path`, gzip-compressed when `gz`."""
  import gzip
  data = text.encode("utf-8") if isinstance(text, str) else text
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def check_error(err, path, line, field=None, *words):
  """A DataError names file and line (`path:line:`), the field, and what was expected."""
  msg = str(err)
  where = f"{path}:{line}:" if line is not None else f"{path}:"
  assert msg.startswith(where), msg
  assert err.line == line
  assert err.field == field
  if field is not None:
    assert f"field {field!r}" in msg
  for w in words:
    assert w in msg, (w, msg)
