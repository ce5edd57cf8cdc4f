"""Training input as a pure function of (seed, step): per-host slices of one global batch.

The order of examples is a fresh permutation of the training set each epoch, seeded by
(seed, epoch); the global batch of step s holds flat positions [s * G, (s + 1) * G) of the
concatenated epochs. Process p of P loads only its rows [p * G/P, (p + 1) * G/P) of that batch
and `global_batch_arrays` assembles the global `jax.Array` with
`jax.make_array_from_process_local_data`. A resumed run at step s therefore sees exactly the
batches an uninterrupted run would: nothing replayed, nothing skipped, whatever the number of
processes.
"""
from __future__ import annotations

import jax
import numpy as np


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of `epoch`: a permutation of `[0, num_examples)` `[N]` int64."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def batch_indices(step: int, global_batch: int, num_examples: int, seed: int) -> np.ndarray:
  """Example indices `[global_batch]` of the global batch at `step` (epochs wrap seamlessly)."""
  if num_examples <= 0:
    raise ValueError("no training examples")
  pos = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
  epochs, offsets = np.divmod(pos, num_examples)
  out = np.empty(global_batch, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(num_examples, seed, int(e))[offsets[sel]]
  return out


def local_batch_size(global_batch: int, process_count: int | None = None) -> int:
  """Rows each process loads.

  Raises:
    ValueError: `global_batch` not divisible by the process count.
  """
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} "
                     "processes")
  return global_batch // process_count


def host_batch_indices(step: int, global_batch: int, num_examples: int, seed: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> np.ndarray:
  """This process's share `[global_batch / P]` of `batch_indices(step, ...)`."""
  process_index = jax.process_index() if process_index is None else process_index
  local = local_batch_size(global_batch, process_count)
  return batch_indices(step, global_batch, num_examples, seed)[
      process_index * local:(process_index + 1) * local]


def global_batch_arrays(local: dict, sharding) -> dict:
  """`{name: [G/P, ...] numpy}` on each process -> `{name: [G, ...] jax.Array}` laid out by
  `sharding` (a NamedSharding whose first axis splits the batch)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
