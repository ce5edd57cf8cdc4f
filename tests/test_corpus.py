"""Corpus readers, document splitting and the atomic JSONL writer (ragjax.data.corpus)."""
import gzip
import json
import os

import pytest

from ragjax.data import corpus
from ragjax.data.corpus import Passage, iter_passages, read_passages, split_document
from conftest import check_error as _check_error, write_bytes as _write
from ragjax.errors import DataError




# ---------------------------------------------------------------------------------------------
# Formats

@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_int_id_and_missing_title(tmp_path, gz):
  path = _write(tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"),
                '{"id": 7, "text": "seven"}\n\n{"id": "b", "title": "B", "text": "bee"}\n', gz=gz)
  assert read_passages(path) == [Passage("7", "", "seven"), Passage("b", "B", "bee")]


def test_dpr_tsv_quoted_text(tmp_path):
  # First row of DPR psgs_w100.tsv: text CSV-quoted with "" for a literal quote.
  path = _write(tmp_path / "psgs.tsv",
                'id\ttext\ttitle\n'
                '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
                '2\tplain text, no quotes\tSecond\n'
                '3\t"has a\ttab"\tThird\n')
  assert corpus.detect_passage_format(path) == "dpr_tsv"
  assert read_passages(path) == [
      Passage("1", "Aaron", 'Aaron Aaron ( or ; "Ahärôn") is a prophet'),
      Passage("2", "Second", "plain text, no quotes"),
      Passage("3", "Third", "has a\ttab")]


def test_dpr_tsv_header_maps_columns(tmp_path):
  path = _write(tmp_path / "p.tsv", "id\ttitle\ttext\nx\tT\tthe text\n")
  assert read_passages(path) == [Passage("x", "T", "the text")]


def test_squad_synthetic_ids_and_titles(tmp_path):
  doc = {"version": "1.1", "data": [
      {"title": "A", "paragraphs": [{"context": "a0", "qas": []}, {"context": "a1", "qas": []}]},
      {"title": "B", "paragraphs": [{"context": "b0", "qas": []}]}]}
  path = _write(tmp_path / "s.json", json.dumps(doc))
  assert corpus.detect_passage_format(path) == "squad"
  assert read_passages(path) == [Passage("squad1.1-dev-000-000", "A", "a0"),
                                 Passage("squad1.1-dev-000-001", "A", "a1"),
                                 Passage("squad1.1-dev-001-000", "B", "b0")]
  assert read_passages(path, squad_prefix="x")[2].id == "x-001-000"


def test_real_squad_corpus_matches_derived_file(shared_data):
  """dev-v1.1.json read as a corpus equals the derived squad1.1_dev_corpus (README: 2,067)."""
  sq = shared_data / "squad_v1.1"
  derived = read_passages(sq / "squad1.1_dev_corpus.jsonl.gz")
  direct = read_passages(sq / "dev-v1.1.json.gz")
  assert len(derived) == 2067
  assert direct == derived
  assert derived[0].id == "squad1.1-dev-000-000" and derived[0].title == "Super_Bowl_50"
  assert derived[0].text.startswith("Super Bowl 50 was an American football game")


def test_detection_and_override(tmp_path):
  path = _write(tmp_path / "c.txt", '{"id": "a", "text": "t"}\n')
  assert corpus.detect_passage_format(path) == "jsonl"
  assert corpus.detect_passage_format(_write(tmp_path / "e.tsv", "")) == "dpr_tsv"
  assert corpus.detect_passage_format(_write(tmp_path / "e.json", "")) == "squad"
  with pytest.raises(DataError) as e:  # forced to TSV: no id/text header
    read_passages(path, fmt="dpr_tsv")
  _check_error(e.value, path, 1, None, "header")
  with pytest.raises(ValueError, match="unknown passage format"):
    read_passages(path, fmt="csv")
  with pytest.raises(ValueError, match="unknown passage format"):
    iter_passages(path, fmt="csv")  # raised at the call, before iteration


