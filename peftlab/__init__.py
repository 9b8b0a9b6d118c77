"""peftlab: parameter-efficient fine-tuning recipes, benchmarks and deployable merges.

Everything the CLI does is a plain Python call::

    import peftlab
    recipe = peftlab.load_recipe("recipes/lora_ner.yaml", ["train.epochs=1"])
    metrics = peftlab.train(recipe)
"""

from ._version import __version__
from .api import available_methods, load_recipe, register_method, train, validate
from .errors import PeftlabError
from .methods import Method

__all__ = [
    "Method",
    "PeftlabError",
    "__version__",
    "available_methods",
    "load_recipe",
    "register_method",
    "train",
    "validate",
]
