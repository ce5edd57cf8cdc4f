"""Text in: corpora, question sets, tokenization, synthetic data."""
