"""Decoding: beam / greedy search for seq2seq generators and the RAG decoders."""
