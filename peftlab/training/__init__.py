"""Training a recipe: the loop (:class:`FineTuneRecipe`) over a typed :class:`TrainState`.

    finetune.py  the recipe class: setup, resume, train_epoch/step, evaluate, save_checkpoint, finish
    state.py     TrainState, what a checkpoint saves
    launch.py    the accelerator, the process group, threads, the run folder's state
    optim.py     AdamW parameter groups and the learning-rate schedule
"""

from .finetune import FineTuneRecipe, train
from .state import TrainState

__all__ = ["FineTuneRecipe", "TrainState", "train"]
