"""Flax modules and weight import."""
