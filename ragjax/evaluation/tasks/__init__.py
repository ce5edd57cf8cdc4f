"""The evaluation suite's benchmarks (`ragjax evaluate --task NAME`), one file per benchmark
(`open_qa`, `truthfulqa`, `halueval`, `freshqa`, `financebench`), over the shared types of
`ragjax.evaluation.tasks.base` (module docstring there).

  task = get_task("truthfulqa_mc")
  examples = task.load(task.data_path())          # ../shared/data/truthfulqa/mc_task.json
  metrics, records = task.run(scorer, examples, recall_ks=(1, 5))
"""
from __future__ import annotations

from ragjax.errors import UsageError
from ragjax.evaluation.tasks import financebench, freshqa, halueval, open_qa, truthfulqa
from ragjax.evaluation.tasks.base import Example, Scorer, Task, shared_data_dir

__all__ = ["Example", "Scorer", "Task", "get_task", "registry", "shared_data_dir"]


def registry() -> dict[str, Task]:
  """Every task by name."""
  tasks = [*open_qa.TASKS, truthfulqa.TASK, halueval.TASK, freshqa.TASK, financebench.TASK]
  return {t.name: t for t in tasks}


def get_task(name: str) -> Task:
  """The task called `name`. Raises: UsageError listing the known tasks."""
  tasks = registry()
  if name not in tasks:
    raise UsageError(f"--task {name!r}: unknown; expected one of {sorted(tasks)}")
  return tasks[name]
