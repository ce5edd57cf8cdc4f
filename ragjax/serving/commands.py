"""The `ragjax export`, `ragjax serve`, `ragjax evaluate` and `ragjax generate --bundle` commands
(parsed in `ragjax.cli`)."""
import json


def add_parsers(add, ks, setup_logging) -> None:
  """Register `export` and `serve` with `ragjax.cli`'s `add(name, fn, help)`; `ks` parses a
  comma-separated list of ints; `setup_logging()` runs before either command."""
  def logged(fn):
    return lambda args: (setup_logging(), fn(args))[1]
  p = add("export", logged(export), "export a checkpoint: a serving bundle (default) or "
          "HuggingFace directories (--format hf)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--format", choices=("bundle", "hf"), default="bundle")
  p.add_argument("--corpus", help="serve these passages instead of the run's (index hot-swap: "
                 "embedded by the checkpoint's passage encoder); bundle format only")

  p = add("evaluate", logged(evaluate), "run one benchmark of the evaluation suite on a "
          "workdir, bundle or server: OUT.json (metrics, config) + OUT.jsonl (per example); "
          "--report: a Markdown table of OUT.json files")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--workdir", help="a `ragjax train` workdir (its --step, default newest)")
  src.add_argument("--bundle", help="a serving bundle from `ragjax export`")
  src.add_argument("--server", help="a running `ragjax serve`, e.g. http://127.0.0.1:8000")
  p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir")
  p.add_argument("--task", help="nq_open, triviaqa, webquestions, curatedtrec, squad_open, "
                 "hotpotqa, truthfulqa_mc, halueval_qa, freshqa, financebench")
  p.add_argument("--data", help="the task's data file (default: its copy in ../shared/data, "
                 "or $RAGJAX_SHARED_DATA)")
  p.add_argument("--corpus", help="passages to retrieve from (default: the system's own; "
                 "financebench: its evidence pages)")
  p.add_argument("--max-examples", type=int, default=None, help="the first N examples")
  p.add_argument("--out", help="OUT.json (OUT.jsonl is written beside it)")
  p.add_argument("--batch-size", type=int, default=8, help="questions per compiled batch")
  p.add_argument("--recall-ks", type=ks, default=[1, 5, 20], help="answer recall@k depths")
  p.add_argument("--skip-invalid", action="store_true", help="skip (and count) bad records")
  p.add_argument("--report", nargs="+", metavar="OUT.json", help="print (and with --out write) "
                 "a Markdown table of these results")

  p = add("serve", logged(serve), "serve a bundle over HTTP (FastAPI + uvicorn; /v1/answer, "
          "/v1/retrieve, /v1/score, /v1/health, /metrics)")
  p.add_argument("bundle")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--follow", default=None, help="a training workdir: serve its newest "
                 "published index version")
  p.add_argument("--follow-seconds", type=float, default=2.0, help="poll interval of --follow")
  p.add_argument("--buckets", type=ks, default=[1, 2, 4, 8],
                 help="compiled batch sizes (default: 1,2,4,8)")
  p.add_argument("--max-wait-ms", type=float, default=5.0,
                 help="how long a batch waits for more requests")
  p.add_argument("--max-queue", type=int, default=256, help="queued requests before 429")
  p.add_argument("--decodings", default=None, type=lambda v: tuple(v.split(",")),
                 help="decodings a request may choose, each compiled for every bucket, e.g. "
                      "rag_token,rag_sequence_fast (default: the bundle's eval.decoding)")


def evaluate(args):
  import pathlib
  from ragjax.errors import UsageError
  from ragjax.fsutil import check_writable
  from ragjax.serving import suite
  if args.report:
    table = suite.report(args.report)
    if args.out:
      pathlib.Path(args.out).write_text(table)
    print(table, end="")
    return
  if not args.task or not args.out:
    raise UsageError("evaluate: --task and --out are required (or --report OUT.json ...)")
  check_writable(pathlib.Path(args.out).parent, f"--out {args.out}: its directory")
  loaded = suite.load_examples(args.task, args.data, max_examples=args.max_examples,
                               skip_invalid=args.skip_invalid)  # bad data fails before loading
  passages = suite.task_passages(args.task, args.data, args.corpus, args.skip_invalid)
  scorer = suite.open_scorer(workdir=args.workdir, bundle=args.bundle, server=args.server,
                             step=args.step, passages=passages, batch_size=args.batch_size,
                             max_retrieve_k=max(args.recall_ks))
  result, records = suite.run_loaded(loaded, scorer, args.recall_ks)
  suite.write_result(args.out, result, records)
  print(json.dumps({"out": str(args.out), "records": str(suite.records_path(args.out)),
                    "task": result["task"], "num_examples": result["num_examples"],
                    "metrics": result["metrics"]}))


def export(args):
  import pathlib
  from ragjax.errors import UsageError
  from ragjax.fsutil import check_writable
  from ragjax.serving import bundle
  check_writable(pathlib.Path(args.out).parent, f"--out {args.out}: its directory")
  if args.format == "hf":
    if args.corpus:
      raise UsageError("--corpus: only for --format bundle (HF directories hold no corpus)")
    report = bundle.export_hf(args.workdir, args.out, args.step)
  else:
    passages = None
    if args.corpus:
      from ragjax.data.corpus import read_passages
      passages = read_passages(args.corpus)
    manifest = bundle.export_bundle(args.workdir, args.out, args.step, passages)
    report = {k: manifest[k] for k in ("checkpoint_step", "index_version", "index_embedded_step",
                                       "index_kind", "num_passages")}
    report["files"] = len(manifest["files"])
  print(json.dumps({"out": str(args.out), **report}))


def serve(args):
  from ragjax.serving import server
  return server.serve(args.bundle, args.host, args.port, follow=args.follow,
                      buckets=args.buckets, max_wait_ms=args.max_wait_ms,
                      max_queue=args.max_queue, follow_every_s=args.follow_seconds,
                      decodings=args.decodings)


def generate(args):
  from ragjax.serving import bundle
  from ragjax.serving.engine import Engine
  engine = Engine(bundle.load_bundle(args.bundle), buckets=(1,))
  out = engine.answer([args.question])[0]
  if args.json:
    print(json.dumps({"question": args.question, "answer": out["answer"],
                      "step": engine.bundle.checkpoint_step,
                      "passages": [{"id": p["id"], "p": p.get("prior"), "title": p["title"],
                                    "text": p["text"]} for p in out["passages"]]}, indent=1))
    return
  print(f"answer: {out['answer']}")
  for p in out["passages"]:
    print(f"  p={p.get('prior', 0.0):.3f}  {p['id']}  {p['title']}: {p['text'][:200]}")

