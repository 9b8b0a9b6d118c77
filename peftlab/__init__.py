"""peftlab: parameter-efficient fine-tuning recipes, benchmarks and deployable merges.

Everything the CLI does is a plain Python call::

    import peftlab
    recipe = peftlab.load_recipe("recipes/lora_ner.yaml", ["train.epochs=1"])
    metrics = peftlab.train(recipe)
"""

from ._version import __version__
from .errors import PeftlabError

# Imported on first use, so that `import peftlab` (and `peftlab --help`) does not import torch.
# (predict and bench are also submodules, whose import would replace such an attribute: peftlab.api has them)
_LAZY = {**{name: "api" for name in ("available_methods", "export", "load_recipe", "merge", "register_method",
                                     "report", "train", "validate")}, "Method": "methods"}

__all__ = ["PeftlabError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'peftlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
