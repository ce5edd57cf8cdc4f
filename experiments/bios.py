"""RAG-Token on the built-in synthetic biographies (the README's main job).

2,000 invented people, one biography each, all in the index; questions about 80% of them train a
BERT2BERT generator warm-started from MiniLM (3 + 3 layers; cross-attention started from the
self-attention weights), and the other 20% (people never asked about in training) evaluate.
Retrieval: MiniLM bi-encoder, exact top-k on the device, K = 2, doc scores = 20 * cosine.

  ragjax train --config experiments/bios.py --workdir runs/bios
  measured (2-core CPU, 2026-11-21): 18 min 37 s; exact match 0.940, F1 0.945, answer recall@1/@2
  0.946/0.990 on 500 held-out questions (EM 0.028/0.192/0.548/0.748/0.942 at steps
  500/1000/1500/2000/2500).

The query encoder is frozen here unless `train_retriever` is given: while the generator does not
yet read its passages, the retrieval gradient p(z|x) - p(z|x,y) only carries the generator's
incidental preferences, and Adam (which normalises gradient scale away) turns them into full-size
steps: in our runs answer recall@1 fell from 0.90 to 0.01 within 200 steps of query-encoder
training (lr 5e-5) started at step 400 (runs/bios_z, 2026-11-21). `train_retriever` starts it at
`start_steps.query_encoder`.
"""
from ragjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, loss="rag_token", steps=0, train_retriever=False)
  c = config_lib.base_config()
  c.data.source = "bios"
  c.data.num_people = 2000
  c.data.max_eval_questions = 500
  c.model.loss = arg.loss
  c.model.k = 2
  c.model.doc_score_scale = 20.0     # MiniLM's vectors are unit length: cosine / 0.05
  c.model.query_max_length = 24
  c.model.context_max_length = 104   # biography <= 85 tokens + " // question [SEP]" <= 17
  c.model.answer_max_length = 8
  c.generator.init = "bert:minilm"
  c.generator.num_layers = 3
  c.generator.cross_attention_init = "self_attention"
  c.retriever.passage_max_length = 128
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 50
  c.optim.lr_multipliers.query_encoder = 0.05
  if arg.train_retriever:
    c.optim.start_steps.query_encoder = 1000
  else:
    c.optim.freeze = ("passage_encoder", "query_encoder")
  c.train.total_steps = arg.steps or 2800
  c.train.global_batch = 8
  c.train.log_every = 20
  c.train.checkpoint_every = 250
  c.train.eval_every = 500
  c.eval.batch_size = 50
  c.eval.recall_ks = (1, 2)
  if arg.smoke:  # seconds on one CPU core: tiny random towers, 60 people
    c.data.num_people = 60
    c.data.max_eval_questions = 16
    c.retriever.init = "random"
    c.generator.init = "random"
    c.optim.freeze = ("passage_encoder",)
    c.model.k = 2
    c.model.doc_score_scale = 1.0
    c.model.context_max_length = 64
    c.train.total_steps = arg.steps or 4
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    c.train.progress_bar = False
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 6
    c.optim.warmup_steps = 1
    c.optim.learning_rate = 1e-3
  return c
