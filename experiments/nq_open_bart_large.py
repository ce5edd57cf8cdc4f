"""Paper-scale RAG (Lewis et al. 2020, §3/app. B): DPR BERT-base query and passage encoders +
BART-large generator, K=5, global batch 128, contexts of 300 tokens, bf16 compute, on a TPU slice.

This machine has no TPU and no such weights offline: the config is used to ahead-of-time compile
the train step for a TPU topology through libtpu's compile-only devices and to check that the
state and activations fit one chip's HBM:

  ragjax aot --config experiments/nq_open_bart_large.py --topology v5e:4x4
  measured (2026-11-21, 2-core CPU, libtpu 0.0.42.1): 624M parameters, mesh fsdp=16 over
  16 x v5e; 9,275 MiB required per chip of 16,384 MiB HBM (fits, 0.57); 6.25e12 FLOPs per chip
  per step; compiled in 1,303 s at nice 10 (bench/RESULTS.md, "AOT compile").

With the real checkpoints and NQ-open on disk the same file trains (set retriever.init to a DPR
directory with query_encoder/ and passage_encoder/, generator.init to "hf:<bart-large dir>",
data.source = "files" with the DPR corpus and NQ-open questions).
"""
from ragjax import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.base_config()
  c.data.source = "files"
  c.retriever.init = "random"
  c.retriever.random = dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072,
                            vocab_size=30522)              # DPR / bert-base-uncased
  c.generator.init = "random"
  c.generator.random = dict(arch="bart", d_model=1024, num_layers=12, num_heads=16,
                            ffn_size=4096, vocab_size=50265)  # bart-large
  c.model.k = 5
  c.model.loss = "rag_token"
  c.model.query_max_length = 32
  c.model.context_max_length = 320        # HF RAG max_combined_length 300, rounded up to 64x
  c.model.answer_max_length = 32
  c.model.compute_dtype = "bfloat16"
  c.optim.learning_rate = 3e-5            # RAG app. B
  c.train.global_batch = 128
  c.train.grad_accum_steps = 2
  c.train.total_steps = 20000
  c.mesh.axes = (("data", 1), ("fsdp", -1), ("tensor", 1))
  if arg.smoke:  # a tiny model on a 4-chip slice: seconds
    c.retriever.random = dict(hidden_size=64, num_layers=1, num_heads=4, ffn_size=128,
                              vocab_size=1024)
    c.generator.random = dict(arch="bart", d_model=64, num_layers=1, num_heads=4, ffn_size=128,
                              vocab_size=1024)
    c.model.context_max_length = 64
    c.model.answer_max_length = 8
    c.train.global_batch = 16
  return c
