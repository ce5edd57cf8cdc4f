"""The package's import graph: imports point one way, from the CLI down to the base modules, and no
module imports itself back through others. Parsed with `ast` (every `import` statement, also
those inside functions), so a dependency hidden in a function body counts too."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ragjax"

# Highest first; a module may import its own layer and the layers below it, never above.
LAYERS = (
    ("cli", {"cli"}),
    ("training / serving", {"training", "serving"}),
    ("joint", {"joint"}),
    ("evaluation", {"evaluation"}),
    ("system", {"system"}),
    ("decoding / retrieval", {"decoding", "retrieval"}),
    ("objectives / models", {"objectives", "models"}),
    ("data", {"data"}),
    ("base", {"config", "config_checks", "sharding", "errors", "fsutil", "hostenv", "checkpoint", "__init__"}),
)


def _module_name(path: pathlib.Path) -> str:
  parts = ["ragjax", *path.relative_to(ROOT).with_suffix("").parts]
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
  """The ragjax modules `path` imports (`from ragjax.x import y` counts `ragjax.x.y` when that is
  a module, else `ragjax.x`)."""
  out = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] == "ragjax"}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if base.split(".")[0] != "ragjax":
        continue
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in MODULES else base)
  return out


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {_module_name(f): f for f in FILES}


def _layer(module: str) -> int:
  parts = module.split(".")
  top = parts[1] if len(parts) > 1 else "__init__"
  for i, (_, names) in enumerate(LAYERS):
    if top in names:
      return i
  raise AssertionError(f"{module}: in no layer of tests/test_layers.py; add it to LAYERS")


GRAPH = {m: {d for d in _imports(f, m) if d != m} for m, f in MODULES.items()}


def test_every_module_has_a_layer_and_every_import_resolves():
  for m, deps in GRAPH.items():
    _layer(m)
    missing = sorted(d for d in deps if d not in MODULES)
    assert not missing, f"{m} imports {missing}, which are not modules of ragjax"


def test_no_module_imports_a_higher_layer():
  bad = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
         for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if _layer(d) < _layer(m)]
  assert not bad, "imports must point down the layers:\n" + "\n".join(bad)


def _cycle(graph) -> list[str] | None:
  """One import cycle of `graph` (a path that ends where it starts), or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        return stack[stack.index(d):] + [d]
      if d not in state:
        found = visit(d)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_no_import_cycle():
  cycle = _cycle(GRAPH)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_find_a_cycle_and_an_upward_import():
  """The cycle finder and the layer rule catch what they exist for (on a made-up graph)."""
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert _layer("ragjax.models.rag") > _layer("ragjax.retrieval.topk")  # models sit lower
  with pytest.raises(AssertionError, match="in no layer"):
    _layer("ragjax.newthing.module")


def test_no_module_is_over_500_lines():
  long = {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > 500}
  assert not long, f"split these modules (STYLE.md: ~500 lines at most): {long}"
