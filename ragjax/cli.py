"""The `ragjax` command line: one entry point, one subcommand per job.

  ragjax make-bios --num-people 2000 --out data/bios
  ragjax store --corpus C --out data/tfds --name corpus     # array_record, streamed
  ragjax embed --corpus C --retriever minilm --out EMB
  ragjax index --kind scann --embeddings EMB --corpus C --out IDX
  ragjax retrieve "who founded ..." --index IDX --k 5
  ragjax eval-retrieval --corpus C --questions Q --retriever minilm --index exact --k 1,5,20 --out r.json
  ragjax train --config experiments/bios.py[:arg] --workdir runs/bios [--config.key=value ...]
  ragjax eval --workdir runs/bios                          # newest checkpoint: EM, F1, recall@k
  ragjax generate --workdir runs/bios "Where was Amara Costa born?"
  ragjax export --workdir runs/bios --out bundles/bios [--format hf]   # serving bundle / HF dirs
  ragjax serve bundles/bios --port 8000 [--follow runs/bios]          # HTTP: /v1/answer, ...
  ragjax evaluate --bundle bundles/bios --task truthfulqa_mc --out r.json  # the suite's tasks
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import traceback

from ragjax.config_checks import CONTEXT_MODES
from ragjax.errors import ConfigError, RagjaxError, UsageError
from ragjax.fsutil import check_writable
from ragjax.retrieval import commands as retrieval_commands  # imports its libraries on use
from ragjax.serving import commands as serving_commands


def _ks(text: str) -> list[int]:
  try:
    ks = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--k {text!r}: expected comma-separated integers, e.g. 1,5,20")
  if not ks or min(ks) < 1:
    raise argparse.ArgumentTypeError(f"--k {text!r}: expected positive integers")
  return ks


def cmd_store(args):
  from ragjax.data import tfds_store
  from ragjax.data.corpus import iter_passages
  from ragjax.data.qa import iter_questions
  if bool(args.corpus) == bool(args.questions):
    raise UsageError("ragjax store: give exactly one of --corpus FILE or --questions FILE")
  check_writable(args.out, "--out")
  if args.corpus:
    path = tfds_store.build_corpus_dataset(iter_passages(args.corpus), args.out, name=args.name,
                                           overwrite=args.overwrite)
  else:
    path = tfds_store.build_questions_dataset(iter_questions(args.questions), args.out,
                                              name=args.name, overwrite=args.overwrite)
  print(f"array_record dataset at {path}")


def _doc_options(items) -> dict:
  """`["restate_rate=1", "headings=true"]` -> `{"restate_rate": 1.0, "headings": True}`, typed
  as `--config.KEY=VALUE` overrides are, by `DocOptions`' defaults. Raises: UsageError naming a
  malformed item, an unknown key or a value of the wrong type."""
  import dataclasses
  from ragjax.config import _coerce
  from ragjax.data.synthetic_docs import DocOptions
  defaults = dataclasses.asdict(DocOptions())
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise UsageError(f"--option {item!r}: expected KEY=VALUE with KEY one of {sorted(defaults)}")
    try:
      out[key] = _coerce(defaults[key], value, f"data.bios_docs.{key}")
    except ConfigError as e:
      raise UsageError(f"--option {item!r}: {e}") from None
  return out


def cmd_make_bios(args):
  if args.layout == "documents":
    from ragjax.data.synthetic_docs import write_bio_documents as write
  else:
    from ragjax.data.synthetic import write_bios as write
  check_writable(args.out, "--out")
  if args.update_fraction and args.layout != "single":
    raise UsageError("--update-fraction: only the single layout has an updated world")
  options = _doc_options(args.option) if args.option else {}
  if options and args.layout != "documents":
    raise UsageError("--option: only the documents layout has generator options")
  try:
    paths = write(args.out, args.num_people, seed=args.seed, eval_fraction=args.eval_fraction,
                  **options)
  except ValueError as e:
    raise UsageError(f"make-bios: {e}") from e
  if args.update_fraction:
    from ragjax.data.synthetic_updates import write_updated_world
    paths.update(write_updated_world(args.out, args.num_people, args.seed, args.eval_fraction,
                                     args.update_fraction, args.update_seed))
  for name, path in paths.items():
    print(f"{name}: {path}")


def cmd_make_haystack(args):
  from ragjax.data.haystack import write_haystacks
  check_writable(args.out, "--out")
  try:
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"--sizes {args.sizes!r}: expected comma-separated token counts") from None
  from ragjax.models.hf_import import minilm_dir
  paths = write_haystacks(args.out, minilm_dir(verify=False) / "tokenizer.json", sizes,
                          num_people=args.num_people, seed=args.seed,
                          eval_fraction=args.eval_fraction, num_needles=args.num_needles)
  for name, path in paths.items():
    print(f"{name}: {path}")


def _setup_logging():
  import logging
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from ragjax import hostenv
  logging.info("host allocator: %s", hostenv.describe())


def _distributed(args):
  """`jax.distributed.initialize` from --coordinator/--num-processes/--process-id, or from the
  cluster environment (TPU VM, Slurm, ...) with --distributed."""
  import jax
  if args.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
  if args.coordinator:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def cmd_train(args):
  from ragjax import config as config_lib
  from ragjax.training.loop import train
  _setup_logging()
  cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.overrides)
  check_writable(args.workdir, "--workdir", subdirs=("checkpoints", "eval", "index"))
  _distributed(args)
  summary = train(cfg, args.workdir, spec=args.config, overrides=args.overrides)
  ev = summary["last_eval"]
  print(json.dumps({"final_step": summary["final_step"], "stopped": summary["stopped"],
                    **({k: ev[k] for k in ("exact_match", "f1", "answer_recall", "gold_recall")
                        if k in ev} if ev else {})}))


def cmd_indexer(args):
  """Serve index versions for a joint-training workdir (`ragjax.joint.indexer`)."""
  if args.nice:
    os.nice(args.nice)
  from ragjax.joint.indexer import Indexer, wait_for_run
  _setup_logging()
  if args.wait_for_trainer:
    wait_for_run(args.workdir, args.wait_for_trainer, args.poll_seconds)
  n = Indexer(args.workdir, args.shard, args.num_shards, poll_seconds=args.poll_seconds,
              idle_timeout=args.idle_timeout,
              launched_with_trainer=bool(args.wait_for_trainer)).run()
  print(json.dumps({"shard": args.shard, "published": n}))


def _restored_run(args):
  from ragjax import config as config_lib
  from ragjax.training.loop import Run
  _setup_logging()
  cfg = config_lib.apply_overrides(config_lib.load_workdir_config(args.workdir), args.overrides)
  _distributed(args)
  run = Run(cfg, args.workdir)
  state, meta = run.restore_latest()
  run.feeder.set_corpus(run.corpus_embeddings(state.params))
  return run, state, meta


def cmd_eval(args):
  check_writable(pathlib.Path(args.workdir) / "eval", "--workdir")
  run, state, meta = _restored_run(args)
  questions = (run.system.eval_questions if args.split == "eval"
               else run.system.train_questions)
  if args.max_questions:
    questions = questions[:args.max_questions]
  if not questions:
    raise UsageError(f"ragjax eval: the {args.split} split has no questions")
  # The training run's own eval/step_N.json stays; this writes step_N.<split>[.maxM].json.
  suffix = f".{args.split}" + (f".max{args.max_questions}" if args.max_questions else "")
  report = run.evaluate(state.params, meta["step"], questions, name_suffix=suffix)
  print(json.dumps({k: report[k] for k in ("step", "num_questions", "exact_match", "f1")
                    if k in report} | {"answer_recall": report.get("answer_recall")}))


def cmd_generate(args):
  if (args.workdir is None) == (args.bundle is None):
    raise UsageError("ragjax generate: give one of --workdir W or --bundle B")
  if args.bundle is not None:
    _setup_logging()
    return serving_commands.generate(args)
  import jax
  import numpy as np
  from ragjax.data.qa import Question
  from ragjax import sharding
  from ragjax.evaluation.evaluate import decode_batch, gather
  run, state, meta = _restored_run(args)
  feeder = run.feeder
  # The smallest global batch both the mesh's batch shards and the processes divide.
  size = math.lcm(sharding.batch_shards(run.mesh, run.rules), jax.process_count())
  q = Question("cli", args.question, ())
  batch = feeder.batch(state.params, [q] * (size // jax.process_count()))
  seqs, scores = decode_batch(feeder, state.params, batch, run.cfg.eval)
  answer = run.system.gen_tok.decode(seqs[0])
  rows = gather(batch["doc_ids"])[0]
  prior = np.exp(scores[0] - np.logaddexp.reduce(scores[0]))
  if args.json:
    print(json.dumps({"question": args.question, "answer": answer, "step": meta["step"],
                      "passages": [{"id": run.system.passages[r].id, "p": float(p),
                                    "title": run.system.passages[r].title,
                                    "text": run.system.passages[r].text}
                                   for r, p in zip(rows, prior) if r >= 0]}, indent=1))
    return
  print(f"answer: {answer}")
  for r, p in zip(rows, prior):
    if r >= 0:
      psg = run.system.passages[r]
      print(f"  p={p:.3f}  {psg.id}  {psg.title}: {psg.text[:200]}")


def cmd_aot(args):
  from ragjax import config as config_lib
  from ragjax.training import aot
  cfg = config_lib.apply_overrides(config_lib.load_config(args.config), args.overrides)
  report = aot.compile_for_topology(cfg, args.topology, chip=args.chip)
  print(aot.format_report(report))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  if not report["fits"]:
    print(f"does not fit: needs {report['required_bytes']} of {report['hbm_bytes']} bytes per "
          "device", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="ragjax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--debug", action="store_true",
                      help="print the traceback of an error (also RAGJAX_DEBUG=1)")
  parser.add_argument("--verbose", action="store_true",
                      help="keep third-party libraries' debug logging (also RAGJAX_VERBOSE=1)")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def add(name, fn, help_):
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(fn=fn)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the traceback of an error (also RAGJAX_DEBUG=1)")
    return p

  def corpus_args(p):
    p.add_argument("--split-words", type=int, default=0,
                   help="split documents into passages of this many words, title kept (DPR: 100)")
    p.add_argument("--context", choices=CONTEXT_MODES, default="none",
                   help="prefix each passage with context about its document before embedding "
                   "and indexing (contextual retrieval; default: %(default)s)")
    p.add_argument("--context-file", help="with --context file: JSON Lines {id, context}")

  def retriever_args(p, default="minilm"):
    p.add_argument("--retriever", default=default,
                   help="'minilm', or a HF BERT/DPR checkpoint directory (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per text")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size")

  p = add("make-bios", cmd_make_bios, "write the built-in synthetic biographies corpus")
  p.add_argument("--num-people", type=int, default=2000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-fraction", type=float, default=0.2)
  p.add_argument("--layout", choices=("single", "documents"), default="single",
                 help="single: one biography passage per person; documents: profile and news "
                 "documents in passages, names mostly in titles (default: %(default)s)")
  p.add_argument("--update-fraction", type=float, default=0.0,
                 help="also write an updated world (index hot-swap): this fraction of the "
                 "people changed employer or birth city (corpus_updated.jsonl, "
                 "changed_questions[_old].jsonl)")
  p.add_argument("--update-seed", type=int, default=0)
  p.add_argument("--option", action="append", metavar="KEY=VALUE",
                 help="a documents-layout generator option (ragjax.data.synthetic_docs."
                 "DocOptions, e.g. restate_rate=1.0, distractors=0); repeatable")
  p.add_argument("--out", required=True)

  p = add("make-haystack", cmd_make_haystack, "write Biographies needle-in-a-haystack corpora "
          "of several token sizes with the same needle questions (ragjax.data.haystack)")
  p.add_argument("--sizes", default="2000,8000,32000,128000,512000,2000000",
                 help="haystack sizes in MiniLM tokens, increasing (default: %(default)s)")
  p.add_argument("--num-needles", type=int, default=20,
                 help="needle people (5 questions each), the world's first held-out people")
  p.add_argument("--num-people", type=int, default=2000, help="the trained world's size")
  p.add_argument("--seed", type=int, default=0, help="the trained world's bios seed")
  p.add_argument("--eval-fraction", type=float, default=0.2)
  p.add_argument("--out", required=True)

  p = add("embed", retrieval_commands.embed, "embed a corpus into resumable shards with a manifest")
  p.add_argument("--corpus", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--shard-size", type=int, default=16384)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--skip-invalid", action="store_true", help="skip (and count) bad records")
  retriever_args(p)
  corpus_args(p)

  p = add("index", retrieval_commands.index, "build and atomically publish an exact, ScaNN or BM25 index")
  p.add_argument("--kind", choices=("exact", "scann", "bm25"), required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--embeddings", help="embedding directory from `ragjax embed`")
  p.add_argument("--corpus", help="corpus file (embedded here when --embeddings is absent)")
  p.add_argument("--param", action="append", help="index parameter key=value (repeatable)")
  retriever_args(p)
  corpus_args(p)

  p = add("retrieve", retrieval_commands.retrieve, "print the top-k passages for a question")
  p.add_argument("question")
  p.add_argument("--index", required=True)
  p.add_argument("--corpus", help="corpus file (default: the one the index was built from)")
  p.add_argument("--retriever", default=None, help="default: the index's encoder")
  p.add_argument("--max-length", type=int, default=None)
  p.add_argument("--k", type=int, default=5)
  p.add_argument("--json", action="store_true")

  p = add("eval-retrieval", retrieval_commands.eval_retrieval, "recall@k of a retriever on a question set")
  p.add_argument("--corpus", required=True)
  p.add_argument("--questions", required=True)
  p.add_argument("--index", choices=("exact", "scann"), default="exact",
                 help="MIPS index for dense retrievers (ignored for bm25)")
  p.add_argument("--k", type=_ks, default=[1, 5, 20])
  p.add_argument("--out", help="write the full JSON report here")
  p.add_argument("--limit-questions", type=int, default=None)
  p.add_argument("--embeddings", help="reuse passage embeddings from `ragjax embed` (checked "
                 "against the corpus ids and the retriever)")
  p.add_argument("--param", action="append", help="index parameter key=value (repeatable)")
  retriever_args(p)
  corpus_args(p)

  def distributed_args(p):
    p.add_argument("--coordinator", help="multi-process: coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from the cluster environment")
    p.add_argument("--cpu-collectives", choices=("gloo", "mpi"), default=None,
                   help="CPU cross-process collectives (tests, CPU clusters)")

  p = add("train", cmd_train, "train (or resume) a RAG model from a config file")
  p.add_argument("--config", required=True, help="experiments/FILE.py[:arg]")
  p.add_argument("--workdir", required=True)
  distributed_args(p)

  p = add("eval", cmd_eval, "evaluate the newest checkpoint of a workdir (EM, F1, recall@k)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", choices=("eval", "train"), default="eval")
  p.add_argument("--max-questions", type=int, default=0)
  distributed_args(p)

  p = add("generate", cmd_generate, "answer a question with a workdir's newest checkpoint or "
          "a serving bundle")
  p.add_argument("question")
  p.add_argument("--workdir", default=None)
  p.add_argument("--bundle", default=None, help="a bundle from `ragjax export`")
  p.add_argument("--json", action="store_true")
  distributed_args(p)

  p = add("indexer", cmd_indexer, "re-embed the corpus from a training run's newest "
          "checkpoints and publish index versions (joint training; stops at the end marker)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--shard", type=int, default=0, help="this worker's share of the corpus")
  p.add_argument("--num-shards", type=int, default=1, help="workers in all (worker 0 publishes)")
  p.add_argument("--poll-seconds", type=float, default=1.0)
  p.add_argument("--idle-timeout", type=float, default=0.0,
                 help="exit after this many seconds without work (0: wait for the end marker)")
  p.add_argument("--nice", type=int, default=0, help="lower this process's priority by N")
  p.add_argument("--wait-for-trainer", type=float, default=0.0, metavar="SECONDS",
                 help="launched beside the trainer (launch/): wait up to this long for the "
                 "workdir's config.json, and take an end marker already there as the previous "
                 "job's (0: the workdir must exist; any end marker stops this worker)")

  p = add("aot", cmd_aot, "ahead-of-time compile a config's train step for a TPU topology "
          "(libtpu compile-only devices) and report its memory per device")
  p.add_argument("--config", required=True)
  p.add_argument("--topology", required=True, help="e.g. v5e:4x4, v4:2x2x2, v5p:2x2x2")
  p.add_argument("--chip", default=None, help="libtpu chip config: megacore or default")
  p.add_argument("--out", help="write the JSON report here")

  serving_commands.add_parsers(add, _ks, _setup_logging)

  p = add("store", cmd_store, "write a corpus or question file to a TFDS array_record dataset "
          "(streams; read back by every command that takes --corpus)")
  p.add_argument("--corpus")
  p.add_argument("--questions")
  p.add_argument("--out", required=True, help="TFDS data_dir")
  p.add_argument("--name", default="corpus", help="dataset name (lower-case, digits, _)")
  p.add_argument("--overwrite", action="store_true")
  return parser


def main(argv=None):
  """Parse `argv`, run the subcommand and return its exit status: 0, or 2 on a `RagjaxError`
  (printed as one line, `error: <message>`; `--debug` or `RAGJAX_DEBUG=1` prints the traceback
  too)."""
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  args, rest = build_parser().parse_known_args(argv)
  if args.verbose:
    os.environ["RAGJAX_VERBOSE"] = "1"
  args.overrides = [r for r in rest if r.startswith("--config.")]
  unknown = [r for r in rest if not r.startswith("--config.")]
  if unknown or (args.overrides and args.command not in ("train", "eval", "generate", "aot")):
    build_parser().error(f"unrecognized arguments: {' '.join(unknown or args.overrides)}")
  try:
    rc = args.fn(args)
  except RagjaxError as e:
    if args.debug or os.environ.get("RAGJAX_DEBUG", "") not in ("", "0"):
      traceback.print_exc()
    print(f"ragjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return rc or 0


def cli():
  """The `ragjax` console entry point: `main` in a process re-executed once with the tuned
  allocator (`ragjax.hostenv`; `RAGJAX_MALLOC=system` opts out)."""
  from ragjax import hostenv
  hostenv.reexec_with_malloc_env()
  sys.exit(main())


if __name__ == "__main__":
  cli()
