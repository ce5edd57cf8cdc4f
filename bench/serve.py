"""Serving under closed-loop load: `ragjax serve` (dynamic batching into warmed static shapes)
against the peer (bench/serve_peer.py: the same exported weights through transformers'
`generate` and numpy exact search, one request at a time, behind the same FastAPI route).

  ragjax export --workdir W --out /tmp/b && ragjax export --workdir W --out /tmp/hf --format hf
  python bench/serve.py --bundle /tmp/b --hf /tmp/hf      # writes its section of bench/RESULTS.md
  python bench/serve.py --bundle /tmp/b --hf /tmp/hf --engine-buckets   # one batch per bucket

Both servers run on 127.0.0.1 in their own processes, one after the other, each loaded by C
closed-loop clients (C = 1, 8, 32: every client sends its next request when the last one is
answered) for `--requests` requests or `--seconds`, whichever comes first. Then a reload under
load: while 8 clients query ragjax, `POST /v1/reload` re-reads, re-warms and swaps the bundle;
every request must still get a 200. Aim: >= 2x the peer's requests/s at concurrency 32 with a
lower p99.
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import _results
import httpx
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(cmd: list[str], port: int, log: pathlib.Path, timeout: float = 600) -> subprocess.Popen:
  proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {log.read_text()[-2000:]}")
    try:
      if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
        return proc
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise RuntimeError(f"{cmd[:4]} not healthy in {timeout} s")


def load(url: str, questions: list[str], concurrency: int, requests: int, seconds: float,
         during=None) -> dict:
  """Closed loop: `concurrency` clients, `requests` in all or `seconds`, whichever first."""
  latencies, codes, lock = [], [], threading.Lock()
  counter = iter(range(requests))
  deadline = time.monotonic() + seconds
  stop = threading.Event()  # set 2 s after `during` returns

  def client(c: int):
    with httpx.Client(timeout=120) as http:
      for i in counter:
        if time.monotonic() > deadline or stop.is_set():
          return
        t0 = time.perf_counter()
        try:
          code = http.post(f"{url}/v1/answer",
                           json={"question": questions[(i * 7 + c) % len(questions)]}).status_code
        except httpx.TransportError:
          code = -1
        with lock:
          latencies.append(time.perf_counter() - t0)
          codes.append(code)
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency + 1) as pool:
    futs = [pool.submit(client, c) for c in range(concurrency)]
    def run_during():
      try:
        return during()
      finally:
        time.sleep(2.0)
        stop.set()
    extra = pool.submit(run_during) if during else None
    for f in futs:
      f.result()
    extra = extra.result() if extra else None
  wall = time.perf_counter() - t0
  lat = np.asarray(latencies)
  return {"requests": len(codes), "rps": len(codes) / wall, "p50_ms": 1e3 * np.percentile(lat, 50),
          "p99_ms": 1e3 * np.percentile(lat, 99), "errors": sum(c != 200 for c in codes),
          "during": extra}


def engine_buckets(bundle: str, buckets: list[int], repeats: int = 3) -> None:
  """In-process cost of one engine batch per bucket (no HTTP): what padding a batch costs."""
  from ragjax.serving import bundle as bundle_lib
  from ragjax.serving.engine import Engine
  engine = Engine(bundle_lib.load_bundle(bundle), buckets=buckets)
  engine.warm()
  for b in buckets:
    qs = [f"Where was person {i} born?" for i in range(b)]
    engine.decode(qs)
    t0 = time.perf_counter()
    for _ in range(repeats):
      engine.decode(qs)
    ms = 1e3 * (time.perf_counter() - t0) / repeats
    print(f"bucket {b}: {ms:.0f} ms a batch, {ms / b:.1f} ms a question", flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--bundle", required=True)
  ap.add_argument("--hf", required=True)
  ap.add_argument("--concurrency", default="1,8,32")
  ap.add_argument("--requests", type=int, default=400, help="per level")
  ap.add_argument("--seconds", type=float, default=90.0, help="per level, at most")
  ap.add_argument("--buckets", default="1,2,4,8,16,32")
  ap.add_argument("--no-write", action="store_true")
  ap.add_argument("--engine-buckets", action="store_true",
                  help="only time one engine batch per bucket in-process, and exit")
  a = ap.parse_args()
  if a.engine_buckets:
    return engine_buckets(a.bundle, [int(x) for x in a.buckets.split(",")])
  levels = [int(x) for x in a.concurrency.split(",")]
  bundle = pathlib.Path(a.bundle)
  manifest = json.loads((bundle / "manifest.json").read_text())
  from ragjax.data.tfds_store import CorpusSource
  titles = sorted({p.title for p in CorpusSource(bundle / "passages", name="corpus")})
  questions = [f"{w} {t} {x}?" for t in titles for w, x in
               (("Where was", "born"), ("What did", "study"), ("Who employs", ""))]
  logs = pathlib.Path("/tmp/ragjax-bench-serve")
  logs.mkdir(exist_ok=True)
  results, reload = {}, None
  servers = {
      "ragjax": [sys.executable, "-m", "ragjax.cli", "serve", str(bundle), "--buckets",
                 a.buckets, "--max-wait-ms", "5", "--max-queue", "1024"],
      "peer": [sys.executable, str(ROOT / "bench" / "serve_peer.py"), "--hf", a.hf,
               "--bundle", str(bundle)]}
  for name, cmd in servers.items():
    port = free_port()
    t0 = time.perf_counter()
    proc = start(cmd + ["--port", str(port)], port, logs / f"{name}.log")
    ready = time.perf_counter() - t0
    url = f"http://127.0.0.1:{port}"
    load(url, questions, 4, 16, 60)  # first requests on every path
    results[name] = {c: load(url, questions, c, a.requests, a.seconds) for c in levels}
    results[name]["ready_s"] = ready
    if name == "ragjax":
      def do_reload():
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/reload", timeout=600)
        return {"code": r.status_code, "seconds": time.perf_counter() - t}
      reload = load(url, questions, 8, 10 ** 6, 120, during=do_reload)
    proc.terminate()
    rc = proc.wait(60)
    results[name]["exit"] = rc
  rows = []
  for c in levels:
    r, p = results["ragjax"][c], results["peer"][c]
    for name, x in (("ragjax", r), ("peer", p)):
      rows.append([name, c, x["requests"], f"{x['rps']:.2f}", f"{x['p50_ms']:.0f}",
                   f"{x['p99_ms']:.0f}", x["errors"]])
  top = levels[-1]
  ratio = results["ragjax"][top]["rps"] / results["peer"][top]["rps"]
  body = _results.table(["server", "concurrency", "requests", "requests/s", "p50 ms", "p99 ms",
                         "errors"], rows)
  body += (f"\n\n**ragjax / peer requests/s at concurrency {top}: {ratio:.2f}** (aim >= 2); "
           f"p99 {results['ragjax'][top]['p99_ms']:.0f} ms vs {results['peer'][top]['p99_ms']:.0f}"
           f" ms.\n\nReload under load (8 clients, `POST /v1/reload` while they run): "
           f"{reload['requests']} requests, {reload['errors']} errors, reload "
           f"{reload['during']['code']} in {reload['during']['seconds']:.1f} s, p99 "
           f"{reload['p99_ms']:.0f} ms.\n\nStart to healthy (load, compile and warm every bucket):"
           f" ragjax {results['ragjax']['ready_s']:.1f} s, peer {results['peer']['ready_s']:.1f}"
           f" s. Exit status after SIGTERM: ragjax {results['ragjax']['exit']}, peer "
           f"{results['peer']['exit']} (uvicorn.run re-raises the signal).")
  print(body)
  if not a.no_write:
    cfg = json.loads((bundle / "config.json").read_text())
    peer_k = cfg["model"]["k"] if cfg["model"].get("reader", "rag") == "fid" else 1
    setup = {"versions": _results.versions("jax", "flax", "torch", "transformers", "fastapi", "uvicorn"), "threads": _results.thread_env(),
             "workload": f"bundle {bundle} (checkpoint step {manifest['checkpoint_step']}, "
                         f"{manifest['num_passages']} passages, reader "
                         f"{cfg['model'].get('reader', 'rag')} K={cfg['model']['k']}, "
                         f"{cfg['eval']['decoding']} beams {cfg['eval']['num_beams']}, "
                         f"max_new_tokens {cfg['eval']['max_new_tokens']}); the peer reads "
                         f"{peer_k} passage(s) per question (bench/serve_peer.py); ragjax buckets "
                         f"{a.buckets}, max wait 5 ms; {a.requests} requests or {a.seconds:.0f} s"
                         " per level; closed-loop clients on the same 2 cores"}
    _results.write_section("serve", _results.section(
        "serve", "serve.py: ragjax serve vs transformers behind the same route (CPU)", setup,
        body))


if __name__ == "__main__":
  main()
