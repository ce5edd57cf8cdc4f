"""The `ragjax embed`, `index`, `retrieve` and `eval-retrieval` commands (parsed in `ragjax.cli`).

Each checks its output path before any work, and refuses vectors that do not belong to the corpus
or encoder at hand (`embed.check_corpus`, `embed.check_encoder`) before encoding anything.
"""
from __future__ import annotations

import json
import pathlib
import time

from ragjax.errors import IndexFormatError, RagjaxError, UsageError
from ragjax.fsutil import check_writable


def _params(pairs: list[str]) -> dict:
  out = {}
  for pair in pairs or []:
    key, sep, value = pair.partition("=")
    if not sep:
      raise UsageError(f"--param {pair!r}: expected key=value")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def _load_corpus(path, skip_invalid: bool = False, split_words: int = 0, stats=None,
                 context: str = "none", context_file=None):
  """A corpus file (any reader format), or a TFDS array_record directory from `ragjax store`
  (random access, streamed from disk). `split_words > 0` splits passages into DPR-style
  ~N-word passages, title kept; `context` prefixes each with its document's context
  (`ragjax.data.contextualize`)."""
  from ragjax.data import corpus
  from ragjax.data.contextualize import contextualize
  if pathlib.Path(path).is_dir():
    from ragjax.data.tfds_store import CorpusSource
    if split_words or context != "none":
      raise UsageError(f"{path}: --split-words and --context apply to corpus files, not to a "
                       "stored dataset")
    return CorpusSource(path)
  passages = corpus.read_passages(path, skip_invalid=skip_invalid, stats=stats)
  if split_words:
    passages = [q for p in passages for q in corpus.split_document(p.id, p.title, p.text,
                                                                   split_words)]
  try:
    return contextualize(passages, context, context_file)
  except RagjaxError:
    raise
  except ValueError as e:  # no --context-file for --context file
    raise UsageError(f"--context {context}: {e}") from None


def _corpus_kw(args) -> dict:
  return {"split_words": args.split_words, "context": getattr(args, "context", "none"),
          "context_file": getattr(args, "context_file", None)}


def _load_retriever(spec: str, max_length: int | None):
  from ragjax.models.retriever import load_retriever
  return load_retriever(spec, max_length=max_length)


def embed(args):
  from ragjax.retrieval.embed import embed_corpus
  check_writable(args.out, "--out")
  stats = {}
  passages = _load_corpus(args.corpus, args.skip_invalid, stats=stats, **_corpus_kw(args))
  retriever = _load_retriever(args.retriever, args.max_length)
  manifest = embed_corpus(retriever, passages, args.out, shard_size=args.shard_size,
                          batch_size=args.batch_size, dtype=args.dtype, input_stats=stats)
  print(f"embedded {manifest['count']} passages x {manifest['dim']} into {args.out} "
        f"({len(manifest['shards'])} shards, {manifest['embed_seconds']} s); "
        f"{manifest['truncated']} truncated to {retriever.identity['max_length']} tokens"
        + (f"; {stats['skipped']} invalid records skipped" if args.skip_invalid else ""))
  for reason in stats.get("errors", []) if stats.get("skipped") else []:
    print(f"  skipped: {reason}")


def index(args):
  from ragjax.retrieval.embed import load_embeddings
  from ragjax.retrieval.evaluate import build_index
  check_writable(pathlib.Path(args.out).parent, f"--out {args.out}: its directory")
  params = _params(args.param)
  retriever = embeddings = None
  passages = _load_corpus(args.corpus, **_corpus_kw(args)) if args.corpus else None
  if args.embeddings:
    embeddings, ids, emb_manifest = load_embeddings(args.embeddings, passages, args.corpus)
    encoder = emb_manifest["encoder"]
    if passages is None:  # dense indexes need only the ids; retrieve reads texts via --corpus
      from ragjax.data.corpus import Passage
      passages = [Passage(i, "", "") for i in ids]
  elif args.kind != "bm25":
    if passages is None:
      raise UsageError("ragjax index: give --embeddings DIR, or --corpus FILE with --retriever")
    retriever = _load_retriever(args.retriever, args.max_length)
  elif passages is None:
    raise UsageError("ragjax index --kind bm25: needs --corpus FILE")
  index, timings = build_index(args.kind, passages, retriever, embeddings=embeddings,
                               batch_size=args.batch_size, **params)
  if args.embeddings:
    index.manifest["encoder"] = encoder
  if args.corpus:
    from ragjax.retrieval.embed import corpus_fingerprint
    index.manifest["corpus_sha256"] = corpus_fingerprint(passages)
    index.manifest["corpus"] = str(pathlib.Path(args.corpus).resolve())
    index.manifest["split_words"] = args.split_words
    index.manifest["context"] = args.context
    index.manifest["context_file"] = (str(pathlib.Path(args.context_file).resolve())
                                      if args.context_file else None)
  index.save(args.out)
  print(f"{args.kind} index of {index.count} passages published at {args.out} ({timings})")


