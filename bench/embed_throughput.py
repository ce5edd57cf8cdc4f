"""Corpus embedding throughput: our jitted Flax MiniLM vs sentence-transformers (PyTorch), CPU.

Both encode the same passages (the 2,067 SQuAD v1.1 dev paragraphs when `../shared/data` is beside
the repo, else synthetic bios) as the same strings (`title [SEP] text`), at the same max length
(256) and batch size (64). Each system first makes one full untimed pass (our jit compiles once per
length bucket there; its extra cost over a timed pass is reported as compile overhead), then
`--reps` timed passes are interleaved (ours, theirs, ours, ...) and the medians compared.

  python bench/embed_throughput.py                # writes its section of bench/RESULTS.md
  python bench/embed_throughput.py --limit 256 --reps 1 --no-write   # a quick try
"""
from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

import _results  # noqa: E402
from ragjax.data import synthetic  # noqa: E402
from ragjax.data.corpus import read_passages  # noqa: E402
from ragjax.data.tokenize import bucket_length  # noqa: E402
from ragjax.models import hf_import  # noqa: E402
from ragjax.models.retriever import load_retriever  # noqa: E402

SQUAD = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "squad_v1.1"
         / "squad1.1_dev_corpus.jsonl.gz")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--corpus", default=None,
                  help=f"passage file for read_passages (default: {SQUAD} if it exists, else "
                       "synthetic bios)")
  ap.add_argument("--num-bios", type=int, default=2000,
                  help="synthetic people when no corpus file is used")
  ap.add_argument("--limit", type=int, default=None, help="use only the first N passages")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--max-length", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5, help="timed passes per system (interleaved)")
  ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
  return ap.parse_args(argv)


def load_passages(args):
  """(passages, description)."""
  path = args.corpus or (str(SQUAD) if SQUAD.is_file() else None)
  if path:
    passages, what = read_passages(path), f"`{path}`"
  else:
    passages = synthetic.make_bios(args.num_bios, seed=0).passages
    what = f"synthetic bios (make_bios({args.num_bios}, seed=0))"
  if args.limit:
    passages = passages[:args.limit]
  return passages, f"{len(passages):,} passages from {what}"


def padding_stats(lengths_n: np.ndarray, tokenizer, batch_size: int, max_length: int) -> dict:
  """Tokens per pass: real ones, ours (length-sorted batches padded to a bucket, last batch padded
  to `batch_size` rows) and sentence-transformers' (length-sorted, padded to each batch's longest).
  """
  lens = np.sort(np.minimum(lengths_n, max_length))[::-1]
  ours = theirs = 0
  buckets = set()
  for s in range(0, len(lens), batch_size):
    b = lens[s:s + batch_size]
    length = bucket_length(int(b[0]), tokenizer.buckets, max_length)
    buckets.add(length)
    ours += length * batch_size
    theirs += int(b[0]) * len(b)
  return {"real": int(lens.sum()), "ours": ours, "theirs": theirs, "buckets": sorted(buckets)}


