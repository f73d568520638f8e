"""Adapters that change a base model without replacing it: LoRA / LoCon, hypernetworks, Textual Inversion
embeddings."""
