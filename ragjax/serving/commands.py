"""The `ragjax export`, `ragjax serve` and `ragjax generate --bundle` commands (parsed in
`ragjax.cli`)."""
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


def export(args):
  import pathlib
  from ragjax.fsutil import check_writable
  from ragjax.serving import bundle
  check_writable(pathlib.Path(args.out).parent, f"--out {args.out}: its directory")
  if args.format == "hf":
    report = bundle.export_hf(args.workdir, args.out, args.step)
  else:
    manifest = bundle.export_bundle(args.workdir, args.out, args.step)
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

