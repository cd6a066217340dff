"""Engines: scoring, labelling, generation, log-probabilities and exact retrieval, used by the stages."""
