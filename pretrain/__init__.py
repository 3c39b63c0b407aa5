"""From-scratch half of the suite: tokenizer, corpus preparation, the Llama model, pretraining, export."""
