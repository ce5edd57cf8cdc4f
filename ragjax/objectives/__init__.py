"""Training objectives: the RAG marginal likelihoods, retriever losses (Atlas, DPR) and
pretraining tasks."""
