"""Training: the data layer every trainer shares (`data`, `images`, `captions`, `latents`) and the trainers."""
