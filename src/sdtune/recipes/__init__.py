"""Recipes: several steps of the library (generate, train, compare) as one resumable command each."""
