"""Chunk contextualisation (`ragjax.data.contextualize`, `--context`): which passages get which
prefix, the context file's checks, and the CLI path through `ragjax eval-retrieval`."""
import json

import pytest

from ragjax.cli import main
from ragjax.data.contextualize import contextualize, document_id, first_sentence
from ragjax.data.corpus import Passage
from ragjax.errors import DataError

PS = [Passage("doc-a-0", "A", "Ada Okafor is a chemist. She lives in Lagos."),
      Passage("doc-a-1", "A", "She was born in 1970."),
      Passage("doc-b-0", "B", "Bo Lind sails. Often."),
      Passage("single", "C", "No numbered siblings.")]


def test_document_id_and_first_sentence():
  assert [document_id(p.id) for p in PS] == ["doc-a", "doc-a", "doc-b", "single"]
  assert document_id("squad1.1-dev-000-012") == "squad1.1-dev-000"
  assert first_sentence("Dr. Smith left. Then he came back.") == "Dr."  # a rule, not a parser
  assert first_sentence("Ada is here! Bo too.") == "Ada is here!"
  assert first_sentence(" ".join(["w"] * 100), max_words=5) == "w w w w w"


def test_first_sentence_prefixes_every_passage_but_the_first_of_its_document():
  out = contextualize(PS, "first_sentence")
  assert [p.text for p in out] == [
      PS[0].text, "Ada Okafor is a chemist. She was born in 1970.", PS[2].text, PS[3].text]
  assert [(p.id, p.title) for p in out] == [(p.id, p.title) for p in PS]
  assert contextualize(PS, "none") == PS


def test_context_file(tmp_path):
  f = tmp_path / "ctx.jsonl"
  f.write_text(json.dumps({"id": "doc-a-1", "context": "From Ada Okafor's profile."}) + "\n")
  out = contextualize(PS, "file", f)
  assert out[1].text == "From Ada Okafor's profile. She was born in 1970."
  assert [p.text for i, p in enumerate(out) if i != 1] == [p.text for i, p in enumerate(PS)
                                                           if i != 1]
  f.write_text(json.dumps({"id": "nope", "context": "x"}) + "\n")
  with pytest.raises(DataError, match=r"ctx.jsonl: 1 ids not in the corpus, e.g. \['nope'\]"):
    contextualize(PS, "file", f)
  f.write_text(json.dumps({"id": "doc-a-1", "context": 3}) + "\n")
  with pytest.raises(DataError, match=r"ctx.jsonl:1: field 'context': expected a string"):
    contextualize(PS, "file", f)
  with pytest.raises(ValueError, match="needs a context file"):
    contextualize(PS, "file")


def test_eval_retrieval_reads_the_contextualised_corpus(tmp_path, capsys):
  corpus = tmp_path / "c.jsonl"
  corpus.write_text("\n".join(json.dumps({"id": p.id, "title": p.title, "text": p.text})
                              for p in PS) + "\n")
  q = tmp_path / "q.jsonl"
  # Without context doc-a-0 matches 2 of the terms and doc-a-1 one; the context gives doc-a-1
  # all three.
  q.write_text(json.dumps({"id": "q", "question": "okafor chemist 1970", "answers": ["1970"],
                           "gold_passage_ids": ["doc-a-1"]}) + "\n")
  recall = {}
  for mode in ("none", "first_sentence"):
    out = tmp_path / f"{mode}.json"
    assert main(["eval-retrieval", "--corpus", str(corpus), "--questions", str(q),
                 "--retriever", "bm25", "--k", "1", "--context", mode, "--out", str(out)]) == 0
    recall[mode] = json.loads(out.read_text())["recall"]["gold"]["1"]
  assert recall == {"none": 0.0, "first_sentence": 1.0}
  capsys.readouterr()
  assert main(["eval-retrieval", "--corpus", str(corpus), "--questions", str(q), "--retriever",
               "bm25", "--context", "file"]) == 2
  assert "--context file: context mode 'file' needs a context file" in capsys.readouterr().err


def test_config_key_applies_to_every_source_and_is_checked(tmp_path):
  from ragjax import config as config_lib
  from ragjax.data.sources import load_data
  from ragjax.errors import ConfigError
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  cfg.data.bios_layout = "documents"
  plain = load_data(cfg)[0]
  cfg.data.passage_context = "first_sentence"
  config_lib.validate(cfg, data=True)
  ctx = load_data(cfg)[0]
  assert [p.text for p in ctx] == [p.text for p in contextualize(plain, "first_sentence")]
  assert sum(a.text != b.text for a, b in zip(ctx, plain)) > len(plain) // 2
  cfg.data.passage_context = "bogus"
  with pytest.raises(ConfigError, match="data.passage_context 'bogus': expected one of"):
    config_lib.validate(cfg, data=True)
  cfg.data.passage_context = "file"
  with pytest.raises(DataError, match=r"field 'data.passage_context_file': expected a JSON"):
    config_lib.validate(cfg, data=True)
