"""Uptrain a converted (GQA/MQA) checkpoint to recover its quality: ``python -m uptrain RECIPE.yaml``.

The GQA paper (Ainslie et al. 2023) uptrains mean-pooled checkpoints for about 5% of the
original pretraining steps; this is that loop, driven by accelerate.
"""

from uptrain.recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