def retrieve(args):
  from ragjax.retrieval.registry import load_index
  index = load_index(args.index)
  corpus = args.corpus or index.manifest.get("corpus")
  if not corpus:
    raise UsageError(f"{args.index}: the index does not name its corpus; pass --corpus FILE")
  from ragjax.retrieval.embed import check_encoder, corpus_fingerprint
  listed = _load_corpus(corpus, split_words=index.manifest.get("split_words", 0),
                        context=index.manifest.get("context", "none"),
                        context_file=index.manifest.get("context_file"))
  built_on = index.manifest.get("corpus_sha256")
  if built_on and built_on != corpus_fingerprint(listed):
    raise IndexFormatError(f"{args.index}: stale: {corpus} changed since the index was built "
                           "(corpus sha256 differs); rebuild it with `ragjax index`")
  passages = {p.id: p for p in listed}
  if index.kind == "bm25":
    queries = [args.question]
  else:
    built_with = index.manifest.get("encoder")
    spec = args.retriever or (built_with or {}).get("name")
    if not spec:
      raise UsageError(f"{args.index}: the index does not name its encoder; pass --retriever")
    retriever = _load_retriever(spec, args.max_length)
    check_encoder(args.index, built_with, retriever)
    queries = retriever.encode_queries([args.question])
  scores, ids = index.search(queries, args.k)
  results = [{"rank": r + 1, "score": float(s), "id": str(i), "title": passages[i].title,
              "text": passages[i].text} for r, (s, i) in enumerate(zip(scores[0], ids[0]))]
  if args.json:
    print(json.dumps(results, indent=1, ensure_ascii=False))
    return
  for r in results:
    print(f"{r['rank']:>3}  {r['score']:8.4f}  {r['id']}  {r['title']}")
    print(f"     {r['text'][:300]}")


def eval_retrieval(args):
  from ragjax.data.qa import read_questions
  from ragjax.retrieval.evaluate import evaluate_retrieval
  if args.out:
    check_writable(pathlib.Path(args.out).parent, f"--out {args.out}: its directory")
  passages = _load_corpus(args.corpus, **_corpus_kw(args))
  questions = read_questions(args.questions)
  if args.limit_questions:
    questions = questions[:args.limit_questions]
  if args.retriever == "bm25":
    kind, retriever = "bm25", None
  else:
    kind, retriever = args.index, _load_retriever(args.retriever, args.max_length)
  embeddings = None
  if args.embeddings and kind != "bm25":
    from ragjax.retrieval.embed import load_embeddings
    embeddings, ids, manifest = load_embeddings(args.embeddings, passages, args.corpus)
    if manifest["encoder"] != retriever.identity:
      raise UsageError(f"{args.embeddings}: embedded with {manifest['encoder']}, not with "
                       f"{retriever.identity}")
  t0 = time.perf_counter()
  report = evaluate_retrieval(passages, questions, retriever, kind, args.k,
                              batch_size=args.batch_size, embeddings=embeddings,
                              **_params(args.param))
  report["timings"]["total_seconds"] = round(time.perf_counter() - t0, 3)
  report["corpus"], report["questions"] = str(args.corpus), str(args.questions)
  if args.out:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
  print(json.dumps({"num_questions": report["num_questions"], "index": report["index"],
                    "recall": report["recall"]}, indent=1))
