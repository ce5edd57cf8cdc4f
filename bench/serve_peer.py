"""The serving peer of bench/serve.py: the same exported weights served the way a user would
without ragjax. `ragjax export --format hf` directories loaded by sentence-transformers (query
encoder) and transformers (generator), the bundle's passage embeddings searched exactly with
numpy, Fusion-in-Decoder (or the top-1 passage for a RAG reader) by transformers' `generate` on
the concatenated encoder outputs, one request at a time, behind the same FastAPI route.

  python bench/serve_peer.py --hf HF_DIR --bundle BUNDLE --port 8001
"""
import argparse
import json
import pathlib
import threading

import numpy as np
import torch
import transformers
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from sentence_transformers import SentenceTransformer
from transformers.modeling_outputs import BaseModelOutput

from ragjax.data.tfds_store import CorpusSource  # reads the bundle's passage store only


class AnswerRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  question: str


def build(hf: pathlib.Path, bundle: pathlib.Path):
  cfg = json.loads((bundle / "config.json").read_text())
  arch = json.loads((hf / "ragjax_export.json").read_text())["towers"]["generator"]
  cls = {"EncoderDecoderModel": transformers.EncoderDecoderModel,
         "BartForConditionalGeneration": transformers.BartForConditionalGeneration,
         "T5ForConditionalGeneration": transformers.T5ForConditionalGeneration}[arch]
  gen = cls.from_pretrained(hf / "generator").eval()
  tok = transformers.AutoTokenizer.from_pretrained(hf / "generator")
  query = SentenceTransformer(str(hf / "query_encoder"), device="cpu")
  emb = np.load(bundle / "index" / "embeddings.npy")
  passages = list(CorpusSource(bundle / "passages", name="corpus"))
  texts = [f"{p.title} / {p.text}" for p in passages]
  m, e = cfg["model"], cfg["eval"]
  k = 1 if m.get("reader", "rag") != "fid" else int(m["k"])
  scale = float(m["doc_score_scale"])
  lock = threading.Lock()

  def answer(question: str) -> dict:
    with lock, torch.no_grad():  # one request at a time, as a plain transformers server
      q = query.encode([question], convert_to_numpy=True)[0]
      scores = emb @ q * scale
      top = np.argsort(-scores)[:int(m["k"])]
      ctx = tok([f"{texts[r]} // {question}" for r in top[:k]], return_tensors="pt",
                padding="max_length", truncation=True, max_length=int(m["context_max_length"]))
      enc = gen.get_encoder()(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask)
      hidden = enc.last_hidden_state.reshape(1, -1, enc.last_hidden_state.shape[-1])  # FiD
      out = gen.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                         attention_mask=ctx.attention_mask.reshape(1, -1),
                         max_new_tokens=int(e["max_new_tokens"]),
                         num_beams=int(e["num_beams"]), do_sample=False)
      return {"answer": tok.decode(out[0], skip_special_tokens=True).strip(),
              "passages": [{"id": passages[r].id, "title": passages[r].title,
                            "text": passages[r].text, "score": float(scores[r])} for r in top]}

  app = FastAPI()

  @app.post("/v1/answer")
  def route(req: AnswerRequest):  # a sync route: FastAPI runs it in its thread pool
    return answer(req.question)

  @app.get("/v1/health")
  def health():
    return {"status": "ok"}

  answer("warm up")
  return app


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--hf", required=True, type=pathlib.Path)
  p.add_argument("--bundle", required=True, type=pathlib.Path)
  p.add_argument("--port", type=int, default=8001)
  a = p.parse_args()
  uvicorn.run(build(a.hf, a.bundle), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
  main()
