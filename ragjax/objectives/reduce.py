"""The batch reductions every objective shares: a per-example loss `[B]` to what is optimised."""
from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("mean", "sum", "none")


def check_reduce(reduce: str, allowed=REDUCTIONS) -> None:
  """Raises: ValueError naming `reduce` and the allowed values."""
  if reduce not in allowed:
    raise ValueError(f"reduce must be one of {allowed}, got {reduce!r}")


def reduce_loss(loss_b: jax.Array, reduce: str, denominator=None) -> jax.Array:
  """`loss_b` `[B]` float: "none" -> itself, "sum" -> the sum, "mean" -> sum / B, any other
  (checked) mode -> sum / `denominator` (e.g. Atlas's element mean sum / (B * K), or a token
  mean)."""
  if reduce == "none":
    return loss_b
  total = jnp.sum(loss_b)
  if reduce == "sum":
    return total
  if reduce == "mean":
    return total / loss_b.shape[0]
  return total / denominator
