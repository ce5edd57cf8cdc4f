"""The evaluation suite's tasks (`ragjax evaluate`): loaders on the shared data and on hand-written
samples of the formats not shared here, each metric against a hand-computed value through a
scorer whose log-likelihoods are known, the result files and report, and bad input. The
workdir / bundle / server equality runs on a trained model in tests/test_serving.py."""
import json
import math

import numpy as np
import pytest

from conftest import SHARED_DATA
from ragjax.cli import main
from ragjax.data.qa import detect_question_format, read_questions
from ragjax.errors import DataError, UsageError
from ragjax.evaluation.tasks import financebench, freshqa, get_task, halueval, truthfulqa
from ragjax.serving import suite


class FakeScorer:
  """Known answers: `answer` returns `answers[q]`, `retrieve` the passages `ranked[q]`, `score`
  the log-likelihood `lls[(q, a)]` (default -len(a))."""
  max_batch, max_retrieve_k, max_answers, reader_k = 2, 3, 3, 1
  config, source = {"model": {"loss": "fake"}}, {"bundle": "fake"}

  def __init__(self, answers=None, ranked=None, lls=None):
    self.answers, self.ranked, self.lls = answers or {}, ranked or {}, lls or {}
    self.calls = []

  def answer(self, qs):
    assert len(qs) <= self.max_batch
    return [{"answer": self.answers.get(q, ""), "passages": self.ranked.get(q, [])} for q in qs]

  def retrieve(self, qs, k):
    assert len(qs) <= self.max_batch and k <= self.max_retrieve_k
    return [self.ranked.get(q, [])[:k] for q in qs]

  def score(self, q, answers):
    assert 1 <= len(answers) <= self.max_answers
    self.calls.append((q, tuple(answers)))
    return [self.lls.get((q, a), -float(len(a))) for a in answers]


def _passage(pid, text, title=""):
  return {"id": pid, "title": title, "text": text, "score": 0.0}


# ------------------------------------------------------------------------------ TruthfulQA

