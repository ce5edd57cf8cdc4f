"""Ahead-of-time compilation for a TPU topology on a machine without one, and a memory report.

libtpu can describe a TPU slice it is not attached to and hand out *compile-only* devices for it:
they have the slice's physical coordinates, so GSPMD partitions and XLA's TPU compiler compiles
exactly as on the real slice, but nothing can run on them and no array can live on them. The
step is therefore lowered from abstract arguments (`jax.ShapeDtypeStruct` with a `NamedSharding`
on the TPU mesh), as MaxText's `train_compile.py` does:

  mesh = tpu_mesh("v5e:4x4", [("data", -1), ("fsdp", 4)])
  state_sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           jax.eval_shape(init, rng), state_shardings(mesh))
  report = compile_report(jax.jit(train_step, donate_argnums=0, ...), state_sds, batch_sds)
  report["required_bytes"], report["hbm_bytes"], report["fits"]

This works with the CPU as JAX's default backend (`JAX_PLATFORMS=cpu`): the TPU plugin is loaded
beside it for the topology only, no TPU backend is initialised. It needs the `libtpu` wheel
(`libtpu_requirement()` gives the pin that the installed jax expects). On a machine without a TPU,
libtpu prints a few harmless lines on stderr when it loads ("could not determine TPU accelerator
type", "unexpected worker hostname"); they do not affect the compile. There, it is also allowed
to load beside other processes that hold libtpu (`ALLOW_MULTIPLE_LIBTPU_LOAD`, see
`_require_libtpu`).

Sources: jax.experimental.topologies (get_topology_desc); MaxText train_compile.py and
max_utils.print_compiled_memory_stats; Cloud TPU system architecture pages (HBM per chip).
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ragjax import config as config_lib
from ragjax import sharding
from ragjax.errors import ConfigError
from ragjax.system.build import abstract_model
from ragjax.training.optim import make_optimizer
from ragjax.training.state import abstract_state
from ragjax.training.step import batch_shapes, jit_train_step

GiB = 1 << 30

# Nominal HBM per TPU *chip*, bytes (Cloud TPU system architecture pages). A chip that JAX shows
# as several devices (v2, v3, TPU7x; v4/v5p without megacore) splits it evenly between them:
# `device_hbm_bytes` does that division. The usable figure on real hardware is a little lower
# (runtime reservations), so treat a report within a few percent of the limit as not fitting.
HBM_BYTES = {
    "v2": 16 * GiB,
    "v3": 32 * GiB,
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "tpu7x": 192 * GiB,
}

# `device.device_kind` -> generation key of HBM_BYTES.
DEVICE_KINDS = {
    "TPU v2": "v2",
    "TPU v3": "v3",
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
    "TPU7x": "tpu7x",
}

# Generations whose chips hold two TensorCores that JAX (on a TPU VM) shows as one device.
MEGACORE = ("v4", "v5p")

# Names people write for a generation that libtpu spells differently.
_ALIASES = {"v7x": "tpu7x", "v5litepod": "v5e", "v5lite": "v5e"}
_TOPOLOGY_RE = re.compile(r"^\s*([A-Za-z0-9_ ]+?)\s*:\s*(\d+(?:x\d+){1,2})\s*$")

_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
                "ragged-all-to-all")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
_TPU_REDUCE_SCATTER_RE = re.compile(r"calls=%all-reduce-scatter[.\w-]*")


def libtpu_requirement() -> str:
  """The pip requirement for the libtpu that the installed jax pins (its `tpu` extra).

  E.g. ``libtpu==0.0.42.*`` for jax 0.10.2. Falls back to ``jax[tpu]==<version>``.
  """
  for req in importlib.metadata.requires("jax") or ():
    if req.startswith("libtpu") and "extra" in req and "tpu" in req.split("extra", 1)[1]:
      return req.split(";", 1)[0].replace(" ", "")
  return f"jax[tpu]=={jax.__version__}"


def _require_libtpu():
  """Check libtpu is there; on a machine without TPU chips, let it load beside other processes.

  libtpu holds `/tmp/libtpu_lockfile` so that one process owns the chips; with no chips
  attached (compile-only use) that lock only makes two compiles, or a compile and any other jax
  process that probed for a TPU, refuse each other ("Internal error when accessing libtpu
  multi-process lockfile"). `ALLOW_MULTIPLE_LIBTPU_LOAD=1` turns it off; it is set only when no
  chip is attached and the plugin is not initialised yet, and never overrides a value set.
  """
  from jax._src import hardware_utils
  from jax._src import xla_bridge as xb
  from jax._src.lib import xla_client
  loaded = xla_client.pjrt_plugin_loaded("tpu")
  if loaded and xla_client.pjrt_plugin_initialized("tpu"):
    return
  if not loaded and xb.get_tpu_library_path() is None:
    raise ImportError(
        "compile-only TPU devices need libtpu, which is not installed: "
        f"pip install '{libtpu_requirement()}'  (the version the installed jax "
        f"{jax.__version__} expects; or pip install 'jax[tpu]=={jax.__version__}')")
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """`"v5e:4x4"` -> `("v5e", (4, 4))`: generation (aliases resolved) and chip grid.

  Raises:
    ValueError: a string not of the form `<generation>:<AxB[xC]>`, or an unknown generation.
  """
  m = _TOPOLOGY_RE.match(topology or "")
  if not m:
    raise ValueError(f"TPU topology {topology!r}: expected '<generation>:<AxB[xC]>', e.g. "
                     f"'v5e:4x4', 'v4:2x2x1', 'v5p:2x2x2'; generations: {sorted(HBM_BYTES)}")
  gen = m.group(1).strip().lower()
  gen = DEVICE_KINDS.get(m.group(1).strip(), _ALIASES.get(gen, gen))
  if gen not in HBM_BYTES:
    raise ValueError(f"TPU topology {topology!r}: unknown generation {m.group(1)!r}; "
                     f"known: {sorted(HBM_BYTES)} (and aliases {sorted(_ALIASES)})")
  return gen, tuple(int(d) for d in m.group(2).split("x"))


@functools.lru_cache(maxsize=None)
def tpu_devices(topology: str, chip: str | None = None) -> tuple:
  """The compile-only devices of a TPU slice, e.g. `tpu_devices("v5e:2x2")` -> 4 devices.

  Args:
    topology: `<generation>:<chip grid>` as libtpu names it ("v5e:4x4", "v4:2x2x1", "v5p:2x2x4",
      "v6e:8x8", "tpu7x:2x2x1"); "v7x" is accepted for "tpu7x".
    chip: libtpu chip configuration: "megacore" (one device per chip, two TensorCores) or
      "default" (one device per TensorCore). None: "megacore" for v4/v5p, the way a TPU VM
      shows them to JAX, else "default".

  Cached, so meshes built twice for the same slice share device objects (and the jit cache).

  Raises:
    ImportError: libtpu not installed (names the pip requirement).
    ValueError: a topology or chip configuration that libtpu does not know.
    RuntimeError: libtpu refused to load because another process holds its lockfile.
  """
  gen, grid = parse_topology(topology)
  _require_libtpu()
  from jax.experimental import topologies
  name = f"{gen}:{'x'.join(map(str, grid))}"
  chip = chip or ("megacore" if gen in MEGACORE else "default")
  try:
    desc = topologies.get_topology_desc(name, "tpu", chip_config_name=chip)
  except Exception as e:  # libtpu reports INVALID_ARGUMENT / NOT_FOUND as JaxRuntimeError
    if "lockfile" in str(e):
      raise RuntimeError(
          f"libtpu would not load: another process holds /tmp/libtpu_lockfile ({e}). With TPU "
          "chips attached, stop that process; without, start this one with "
          "ALLOW_MULTIPLE_LIBTPU_LOAD=1") from e
    raise ValueError(f"TPU topology {topology!r} (chip config {chip!r}): libtpu refused it: "
                     f"{e}") from e
  return tuple(desc.devices)


def tpu_mesh(topology: str, axes: Sequence[tuple[str, int]],
             chip: str | None = None) -> jax.sharding.Mesh:
  """A GSPMD mesh (axis types Auto) of compile-only devices for a TPU slice.

  `tpu_mesh("v5e:2x2", [("data", 2), ("fsdp", -1)])` -> Mesh {data: 2, fsdp: 2} over 4 v5e
  chips, devices ordered by their physical coordinates (`jax.make_mesh`). Use it only to lower
  and compile (`compile_report`): arrays cannot be placed on these devices.

  Args:
    topology: see `tpu_devices`.
    axes: `[(name, size), ...]`; one size may be -1 (the rest of the devices).
    chip: see `tpu_devices`.

  Raises:
    ImportError: libtpu not installed (names the pip requirement).
    ValueError: unknown topology; axis sizes that do not multiply to (or divide) the device count.
  """
  devices = tpu_devices(topology, chip)
  try:
    return sharding.make_mesh(axes, devices=list(devices))
  except ValueError as e:
    raise ValueError(f"TPU topology {topology!r} has {len(devices)} devices "
                     f"({devices[0].device_kind}): {e}") from e


def devices_per_chip(devices) -> int:
  """How many JAX devices share one chip (2 for v2/v3/TPU7x, or v4/v5p without megacore)."""
  counts: dict = {}
  for d in devices:
    coords = getattr(d, "coords", None)
    if coords is None:
      return 1
    key = (getattr(d, "slice_index", 0), tuple(coords))
    counts[key] = counts.get(key, 0) + 1
  return max(counts.values(), default=1)


def device_hbm_bytes(devices) -> int | None:
  """Nominal HBM of one device of `devices` (a TPU slice), bytes; None when not a known TPU."""
  devices = list(devices)
  gen = DEVICE_KINDS.get(getattr(devices[0], "device_kind", "")) if devices else None
  if gen is None:
    return None
  return HBM_BYTES[gen] // devices_per_chip(devices)


def _executable_devices(compiled) -> list:
  for tree in (compiled.input_shardings, compiled.output_shardings):
    for s in jax.tree.leaves(tree):
      if isinstance(s, jax.sharding.Sharding):
        return sorted(s.device_set, key=lambda d: d.id)
  return []


def collective_counts(hlo_text: str) -> dict[str, int]:
  """Collective ops in an (optimized) HLO module's text, e.g. `{"all-gather": 4, ...}`.

  Async pairs (`all-gather-start`/`-done`) count once. XLA:TPU writes a reduce-scatter as a
  fusion calling `%all-reduce-scatter` (an all-reduce and a dynamic slice inside): it counts
  as one reduce-scatter, and its inner all-reduce as one all-reduce.
  """
  counts = {name: 0 for name in _COLLECTIVES}
  for m in _COLLECTIVE_RE.finditer(hlo_text):
    counts[m.group(1)] += 1
  counts["reduce-scatter"] += len(_TPU_REDUCE_SCATTER_RE.findall(hlo_text))
  return counts


def compile_report(lowered_or_jitted: Any, *abstract_args, hbm_bytes: int | None = None,
                   **abstract_kwargs) -> dict:
  """Compile a step (for a TPU mesh from `tpu_mesh`, or any backend) and report its memory.

  Args:
    lowered_or_jitted: a jitted function (lowered here with `abstract_args`, usually
      `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))` pytrees), a
      `jax.stages.Lowered`, or an already `jax.stages.Compiled` executable.
    *abstract_args, **abstract_kwargs: the arguments to lower with (jitted functions only).
    hbm_bytes: memory of one device to check against; default: the nominal HBM of the
      devices' TPU generation (`HBM_BYTES`, divided among the devices of a chip).

  Returns:
    A JSON-serialisable dict. All sizes are bytes *per device* (the SPMD program each device
    runs), from XLA's `memory_analysis()`:
      argument_bytes, output_bytes, temp_bytes, alias_bytes (outputs written into donated
      arguments), generated_code_bytes, host_bytes (host-memory args + outputs + temps - aliases,
      for offloading);
      total_bytes = argument + output + temp - alias (what is live at once, the MaxText figure);
      peak_bytes = the compiler's own peak (`peak_memory_in_bytes`; None if not reported);
      required_bytes = max(total_bytes, peak_bytes) + generated_code_bytes (conservative);
      hbm_bytes, fits (required <= hbm; None if hbm unknown), headroom_bytes;
      flops, bytes_accessed (per device, from `cost_analysis()`; None if not available);
      collectives: counts of collective ops in the optimized HLO (`collective_counts`);
      device_kind, num_devices, devices_per_chip; lower_seconds, compile_seconds (wall clock).

  Raises:
    TypeError: `lowered_or_jitted` is none of the three.
    RuntimeError: the backend gives no memory analysis.
  """
  lower_s = compile_s = 0.0
  obj = lowered_or_jitted
  if not isinstance(obj, (jax.stages.Lowered, jax.stages.Compiled)):
    if not hasattr(obj, "lower"):
      raise TypeError(f"compile_report: expected a jitted function, a Lowered or a Compiled, "
                      f"got {type(obj).__name__}")
    t0 = time.perf_counter()
    obj = obj.lower(*abstract_args, **abstract_kwargs)
    lower_s = time.perf_counter() - t0
  elif abstract_args or abstract_kwargs:
    raise TypeError("compile_report: arguments are only for a jitted function; a Lowered or "
                    "Compiled already has its own")
  if isinstance(obj, jax.stages.Lowered):
    t0 = time.perf_counter()
    obj = obj.compile()
    compile_s = time.perf_counter() - t0
  compiled = obj

  mem = compiled.memory_analysis()
  if isinstance(mem, (list, tuple)):
    mem = mem[0] if mem else None
  if mem is None:
    raise RuntimeError("compile_report: this backend reports no memory analysis")
  get = lambda name: int(getattr(mem, name, 0) or 0)
  report = {
      "argument_bytes": get("argument_size_in_bytes"),
      "output_bytes": get("output_size_in_bytes"),
      "temp_bytes": get("temp_size_in_bytes"),
      "alias_bytes": get("alias_size_in_bytes"),
      "generated_code_bytes": get("generated_code_size_in_bytes"),
      "host_bytes": (get("host_argument_size_in_bytes") + get("host_output_size_in_bytes") +
                     get("host_temp_size_in_bytes") - get("host_alias_size_in_bytes")),
  }
  report["total_bytes"] = (report["argument_bytes"] + report["output_bytes"] +
                           report["temp_bytes"] - report["alias_bytes"])
  report["peak_bytes"] = get("peak_memory_in_bytes") or None
  report["required_bytes"] = (max(report["total_bytes"], report["peak_bytes"] or 0) +
                              report["generated_code_bytes"])

  devices = _executable_devices(compiled)
  if hbm_bytes is None and devices:
    hbm_bytes = device_hbm_bytes(devices)
  report["hbm_bytes"] = hbm_bytes
  report["fits"] = None if hbm_bytes is None else report["required_bytes"] <= hbm_bytes
  report["headroom_bytes"] = None if hbm_bytes is None else hbm_bytes - report["required_bytes"]

  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends raise instead of returning nothing
    cost = None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  cost = cost or {}
  report["flops"] = float(cost["flops"]) if "flops" in cost else None
  report["bytes_accessed"] = float(cost["bytes accessed"]) if "bytes accessed" in cost else None

  report["collectives"] = collective_counts(compiled.as_text() or "")
  report["device_kind"] = devices[0].device_kind if devices else None
  report["num_devices"] = len(devices)
  report["devices_per_chip"] = devices_per_chip(devices) if devices else None
  report["lower_seconds"] = round(lower_s, 3)
  report["compile_seconds"] = round(compile_s, 3)
  return report


def format_report(report: dict) -> str:
  """One screen of `compile_report` output, sizes in MiB per device."""
  mib = lambda b: "-" if b is None else f"{b / (1 << 20):,.1f} MiB"
  fits = {True: "fits", False: "DOES NOT FIT", None: "HBM unknown"}[report["fits"]]
  lines = [
      f"{report['num_devices']} x {report['device_kind']}: {fits} "
      f"(required {mib(report['required_bytes'])} of {mib(report['hbm_bytes'])} per device)",
      f"  arguments {mib(report['argument_bytes'])}  outputs {mib(report['output_bytes'])}  "
      f"temps {mib(report['temp_bytes'])}  aliased {mib(report['alias_bytes'])}  "
      f"code {mib(report['generated_code_bytes'])}",
      f"  live total {mib(report['total_bytes'])}  compiler peak {mib(report['peak_bytes'])}",
  ]
  if report["flops"] is not None:
    lines.append(f"  {report['flops']:.3g} FLOPs per device per call")
  used = {k: v for k, v in report["collectives"].items() if v}
  lines.append(f"  collectives {used or 'none'}; compiled in {report['compile_seconds']:.2f} s")
  return "\n".join(lines)


def compile_for_topology(cfg, topology: str, chip: str | None = None) -> dict:
  """Ahead-of-time compile the train step of `cfg` for a TPU slice this machine does not have
  (libtpu compile-only devices, above) and return `compile_report` (bytes per device, HBM,
  `fits`, FLOPs, collectives). The model comes from `system.build.abstract_model` (all
  towers "random" with explicit sizes): nothing is loaded, nothing allocated.

  Raises: ConfigError (mesh / batch / model config), ImportError (libtpu missing).
  """
  try:
    mesh = tpu_mesh(topology, [(str(n), int(s)) for n, s in cfg.mesh.axes], chip=chip)
  except ValueError as e:
    raise ConfigError(f"mesh on {topology}: {e}") from None
  config_lib.validate(cfg, mesh, data=False)
  rules = sharding.check_rules(config_lib.normalized_axis_rules(cfg), mesh)
  model = abstract_model(cfg)
  tx, schedule = make_optimizer(cfg.optim, int(cfg.train.total_steps))
  shapes = abstract_state(model, tx, mesh, rules, log_fn=lambda _: None)
  step = jit_train_step(model, cfg, tx, schedule, shapes, mesh, rules)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=NamedSharding(mesh, PartitionSpec()))
  lowered = step.lower(shapes.state, batch_shapes(cfg, model, mesh, rules), rng)
  report = compile_report(lowered)
  report.update(topology=topology, mesh=dict(mesh.shape),
                num_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(
                    shapes.state.params))))
  return report
