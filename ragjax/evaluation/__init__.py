"""Evaluation: exact match, F1 and answer recall@k of a RAG system."""