def test_iter_passages_streams_duplicates_read_rejects(tmp_path):
  path = _write(tmp_path / "c.jsonl", '{"id": "a", "text": "1"}\n{"id": "a", "text": "2"}\n')
  assert [p.text for p in iter_passages(path)] == ["1", "2"]
  with pytest.raises(DataError) as e:
    read_passages(path)
  _check_error(e.value, path, 2, "id", "duplicate passage id 'a'", "first at line 1")


# ---------------------------------------------------------------------------------------------
# Errors: each names file, line, field and what was expected.

@pytest.mark.parametrize("lines, line, field, words", [
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": }'], 2, None, ["malformed JSON"]),
    (['{"id": "a", "text": "x"}', '["b", "y"]'], 2, None, ["expected a JSON object, got list"]),
    (['{"id": "a", "title": "t"}'], 1, "text", ["missing", "expected a string"]),
    (['{"id": "a", "text": 3}'], 1, "text", ["expected a string, got int"]),
    (['{"id": "a", "title": null, "text": "x"}'], 1, "title", ["got null"]),
    (['{"text": "x"}'], 1, "id", ["missing"]),
    (['{"id": true, "text": "x"}'], 1, "id", ["non-empty string or int id, got bool"]),
    (['{"id": "", "text": "x"}'], 1, "id", ["non-empty"]),
])
def test_jsonl_record_errors(tmp_path, lines, line, field, words):
  path = _write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
  with pytest.raises(DataError) as e:
    read_passages(path)
  _check_error(e.value, path, line, field, *words)


