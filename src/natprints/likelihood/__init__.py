"""Likelihood scoring: the exact probability that a zoo model wrote a text, and the Bayes ceiling."""

from natprints.likelihood.scorer import TextScore, prefix_loglik, sampling_logits, score_texts

__all__ = ["TextScore", "prefix_loglik", "sampling_logits", "score_texts"]
