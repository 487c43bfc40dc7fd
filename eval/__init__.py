"""Evaluations: perplexity of causal LMs, image-classifier accuracy, and the shared helpers they use."""