def test_bad_utf8_names_line(tmp_path):
  path = _write(tmp_path / "c.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "\xff"}\n')
  with pytest.raises(DataError) as e:
    read_passages(path)
  _check_error(e.value, path, 2, None, "invalid UTF-8")
  tsv = _write(tmp_path / "c.tsv", b"id\ttext\ttitle\n1\tok\tT\n2\t\xc3(\tT\n")
  with pytest.raises(DataError) as e:
    read_passages(tsv)
  _check_error(e.value, tsv, 3, None, "invalid UTF-8")


def test_tsv_wrong_column_count(tmp_path):
  path = _write(tmp_path / "p.tsv", "id\ttext\ttitle\n1\tfine\tT\n2\tonly two\n")
  with pytest.raises(DataError) as e:
    read_passages(path)
  _check_error(e.value, path, 3, None, "expected 3 tab-separated columns", "got 2")


def test_tsv_missing_header(tmp_path):
  path = _write(tmp_path / "p.tsv", "1\ttext\ttitle\n")
  with pytest.raises(DataError) as e:
    read_passages(path)
  _check_error(e.value, path, 1, None, "header row")


@pytest.mark.parametrize("content", ["", "\n\n", "id\ttext\ttitle\n"])
def test_empty_corpus(tmp_path, content):
  path = _write(tmp_path / "c.tsv", content)
  with pytest.raises(DataError, match="empty corpus") as e:
    read_passages(path)
  assert str(e.value).startswith(f"{path}:")


def test_corrupt_gzip(tmp_path):
  good = gzip.compress(b'{"id": "a", "text": "x"}\n' * 100)
  path = _write(tmp_path / "c.jsonl.gz", good[:len(good) // 2])
  with pytest.raises(DataError, match="corrupt gzip") as e:
    read_passages(path)
  assert str(e.value).startswith(str(path))


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="cannot open"):
    read_passages(tmp_path / "nope.jsonl")


def test_squad_bad_paragraph_names_field_path(tmp_path):
  doc = {"data": [{"title": "A", "paragraphs": [{"context": "ok"}, {"context": 5}]}]}
  path = _write(tmp_path / "s.json", json.dumps(doc))
  with pytest.raises(DataError) as e:
    read_passages(path)
  _check_error(e.value, path, None, "data[0].paragraphs[1].context", "expected a string, got int")
  bad = _write(tmp_path / "b.json", '{"data": [}')
  with pytest.raises(DataError) as e:
    read_passages(bad)
  _check_error(e.value, bad, 1, None, "malformed JSON")


def test_skip_invalid_counts_everything_dropped(tmp_path):
  path = _write(tmp_path / "c.jsonl", b"\n".join([
      b'{"id": "a", "text": "1"}',
      b'{"id": "b", "text": }',           # malformed
      b'{"id": "c", "text": 3}',          # wrong type
      b'{"id": "a", "text": "dup"}',      # duplicate
      b'{"id": "d", "text": "\xff"}',     # bad UTF-8
      b'{"id": "e", "text": "5"}']) + b"\n")
  stats = {}
  got = read_passages(path, skip_invalid=True, stats=stats)
  assert [p.id for p in got] == ["a", "e"]
  assert stats["records"] == 2 and stats["skipped"] == 4
  assert [m.split(": ")[0] for m in stats["errors"]] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
  stats = {}  # iter_passages does not check duplicates
  assert [p.id for p in iter_passages(path, skip_invalid=True, stats=stats)] == ["a", "a", "e"]
  assert stats["skipped"] == 3


def test_skip_invalid_tsv(tmp_path):
  path = _write(tmp_path / "p.tsv", b"id\ttext\ttitle\n1\tok\tT\n2\tshort\n3\t\xff\tT\n4\tok\tT\n")
  stats = {}
  assert [p.id for p in read_passages(path, skip_invalid=True, stats=stats)] == ["1", "4"]
  assert stats["skipped"] == 2 and f"{path}:3:" in stats["errors"][0]
  assert f"{path}:4:" in stats["errors"][1]


def test_skip_invalid_all_bad_is_still_empty_error(tmp_path):
  path = _write(tmp_path / "c.jsonl", '{"id": 1}\n')
  with pytest.raises(DataError, match=r"empty corpus.*1 invalid records skipped"):
    read_passages(path, skip_invalid=True)


# ---------------------------------------------------------------------------------------------
# split_document

def test_split_document_sizes_ids_titles_and_no_word_lost():
  words = [f"w{i}" for i in range(250)]
  text = "  ".join(words[:10]) + "\n\t" + " ".join(words[10:]) + "\n"
  ps = split_document("doc", "Title", text)
  assert [p.id for p in ps] == ["doc-0", "doc-1", "doc-2"]
  assert [len(p.text.split()) for p in ps] == [100, 100, 50]
  assert all(p.title == "Title" for p in ps)
  assert " ".join(p.text for p in ps).split() == words
  assert ps[1].text.split()[0] == "w100" and ps[2].text.split()[-1] == "w249"


@pytest.mark.parametrize("n_words, size, lengths", [
    (200, 100, [100, 100]), (1, 100, [1]), (7, 3, [3, 3, 1]), (0, 100, [])])
def test_split_document_lengths(n_words, size, lengths):
  words = [str(i) for i in range(n_words)]
  ps = split_document("d", "", " ".join(words), words_per_passage=size)
  assert [len(p.text.split()) for p in ps] == lengths
  assert [w for p in ps for w in p.text.split()] == words


def test_split_document_rejects_bad_size():
  with pytest.raises(ValueError, match="words_per_passage"):
    split_document("d", "t", "a b", words_per_passage=0)


# ---------------------------------------------------------------------------------------------
# write_passages_jsonl

@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_write_roundtrip(tmp_path, name):
  ps = [Passage("1", "Ünïcode", 'quote " and\nnewline'), Passage("2", "", "")]
  path = tmp_path / name
  assert corpus.write_passages_jsonl(ps, path) == 2
  assert read_passages(path) == ps
  assert os.listdir(tmp_path) == [name]  # no temp file left behind


def test_write_is_atomic_on_failure(tmp_path):
  path = tmp_path / "out.jsonl"
  corpus.write_passages_jsonl([Passage("old", "", "x")], path)
  before = path.read_bytes()
  with pytest.raises(TypeError, match="expected Passage"):
    corpus.write_passages_jsonl([Passage("new", "", "y"), "not a passage"], path)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["out.jsonl"]
  corpus.write_passages_jsonl(iter([Passage("new", "", "y")]), path)  # replaces
  assert read_passages(path) == [Passage("new", "", "y")]
