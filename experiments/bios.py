"""RAG-Token on the built-in synthetic biographies (the README's main job).

2,000 invented people, one biography each, all in the index; questions about 80% of them train a
BERT2BERT generator warm-started from MiniLM (3 + 3 layers; cross-attention started from the
self-attention weights), and the other 20% (people never asked about in training) evaluate.
Retrieval: MiniLM bi-encoder, exact top-k on the device, K = 2, doc scores = 20 * cosine.

  ragjax train --config experiments/bios.py --workdir runs/bios
  measured (2-core CPU, 2026-11-21): 18 min 37 s; exact match 0.940, F1 0.945, answer recall@1/@2
  0.946/0.990 on 500 held-out questions (EM 0.028/0.192/0.548/0.748/0.942 at steps
  500/1000/1500/2000/2500).

The query encoder is frozen here unless `train_retriever` is given (it then trains from
`start_steps.query_encoder`, default 1,000). Why, measured (2-core AMD EPYC, AVX2, 2026-12-01;
200 held-out questions, eval every 100 steps, query lr 5e-5 x schedule):

  ragjax train --config experiments/bios.py:train_retriever,steps=800 \
    --config.optim.start_steps.query_encoder=S --config.optim.lr_multipliers.query_encoder=0.1667 \
    --config.train.eval_every=100 --config.data.max_eval_questions=200 \
    "--config.eval.recall_ks=(1,2,20)" --workdir runs/collapse_S      (S = 400; S = 0 with steps=400)

  S = 400 (the generator already reads: posterior entropy 0.298 < prior 0.365 at step 400):
    answer recall@1 0.925 (steps 100-400, frozen) -> 0.995 (500) -> 1.000 (600-800), EM 0.325 at 800
  S = 0 (the generator does not read yet: posterior entropy 0.41-0.58, equal to the prior's):
    answer recall@1 0.925 -> 0.12 / 0.04 / 0.03 / 0.04 at steps 100 / 200 / 300 / 400,
    recall@20 1.0 -> 0.42; one passage is the top-1 of 38-55% of the questions (frozen: 3%),
    and the best doc score falls from 13.2 to 9.3 (20 x cosine): the queries leave every passage
    for a few hubs.

The cause: before the generator reads, p(y|x,z) differs between passages only by what the
generator's answer prior likes about them, the same for every question, so the retrieval
gradient p(z|x) - p(z|x,y) (RAG eq. 3's derivative) moves all queries the same way. The hubs are
passages whose template resembles the questions: both hubs of the S = 0 run (20 of the 20
reported examples) open with "celebrates a birthday every year, having been born on", a template
19% of the corpus uses; the generator, printing "24 december 1990" for every question, likes
date-shaped passages. Adam (scale-free) makes this small, consistent gradient full-size steps
(update norms 0.01-0.05 per step against 0.0 for the frozen tower). Once the reader's posterior
carries question-specific evidence (S = 400), the same gradient improves retrieval. A late start
also hit a real optimiser bug, fixed in `ragjax.training.optim.delayed_start` (Adam counted the
frozen steps in its bias correction: first updates 2.5-5x the learning rate); it did not cause
the collapse (the S = 400 run above ran with the bug and improved).

Tried at S = 0 and refuted (2026-12-02, 2-core Intel Xeon, AVX-512; same command plus
`--config.model.retriever_loss=emdr2 --config.model.target_evidence=contrastive`, steps=400):
a question-specific reader target, the evidence log p(y_i|x_i,z) minus the next example's
answer read with the same passage, so that a passage the generator likes for every answer
cancels out. Answer recall@1 0.30 / 0.055 / 0.03 / 0.03 at steps 100-400 and one passage the
top-1 of 27% / 46% / 88% / 60% of the questions: the collapse is as fast. The contrast is close
to 0 (-0.06 to +0.02 nats per token over steps 20-260) and still pushes every query the same
way: answers of one kind (dates) share a template, so what the generator likes is the answer
type's passages, not the question's. No target computed from a reader that does not read carries
question-specific evidence.
A second candidate, also refuted (commit ae25eba, `--config.optim.retriever_gate_kl=0.05`,
marginal loss, steps=800 stopped at 200): scale the retriever's update by clip(KL(p(z|x,y) ||
p(z|x)) / 0.05, 0, 1), so it moves only as far as the reader's evidence goes. The KL is not
near 0 before the generator reads (0.018 / 0.035 / 0.065 / 0.075 nats at steps 20 / 60 / 100 /
140, gate 0.33-0.86): the answer prior moves the posterior as much as reading would, and recall@1
still fell, 0.405 / 0.14 at steps 100 / 200 (top-1 share 28% / 41%). The gate was removed. Not
yet tested: whether the drift is Adam's scale-free steps on a low signal-to-noise gradient (a
random-target control), and a per-passage running baseline of the reader's evidence (PMI
against what each passage gives every question).
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
