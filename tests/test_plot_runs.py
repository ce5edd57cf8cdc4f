"""bench/plot_runs.py's inputs: eval reports of a workdir and rows recorded by hand."""
import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import plot_runs  # noqa: E402


def test_eval_curve_reads_the_step_reports_by_step(tmp_path):
  (tmp_path / "eval").mkdir()
  for step, em, r2 in ((150, 0.3, 0.9), (75, 0.1, 0.8)):
    (tmp_path / "eval" / f"step_{step}.json").write_text(json.dumps(
        {"step": step, "exact_match": em, "answer_recall": {"1": 0.5, "2": r2}}))
  (tmp_path / "eval" / "step_75.partial.json").write_text("{}")  # not a report
  assert plot_runs.eval_curve(tmp_path, 2) == [(75, 0.1, 0.8), (150, 0.3, 0.9)]
  with pytest.raises(FileNotFoundError, match="no step_N.json"):
    plot_runs.eval_curve(tmp_path / "nothing", 2)


def test_recorded_rows_parse_and_bad_specs_name_the_form():
  label, curve = plot_runs.parse_recorded("frozen (12-03)=150:0.125,75:0.075:0.54")
  assert label == "frozen (12-03)" and [c[:2] for c in curve] == [(75, 0.075), (150, 0.125)]
  assert curve[0][2] == 0.54 and math.isnan(curve[1][2])
  for bad in ("frozen", "=75:0.1", "x=75", "x=a:0.1", "x=75:0.1:0.2:0.3"):
    with pytest.raises(ValueError, match="LABEL=STEP:EM"):
      plot_runs.parse_recorded(bad)
