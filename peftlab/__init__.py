"""peftlab: parameter-efficient fine-tuning recipes, benchmarks and deployable merges.

Everything the CLI does is a plain Python call::

    import peftlab
    recipe = peftlab.load_recipe("recipes/lora_ner.yaml", ["train.epochs=1"])
    metrics = peftlab.train(recipe)
"""

__version__ = "0.1.0"

from .api import available_methods, load_recipe, register_method, train, validate  # noqa: E402,F401
from .errors import PeftlabError  # noqa: E402,F401
from .methods import Method  # noqa: E402,F401

__all__ = [
    "Method",
    "PeftlabError",
    "available_methods",
    "load_recipe",
    "register_method",
    "train",
    "validate",
]
