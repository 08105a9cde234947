"""Recipes: whole pipelines made of the stages (prepare -> train -> sample -> ...), one command each."""
