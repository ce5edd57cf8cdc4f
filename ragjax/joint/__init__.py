"""Joint retriever training: index versions, the trainer-side refresh and the indexer."""
