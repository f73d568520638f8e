"""Adapters that change a base model without replacing it (LoRA / LoCon; later hypernetworks)."""
