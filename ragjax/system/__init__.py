"""A RAG system from a config: towers, tokenizers, generator inputs, retrieval feeding."""
