"""`lrc export`: a run's student as a Hugging Face folder people can use (weights, tokenizer, chat template,
model card)."""
