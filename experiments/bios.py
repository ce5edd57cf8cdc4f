"""RAG-Token on the built-in synthetic biographies (the README's main job).

2,000 invented people, one biography each, all in the index; questions about 80% of them train
the query encoder and a BERT2BERT generator warm-started from MiniLM, and the other 20% (people
never asked about in training) evaluate. Retrieval: MiniLM bi-encoder, exact top-k on the device.

  ragjax train --config experiments/bios.py --workdir runs/bios
  measured: (filled in below after a real run)
"""
from ragjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, loss="rag_token", steps=0)
  c = config_lib.base_config()
  c.data.source = "bios"
  c.data.num_people = 2000
  c.data.max_eval_questions = 500
  c.model.loss = arg.loss
  c.model.k = 2
  c.model.query_max_length = 24
  c.model.context_max_length = 104   # biography <= 85 tokens + " // question [SEP]" <= 17
  c.model.answer_max_length = 8
  c.generator.init = "bert:minilm"
  c.generator.num_layers = 3
  c.retriever.passage_max_length = 128
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 50
  c.model.doc_score_scale = 20.0     # MiniLM's vectors are unit length: cosine / 0.05
  c.optim.lr_multipliers.query_encoder = 0.05
  c.optim.start_steps.query_encoder = 600   # once the generator reads (see ragjax/train.py)
  c.train.total_steps = arg.steps or 1000
  c.train.global_batch = 8
  c.train.log_every = 20
  c.train.checkpoint_every = 200
  c.train.eval_every = 500
  c.eval.batch_size = 50
  c.eval.recall_ks = (1, 2)
  if arg.smoke:  # seconds on one CPU core: tiny random towers, 60 people
    c.data.num_people = 60
    c.data.max_eval_questions = 16
    c.retriever.init = "random"
    c.generator.init = "random"
    c.model.k = 2
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
