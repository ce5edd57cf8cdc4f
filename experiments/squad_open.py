"""SQuAD-open, real data: the 2,067 paragraphs of SQuAD v1.1 dev in the index, the questions of
38 articles to train and of the other 10 (drawn by `data.split_seed`) to evaluate
(`ragjax.data.splits.squad_article_split`). MiniLM retriever (exact top-k on the device), a
BERT2BERT generator warm-started from MiniLM. `loss` picks the model:

  ragjax train --config experiments/squad_open.py:loss=rag_token    --workdir runs/squad_token
  ragjax train --config experiments/squad_open.py:loss=rag_sequence --workdir runs/squad_seq
  ragjax train --config experiments/squad_open.py:loss=top1         --workdir runs/squad_top1
  ragjax train --config experiments/squad_open.py:loss=closed_book  --workdir runs/squad_cb

measured (2-core CPU, shared, 2026-11-21; 500 held-out questions, 500 steps of batch 8):
  rag_token    EM 0.000, F1 0.004, answer recall@1/@5 0.676/0.894 (41.8 min wall, ~20 paused)
  top1         EM 0.000, F1 0.005, answer recall@1/@5 0.676/0.894 (12.0 min)
  closed_book  EM 0.000, F1 0.008 (4.1 min)
  rag_sequence EM 0.000, F1 0.003, answer recall@1/@5 0.676/0.894 (12.8 min, tuned allocator)
  rag_token, steps=2000: EM 0.002, F1 0.023, NLL 4.44 (40.7 min, shared)
No model learned to answer in 500 steps (generator NLL 9.9 -> 5.9 nats/token); on the
biographies the same generator needed ~1,000 steps to start reading. README "Results: training".
"""
import pathlib

from ragjax import config as config_lib

SQUAD = pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/squad_v1.1/dev-v1.1.json.gz"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, loss="rag_token", steps=0, squad=str(SQUAD),
                             train_retriever=False)
  c = config_lib.base_config()
  c.data.source = "squad_split"
  c.data.squad = arg.squad
  c.data.num_eval_articles = 10
  c.data.max_eval_questions = 500
  c.model.loss = arg.loss
  c.model.k = 3
  c.model.doc_score_scale = 20.0          # MiniLM vectors are unit length
  c.model.query_max_length = 32
  c.model.context_max_length = 192        # passage cut so " // question" always fits
  c.model.answer_max_length = 16
  c.retriever.passage_max_length = 256
  c.generator.init = "bert:minilm"
  c.generator.num_layers = 3
  c.generator.cross_attention_init = "self_attention"
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 50
  c.optim.lr_multipliers.query_encoder = 0.05
  if arg.train_retriever:   # query side only; see bios.py on why it starts late
    c.optim.start_steps.query_encoder = 250
  else:
    c.optim.freeze = ("passage_encoder", "query_encoder")
  c.train.total_steps = arg.steps or 500
  c.train.global_batch = 8
  c.train.log_every = 20
  c.train.checkpoint_every = 200
  c.train.eval_every = 0
  c.eval.batch_size = 50
  c.eval.recall_ks = (1, 3, 5)
  if arg.smoke:
    c.data.max_train_questions = 64
    c.data.max_eval_questions = 8
    c.retriever.init = "random"
    c.generator.init = "random"
    c.model.k = 2
    c.model.context_max_length = 64
    c.train.total_steps = arg.steps or 2
    c.train.log_every = 1
    c.train.progress_bar = False
    c.train.tensorboard = False
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 4
    c.eval.recall_ks = (1, 2)
    c.train.eval_every = 0
    c.optim.freeze = ("passage_encoder",)
  return c
