"""lowrankclone: Low-Rank Clone distillation of Hugging Face causal LMs (arXiv 2505.12781)."""

__version__ = "0.1.0"
