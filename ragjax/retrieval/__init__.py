"""Corpus embedding, MIPS indexes (exact, ScaNN, BM25) and retrieval evaluation."""
