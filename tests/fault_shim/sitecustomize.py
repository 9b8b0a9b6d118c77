"""Fault injection for subprocess tests, loaded through PYTHONPATH=tests/fault_shim.

Python imports ``sitecustomize`` at start-up, so ``python -m peftlab.cli train ...`` runs unchanged
with these faults (nothing in peftlab knows about them):

* ``PEFTLAB_TEST_HIDE=bitsandbytes[,pkg...]``: the packages look uninstalled
  (``import`` fails and ``importlib.util.find_spec`` returns None).
* ``PEFTLAB_TEST_FAULT=pause_after_checkpoint:N``: after checkpoint step-N is complete, the process
  sleeps so that the test can SIGKILL it there (deterministic "crash right after a checkpoint").
* ``PEFTLAB_TEST_FAULT=pause_in_checkpoint:N``: while step-N is being written (its temporary folder
  holds trainable.safetensors and optimizer.safetensors but not yet rng/state), sleep: the test
  kills the process in the middle of the write.
* ``PEFTLAB_TEST_FAULT=inf_loss_at:N``: the N-th training batch returns an infinite loss.

Each pause first creates the file named by ``PEFTLAB_TEST_MARKER`` (when set), so the test knows
the process has reached the fault.
"""

import os
import sys

for _name in filter(None, os.environ.get("PEFTLAB_TEST_HIDE", "").split(",")):
    sys.modules[_name] = None  # type: ignore[assignment]


def _pause() -> None:
    import time

    marker = os.environ.get("PEFTLAB_TEST_MARKER")
    if marker:
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))
    time.sleep(600)
    os._exit(99)  # never reached when the test kills the process


def _install(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    n = int(arg)
    import peftlab.checkpoint as checkpoint
    import peftlab.training.finetune as trainer

    if kind == "pause_after_checkpoint":
        original_save = trainer.save_checkpoint

        def save_checkpoint(folder, *args, **kwargs):
            out = original_save(folder, *args, **kwargs)
            if os.path.basename(str(folder)) == f"step-{n:06d}":
                _pause()
            return out

        trainer.save_checkpoint = save_checkpoint
    elif kind == "pause_in_checkpoint":
        original_save_file = checkpoint.save_file

        def save_file(tensors, filename, *args, **kwargs):
            out = original_save_file(tensors, filename, *args, **kwargs)
            parent = os.path.basename(os.path.dirname(str(filename)))
            if parent.startswith(f".tmp-step-{n:06d}.") and os.path.basename(str(filename)) == "optimizer.safetensors":
                _pause()
            return out

        checkpoint.save_file = save_file
    elif kind == "inf_loss_at":
        original_get_task_class = trainer.get_task_class
        calls = {"n": 0}

        def get_task_class(name):
            cls = original_get_task_class(name)

            class Faulty(cls):  # type: ignore[misc, valid-type]
                def training_loss(self, model, batch):
                    loss = super().training_loss(model, batch)
                    calls["n"] += 1
                    return loss + float("inf") if calls["n"] == n else loss

            Faulty.__name__ = cls.__name__
            return Faulty

        trainer.get_task_class = get_task_class
    else:
        raise ValueError(f"PEFTLAB_TEST_FAULT: unknown fault {fault!r}")


if os.environ.get("PEFTLAB_TEST_FAULT"):
    _install(os.environ["PEFTLAB_TEST_FAULT"])
