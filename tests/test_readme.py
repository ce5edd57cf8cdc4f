"""The README's two set-up commands stay true: CI runs exactly the README's test command."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
  text = (ROOT / "README.md").read_text()
  block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
  return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_main_job_and_test_commands():
  main_job, tests = readme_commands()[:2]
  assert "ragjax" in main_job and "pip install" in main_job
  assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command_verbatim():
  tests = readme_commands()[1]
  ci = (ROOT / ".ci" / "run").read_text()
  assert tests in ci.splitlines()
