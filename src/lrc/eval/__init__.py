"""Evaluating models: held-out perplexity of many models, lm-eval tasks (and the shipped offline task), tables."""