def main(argv=None):
  args = parse_args(argv)
  passages, corpus_desc = load_passages(args)
  titles, texts = [p.title for p in passages], [p.text for p in passages]
  n, bs = len(passages), args.batch_size

  retriever = load_retriever("minilm", max_length=args.max_length)
  tok = retriever.tokenizer
  joined = [tok.passage_text(t, x) for t, x in zip(titles, texts)]
  st = SentenceTransformer(str(hf_import.minilm_dir()), device="cpu")
  st.max_seq_length = args.max_length

  ours = lambda: retriever.encode_passages(titles, texts, batch_size=bs)
  theirs = lambda: st.encode(joined, batch_size=bs, convert_to_numpy=True,
                             show_progress_bar=False)
  print(f"{corpus_desc}; batch {bs}, max length {args.max_length}; torch threads "
        f"{torch.get_num_threads()}, jax devices {jax.devices()}", flush=True)

  first = {}  # the untimed (compiling) passes, whose vectors are compared
  emb_ours, first["ours"] = _results.timed(ours)
  emb_theirs, first["theirs"] = _results.timed(theirs)
  diff = float(np.abs(emb_ours - emb_theirs).max())
  cos = float(np.min(np.sum(emb_ours * emb_theirs, axis=1)
                     / (np.linalg.norm(emb_ours, axis=1) * np.linalg.norm(emb_theirs, axis=1))))
  print(f"first pass s: ours {first['ours']:.1f} theirs {first['theirs']:.1f}; "
        f"max |ours - theirs| {diff:.2e}, min cosine {cos:.6f}", flush=True)

  secs = _results.time_interleaved({"ours": ours, "theirs": theirs}, args.reps)
  med = {k: _results.median(v) for k, v in secs.items()}
  rate = {k: n / v for k, v in med.items()}
  ratio = rate["ours"] / rate["theirs"]
  paired = _results.paired_ratio(secs, "ours", "theirs")
  pads = padding_stats(tok.lengths(joined), tok, bs, args.max_length)
  for k in ("ours", "theirs"):
    print(f"{k}: passes s {[round(s, 2) for s in secs[k]]}, median {med[k]:.2f} s, "
          f"{rate[k]:.1f} passages/s", flush=True)
  print(f"ratio ours/theirs {ratio:.3f} (median of per-round ratios {paired:.3f}); tokens real "
        f"{pads['real']:,}, ours padded {pads['ours']:,}, theirs padded {pads['theirs']:,}",
        flush=True)

  fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
  rows = [
      ["ragjax Flax MiniLM (`Retriever.encode_passages`, jit)", f"{rate['ours']:.1f}",
       f"{med['ours']:.2f}", fmt(secs["ours"]), f"{first['ours']:.2f}",
       f"{first['ours'] - med['ours']:.2f}", f"{pads['ours']:,}"],
      ["sentence-transformers (PyTorch)", f"{rate['theirs']:.1f}", f"{med['theirs']:.2f}",
       fmt(secs["theirs"]), f"{first['theirs']:.2f}",
       f"{first['theirs'] - med['theirs']:.2f}", f"{pads['theirs']:,}"],
  ]
  body = "\n\n".join([
      _results.table(["system", "passages/s (median)", "median s/pass", "timed passes s",
                      "first pass s", "first - median s (compile, warm-up)",
                      "tokens/pass incl. padding"], rows),
      f"**ratio ours/theirs (passages/s): {ratio:.3f}** (ratio of the medians; median of the "
      f"per-round ratios: {paired:.3f})",
      f"Agreement: max |ours - theirs| = {diff:.2e} over {n:,} x {emb_ours.shape[1]} "
      f"(min cosine {cos:.6f}). Real tokens per pass {pads['real']:,}; our padded lengths used "
      f"{pads['buckets']} ({len(pads['buckets'])} compiles at batch {bs}).",
  ])
  setup = {
      "versions": _results.versions("jax", "jaxlib", "flax", "torch", "sentence-transformers",
                                    "transformers", "tokenizers"),
      "threads": f"torch.get_num_threads() {torch.get_num_threads()}, interop "
                 f"{torch.get_num_interop_threads()}; jax {jax.default_backend()} devices "
                 f"{len(jax.devices())}; {_results.thread_env()}",
      "workload": f"{corpus_desc}; batch {bs}, max length {args.max_length}, text `title [SEP] "
                  f"text`; {args.reps} timed passes each, interleaved, after one untimed pass",
  }
  if not args.no_write:
    text = _results.section("embed_throughput", "embed_throughput.py: corpus embedding, Flax "
                            "MiniLM vs sentence-transformers", setup, body)
    print(f"wrote {_results.write_section('embed_throughput', text)}")


if __name__ == "__main__":
  main()
