"""peftlab: parameter-efficient fine-tuning recipes, benchmarks and deployable merges.

Everything the CLI does is a plain Python call::

    import peftlab
    recipe = peftlab.load_recipe("recipes/lora_ner.yaml", ["train.epochs=1"])
    metrics = peftlab.train(recipe)
"""

__version__ = "0.1.0"

import logging as _logging  # noqa: E402

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that the optional `kernels` package of its
# packed CPU 4-bit inference format is missing; peftlab keeps 4-bit layers off that format
# (backbones.keep_4bit_layout), so the warning is only noise on every command's stderr.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in str(r.msg))

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
