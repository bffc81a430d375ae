"""The recipes, installed as the package ``kvshrink_recipes`` (see pyproject.toml) so commands find them anywhere."""
