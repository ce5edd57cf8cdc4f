"""SQuAD-open with the retriever trained: the same split, models and settings as
`experiments/squad_open.py` (RAG-Token), three ways (`variant`):

  frozen  query and passage encoders fixed (RAG §2.4); identical to squad_open.py:loss=rag_token
  query   query-side-only training (the query encoder starts at step 250, lr x 0.05)
  joint   "RAG 2.0": query AND passage encoders train from step 250 (lr x 0.05); the K retrieved
          passages are re-encoded inside the step by the live passage encoder (REALM §3.4), and
          an asynchronous indexer process (`ragjax indexer`, started by the trainer, nice 10)
          re-embeds the 2,067 paragraphs from the newest checkpoint and publishes index versions
          while training goes on (as fast as it can; staleness bounded at 200 steps)
  pretrain  joint salient-span pretraining over the 2,067 paragraphs (REALM §3.4; the query is
          the article title + the sentence with its span masked, `data.pretrain.query`; its
          own paragraph excluded from retrieval), both encoders training from step 0 with the
          asynchronous indexer; fine-tune after it with variant=query or joint and
          `--config.init.from_workdir=<its workdir>`, against the same variant from scratch.
          Not run yet. Probe (`python bench/pretrain_probe.py --config
          experiments/squad_open_joint.py:variant=pretrain`, first 400 queries, frozen MiniLM,
          2026-12-07): the masked answer in the top-1 / 2 / 4 / 50 for 16.8 / 23.5 / 31.8 /
          56.5%; 23.5% of the masks lie past the 32-wordpiece query window (long sentences)

  ragjax train --config experiments/squad_open.py:loss=rag_token  --workdir runs/squad_rag_token
  ragjax train --config experiments/squad_open_joint.py:variant=query --workdir runs/sqj_query
  ragjax train --config experiments/squad_open_joint.py:variant=joint --workdir runs/sqj_joint
  ragjax train --config experiments/squad_open_joint.py:variant=pretrain,steps=100 --workdir runs/sqj_pt
  ragjax train --config experiments/squad_open_joint.py:variant=query \
    --config.init.from_workdir=runs/sqj_pt --workdir runs/sqj_pt_query

measured (2-core CPU, shared, 2026-11-21; 500 held-out questions, EM / answer recall@5):
  frozen 0.000 / 0.894 (41.8 min wall, ~20 paused), query 0.000 / 0.898 (15.2 min), joint
  0.000 / 0.870 (73.3 min wall, 12.9 paused; 14 index versions, staleness median 39 steps after
  step 250). No generator learned to answer in 500 steps, so the retrievers trained on noise:
  README "Joint retriever training".
"""
import importlib.util
import pathlib

from ragjax import config as config_lib

_spec = importlib.util.spec_from_file_location(
    "ragjax_experiment_squad_open", pathlib.Path(__file__).with_name("squad_open.py"))
squad_open = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(squad_open)
VARIANTS = ("frozen", "query", "joint", "pretrain")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, variant="joint", steps=0,
                             squad=str(squad_open.SQUAD))
  if arg.variant not in VARIANTS:
    raise config_lib.ConfigError(f"variant {arg.variant!r}: expected one of {VARIANTS}")
  base = f"smoke={arg.smoke},steps={arg.steps},squad={arg.squad!r}"
  if arg.variant == "frozen":
    return squad_open.get_config(base)
  c = squad_open.get_config(base + ",train_retriever=True")
  if arg.variant in ("joint", "pretrain"):
    c.optim.freeze = ()
    c.optim.lr_multipliers.passage_encoder = c.optim.lr_multipliers.query_encoder
    c.optim.start_steps.passage_encoder = c.optim.start_steps.query_encoder
    c.model.reencode_passages = True
    c.index.refresh.mode = "async"
    c.index.refresh.schedule = "asap"
    c.index.refresh.max_staleness_steps = 200
    c.index.refresh.indexer_nice = 10
    c.train.keep_checkpoints = 2
  if arg.variant == "pretrain":
    c.data.pretrain.objective = "salient_span"
    c.data.pretrain.exclude = "passage"
    c.data.pretrain.query = "title_sentence"
    c.optim.start_steps.passage_encoder = c.optim.start_steps.query_encoder = 0
    c.train.checkpoint_every = max(1, c.train.total_steps // 4)
  if arg.variant in ("joint", "pretrain") and arg.smoke:
    c.index.refresh.max_staleness_steps = 0
    c.index.refresh.spawn_indexer = False
    c.optim.start_steps.passage_encoder = 0
    c.optim.start_steps.query_encoder = 0
  return c
