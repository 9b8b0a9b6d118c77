"""Deployable checkpoints from finished runs.

    merge.py   `peftlab merge`: the method folded into plain transformers weights, verified
    combine.py `peftlab merge --combine`: several LoRA runs combined (peft), merged, verified per source
    export.py  `peftlab export`: any run packaged (method weights + a reference to the base)
    verify.py  the comparison with the run and the thresholds of each kind of merge
    card.py    the model cards (README.md) of both
    cli.py     the subcommands
"""

from .combine import combine
from .export import EXPORT_FILE, export
from .merge import MERGE_FILE, merge
from .verify import THRESHOLDS, compare_models, task_metrics

__all__ = ["EXPORT_FILE", "MERGE_FILE", "THRESHOLDS", "combine", "compare_models", "export", "merge", "task_metrics"]