def test_mc1_mc2_are_the_harness_formulas():
  lls, labels = [-1.0, -2.0, -3.0, -0.5], [1, 1, 0, 0]
  want = (math.exp(-1) + math.exp(-2)) / sum(math.exp(x) for x in lls)
  assert truthfulqa.mc2(lls, labels) == pytest.approx(want, rel=1e-12)
  assert truthfulqa.mc1(lls, labels) == 0.0          # -0.5 (false) is the best
  assert truthfulqa.mc1([-1.0, -2.0], [1, 0]) == 1.0
  assert truthfulqa.mc1([-1.0, -1.0], [1, 0]) == 1.0  # a tie goes to the first, as argmax == 0
  # Stable at log-likelihoods whose exp underflows float64.
  assert truthfulqa.mc2([-2000.0, -2001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_truthfulqa_run_scores_each_choice_once(tmp_path):
  rows = [{"question": "Q1?", "mc1_targets": {"right": 1, "wrong answer": 0},
           "mc2_targets": {"right": 1, "also right": 1, "wrong answer": 0}}]
  f = tmp_path / "tqa.json"
  f.write_text(json.dumps(rows))
  ex = truthfulqa.load(f)
  sc = FakeScorer(lls={("Q1?", "right"): -3.0, ("Q1?", "wrong answer"): -1.0,
                       ("Q1?", "also right"): -2.0})
  metrics, recs = truthfulqa.run(sc, ex)
  assert metrics["mc1"] == 0.0
  assert metrics["mc2"] == pytest.approx((math.exp(-3) + math.exp(-2)) /
                                         (math.exp(-3) + math.exp(-2) + math.exp(-1)))
  scored = [a for _, answers in sc.calls for a in answers]
  assert sorted(scored) == ["also right", "right", "wrong answer"]  # 3 unique, chunked by 3
  assert recs[0]["prediction"] == "wrong answer" and recs[0]["gold"] == ["right", "also right"]


def test_truthfulqa_loads_the_shared_file_and_hf_rows(tmp_path):
  f = SHARED_DATA / "truthfulqa" / "mc_task.json"
  if not f.is_file():
    pytest.skip(f"{f} absent (shared evaluation data not mounted)")
  stats = {}
  ex = truthfulqa.load(f, stats=stats)
  assert len(ex) == 790  # the shared data README's count
  # 39 choice sets there hold a "" choice (counted by json.load + a loop over the sets).
  assert stats["empty_choices_dropped"] == 39
  assert all(c.strip() for e in ex for _, cs, _ in e.choice_sets for c in cs)
  sets = dict((n, (c, lab)) for n, c, lab in ex[0].choice_sets)
  assert sets["mc1"][1][0] == 1 and sum(sets["mc1"][1]) == 1
  hf = tmp_path / "hf.jsonl"
  hf.write_text(json.dumps({"question": "Q?", "mc1_targets": {"choices": ["a", "b"],
                                                              "labels": [1, 0]},
                            "mc2_targets": {"choices": ["a", "b"], "labels": [1, 0]}}) + "\n")
  assert truthfulqa.load(hf)[0].choice_sets[0] == ("mc1", ("a", "b"), (1, 0))


def test_truthfulqa_bad_rows_name_file_line_and_field(tmp_path):
  f = tmp_path / "bad.jsonl"
  f.write_text(json.dumps({"question": "Q?", "mc1_targets": {"a": 0}, "mc2_targets": {"a": 1}})
               + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:1: field 'mc1_targets': labels \[0\]"):
    truthfulqa.load(f)


# -------------------------------------------------------------------------------- HaluEval

def test_halueval_both_formats_and_yes_no_by_logits(tmp_path):
  data = tmp_path / "qa_data.json"
  data.write_text(json.dumps({"knowledge": "Ada was born in Lagos.", "question": "Where?",
                              "right_answer": "Lagos", "hallucinated_answer": "Paris"}) + "\n")
  ex = halueval.load(data)
  assert [dict(e.tags)["label"] for e in ex] == ["No", "Yes"]
  assert ex[0].question.question.startswith("#Question#: Where?\n#Answer#: Lagos\n#Knowledge#")
  samples = tmp_path / "qa_samples.json"
  samples.write_text(json.dumps([{"knowledge": "", "question": "Who?", "answer": "Bo",
                                  "hallucination": "yes"}]))
  ex2 = halueval.load(samples)
  assert dict(ex2[0].tags)["label"] == "Yes" and "#Knowledge#" not in ex2[0].question.question
  # Judged Yes when log p(Yes) > log p(No): right answer -> No (correct), hallucinated -> No
  # (wrong), the sample -> Yes (correct).
  lls = {(ex[0].question.question, "Yes"): -2.0, (ex[0].question.question, "No"): -1.0,
         (ex[1].question.question, "Yes"): -3.0, (ex[1].question.question, "No"): -1.0,
         (ex2[0].question.question, "Yes"): -0.1, (ex2[0].question.question, "No"): -4.0}
  metrics, recs = halueval.run(FakeScorer(lls=lls), ex + ex2)
  assert metrics["accuracy"] == pytest.approx(2 / 3)
  assert metrics["accuracy_by_label"] == {"Yes": 0.5, "No": 1.0}
  assert [r["prediction"] for r in recs] == ["No", "No", "Yes"]


def test_halueval_row_of_neither_format(tmp_path):
  f = tmp_path / "x.jsonl"
  f.write_text(json.dumps({"question": "Q", "knowledge": "k"}) + "\n")
  with pytest.raises(DataError, match=r"x.jsonl:1: expected right_answer \+ hallucinated_answer"):
    halueval.load(f)


# ---------------------------------------------------------------------------------- FreshQA

def test_freshqa_shared_file_and_its_splits():
  f = SHARED_DATA / "freshqa" / "FreshQA_v04072025-freshqa.csv"
  if not f.is_file():
    pytest.skip(f"{f} absent (shared evaluation data not mounted)")
  ex = freshqa.load(f)
  assert len(ex) == 600
  tags = [dict(e.tags) for e in ex]
  # Counts from the shared data README.
  assert sum(t["fact_type"] == "never-changing" for t in tags) == 223
  assert sum(t["fact_type"] == "fast-changing" for t in tags) == 155
  assert sum(t["false_premise"] == "TRUE" for t in tags) == 151
  assert sum(t["split"] == "TEST" for t in tags) == 500
  # EM per split, against answers the fake scorer gives right for never-changing questions.
  sc = FakeScorer(answers={e.question.question: e.question.answers[0]
                           for e, t in zip(ex, tags) if t["fact_type"] == "never-changing"})
  metrics, _ = freshqa.run(sc, ex, recall_ks=())
  by = metrics["by"]["fact_type"]
  assert by["never-changing"]["exact_match"] == 1.0
  assert by["fast-changing"]["exact_match"] == 0.0
  assert metrics["exact_match"] == pytest.approx(223 / 600)
  assert sum(g["num_examples"] for g in metrics["by"]["false_premise"].values()) == 600


def test_freshqa_without_header(tmp_path):
  f = tmp_path / "f.csv"
  f.write_text("a,b\n1,2\n")
  with pytest.raises(DataError, match="f.csv: no header row"):
    freshqa.load(f)


# ------------------------------------------------------------------- open QA and HotpotQA

def test_run_qa_em_f1_and_recall_by_hand(tmp_path):
  f = tmp_path / "q.jsonl"
  f.write_text("\n".join(json.dumps(r) for r in [
      {"id": "a", "question": "Q a", "answers": ["Lagos"]},
      {"id": "b", "question": "Q b", "answers": ["New York City"]},
      {"id": "c", "question": "Q c", "answers": ["1912"]}]) + "\n")
  ex = get_task("squad_open").load(f)
  ranked = {"Q a": [_passage("p1", "born in Lagos"), _passage("p2", "x")],
            "Q b": [_passage("p3", "x"), _passage("p4", "the city of new york city")],
            "Q c": [_passage("p5", "y")]}
  sc = FakeScorer(answers={"Q a": "lagos", "Q b": "New York", "Q c": "1913"}, ranked=ranked)
  metrics, recs = get_task("squad_open").run(sc, ex, recall_ks=(1, 2, 5))
  assert metrics["exact_match"] == pytest.approx(1 / 3)
  # F1("New York", "New York City") = 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
  assert metrics["f1"] == pytest.approx((1 + 0.8 + 0) / 3)
  # k = 5 is past the scorer's deepest search (3): not reported.
  assert metrics["answer_recall"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3)}
  assert [r["score"]["first_hit"] for r in recs] == [1, 2, None]
  assert recs[0]["passages"] == ["p1"]  # reader_k = 1


def test_hotpotqa_format(tmp_path):
  f = tmp_path / "hotpot_dev_distractor_v1.json"
  f.write_text(json.dumps([{"_id": "5a8b", "question": "Which band?", "answer": "Muse",
                            "supporting_facts": [["Muse (band)", 0], ["Muse (band)", 2],
                                                 ["Oceansize", 1]],
                            "context": [["Muse (band)", ["Muse are..."]]], "type": "comparison",
                            "level": "hard"}], indent=1))
  assert detect_question_format(f) == "hotpotqa"
  (q,) = read_questions(f)
  assert (q.id, q.answers, q.gold_passage_ids) == ("5a8b", ("Muse",), ("Muse (band)",
                                                                        "Oceansize"))
  bad = tmp_path / "hotpot_bad.json"
  bad.write_text(json.dumps([{"_id": "x", "question": "Q", "answer": 3}]))
  with pytest.raises(DataError, match=r"hotpot_bad.json:1: field 'answer': expected a string"):
    read_questions(bad)


@pytest.mark.parametrize("task", ["nq_open", "triviaqa", "webquestions", "curatedtrec",
                                  "squad_open"])
def test_open_qa_defaults_read_the_shared_data(task):
  t = get_task(task)
  path = SHARED_DATA / t.default_data
  if not path.is_file():
    pytest.skip(f"{path} absent (shared evaluation data not mounted)")
  ex = t.load(path)
  want = {"nq_open": 3610, "triviaqa": 11313, "squad_open": 10570}
  if task in want:
    assert len(ex) == want[task]
  assert all(e.question.answers for e in ex)
  assert all(e.question.answers_are_regex for e in ex) == (task == "curatedtrec")


# ----------------------------------------------------------------------------- FinanceBench

def _financebench(tmp_path):
  rows = [{"financebench_id": "fb-1", "question": "What was 3M's FY2018 capex?",
           "answer": "$1,577 million", "doc_name": "3M_2018_10K",
           "evidence": [{"evidence_text": "Purchases of PP&E 1,577", "doc_name": "3M_2018_10K",
                         "evidence_page_num": 60,
                         "evidence_text_full_page": "Cash flows ... Purchases of PP&E (1,577)"}]},
          {"financebench_id": "fb-2", "question": "Adobe FY2022 revenue?", "answer": "$17.6B",
           "doc_name": "ADOBE_2022_10K",
           "evidence": [{"evidence_text": "Total revenue 17,606", "doc_name": "ADOBE_2022_10K",
                         "evidence_page_num": 54}]}]
  f = tmp_path / "financebench_open_source.jsonl"
  f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return f


def test_financebench_corpus_and_evidence_recall(tmp_path):
  f = _financebench(tmp_path)
  ps = financebench.load_corpus(f)
  assert [p.id for p in ps] == ["3M_2018_10K#page60-0", "ADOBE_2022_10K#page54-0"]
  assert ps[0].text.startswith("Cash flows") and ps[1].title == "ADOBE_2022_10K"
  assert financebench.page_of(ps[0].id) == ("3M_2018_10K", "60")
  ex = financebench.load(f)
  assert ex[0].evidence == (("3M_2018_10K", "60"),)
  q1, q2 = (e.question.question for e in ex)
  ranked = {q1: [_passage(ps[1].id, ps[1].text, ps[1].title), _passage(ps[0].id, ps[0].text,
                                                                          ps[0].title)],
            q2: [_passage("3M_2018_10K#page61-0", "other page", "3M_2018_10K")]}
  metrics, recs = financebench.run(FakeScorer(ranked=ranked), ex, recall_ks=(1, 2))
  assert metrics["evidence_page_recall"] == {"1": 0.0, "2": 0.5}
  assert metrics["evidence_doc_recall"] == {"1": 0.0, "2": 0.5}
  assert recs[0]["score"]["evidence_page_hit"] and not recs[1]["score"]["evidence_doc_hit"]


def test_financebench_bad_evidence(tmp_path):
  f = tmp_path / "fb.jsonl"
  f.write_text(json.dumps({"question": "Q?", "answer": "A", "evidence": []}) + "\n")
  with pytest.raises(DataError, match=r"fb.jsonl:1: field 'evidence': got list"):
    financebench.load(f)


# ------------------------------------------------------------ result files, report, errors

def test_result_files_and_report(tmp_path):
  f = tmp_path / "tqa.json"
  f.write_text(json.dumps([{"question": "Q?", "mc1_targets": {"a": 1, "bb": 0},
                            "mc2_targets": {"a": 1, "bb": 0}}]))
  result, recs = suite.evaluate_task("truthfulqa_mc", FakeScorer(), f)
  assert set(result) >= {"task", "num_examples", "metrics", "config"}
  assert result["metrics"] == {"mc1": 1.0, "mc2": pytest.approx(1 / (1 + math.exp(-1)))}
  out = tmp_path / "res" / "tqa.json"
  suite.write_result(out, result, recs)
  assert json.loads(out.read_text())["num_examples"] == 1
  lines = (tmp_path / "res" / "tqa.jsonl").read_text().splitlines()
  assert set(json.loads(lines[0])) >= {"question", "prediction", "gold", "passages", "score"}
  qa = dict(result, task="nq_open", metrics={"exact_match": 0.5, "f1": 0.75,
                                             "answer_recall": {"1": 0.25}})
  (tmp_path / "qa.json").write_text(json.dumps(qa))
  table = suite.report([out, tmp_path / "qa.json"])
  assert table.splitlines()[0] == ("| task | source | step | N | mc1 | mc2 | exact_match | f1 | "
                                   "answer_recall@1 |")
  assert "| nq_open | `fake` |  | 1 |  |  | 0.500 | 0.750 | 0.250 |" in table
  with pytest.raises(DataError, match="not.json: not an `ragjax evaluate` result"):
    (tmp_path / "not.json").write_text("[1]")
    suite.report([tmp_path / "not.json"])


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
  def err(argv):
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if "error:" in x]
    assert len(lines) == 1 and lines[0].startswith("ragjax evaluate: error: "), lines
    return lines[0]
  out = str(tmp_path / "o.json")
  assert "unknown; expected one of ['curatedtrec'" in err(
      ["evaluate", "--bundle", "b", "--task", "nq_opne", "--out", out])
  assert "halueval_qa: its data is not shared here; pass --data FILE" in err(
      ["evaluate", "--bundle", "b", "--task", "halueval_qa", "--out", out])
  wrong = tmp_path / "wrong.json"
  wrong.write_text(json.dumps([{"qId": "1", "qText": "Q", "answers": ["a"]}]))
  assert "wrong.json:1: field 'question': missing or empty" in err(
      ["evaluate", "--bundle", "b", "--task", "truthfulqa_mc", "--data", str(wrong),
       "--out", out])
  nockpt = tmp_path / "w"
  nockpt.mkdir()
  msg = err(["evaluate", "--workdir", str(nockpt), "--task", "truthfulqa_mc", "--data",
             str(_tqa(tmp_path)), "--out", out])
  assert f"{nockpt}/config.json: not found (is {nockpt} a `ragjax train` workdir?)" in msg
  from ragjax import config as config_lib
  from ragjax.training.workdir import config_to_json
  cfg = config_lib.load_config("experiments/bios.py:smoke")
  (nockpt / "config.json").write_text(json.dumps(config_to_json(cfg)))
  assert f"{nockpt}/config.json: not a ragjax workdir config (KeyError" in err(
      ["evaluate", "--workdir", str(nockpt), "--task", "truthfulqa_mc", "--data",
       str(_tqa(tmp_path)), "--out", out])
  (nockpt / "config.json").write_text(json.dumps({"config": config_to_json(cfg)}))
  msg = err(["evaluate", "--workdir", str(nockpt), "--task", "truthfulqa_mc", "--data",
             str(_tqa(tmp_path)), "--out", out])
  assert f"{nockpt}: no checkpoint yet" in msg, msg
  assert "exactly one of --workdir, --bundle, --server" in err(
      ["evaluate", "--task", "truthfulqa_mc", "--data", str(_tqa(tmp_path)), "--out", out])
  with pytest.raises(UsageError, match="--max-examples 0"):
    suite.evaluate_task("truthfulqa_mc", FakeScorer(), _tqa(tmp_path), max_examples=0)
  assert "not reachable" in err(["evaluate", "--server", "http://127.0.0.1:9", "--task",
                                 "truthfulqa_mc", "--data", str(_tqa(tmp_path)), "--out", out])


def _tqa(tmp_path):
  f = tmp_path / "tqa_ok.json"
  f.write_text(json.dumps([{"question": "Q?", "mc1_targets": {"a": 1, "b": 0},
                            "mc2_targets": {"a": 1, "b": 0}}]))
  return f


def test_skip_invalid_counts_and_reports(tmp_path):
  f = tmp_path / "tqa.jsonl"
  good = {"question": "Q?", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}}
  f.write_text(json.dumps(good) + "\n" + json.dumps({"question": ""}) + "\n")
  with pytest.raises(DataError, match="tqa.jsonl:2"):
    suite.evaluate_task("truthfulqa_mc", FakeScorer(), f)
  result, _ = suite.evaluate_task("truthfulqa_mc", FakeScorer(), f, skip_invalid=True)
  assert result["num_examples"] == 1 and result["input"]["skipped"] == 1
  assert "tqa.jsonl:2" in result["input"]["errors"][0]
  assert np.isfinite(result["metrics"]["mc2"])
