"""peftlab: parameter-efficient fine-tuning recipes, benchmarks and deployable merges.

Everything the CLI does is a plain Python call::

    import peftlab
    recipe = peftlab.load_recipe("recipes/lora_ner.yaml", ["train.epochs=1"])
    metrics = peftlab.train(recipe)
"""

from ._version import __version__
from .errors import PeftlabError

# Imported on first use, so that `import peftlab` (and `peftlab --help`) does not import torch.
_LAZY = {"available_methods": "api", "load_recipe": "api", "register_method": "api", "train": "api",
         "validate": "api", "Method": "methods"}

__all__ = ["Method", "PeftlabError", "__version__", "available_methods", "load_recipe", "register_method",
           "train", "validate"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
