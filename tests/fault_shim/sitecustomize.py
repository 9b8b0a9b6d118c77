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
* ``PEFTLAB_TEST_FAULT=enospc_at_checkpoint:N``: writing checkpoint step-N fails as safetensors fails
  on a full disk.
* ``PEFTLAB_TEST_FAULT=dump_grads:PATH``: at the first optimizer step every trainable gradient is
  written to ``PATH.rank<R>.safetensors`` and the process ends.

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
    n = int(arg) if arg.isdigit() else 0
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
                def loss_sum(self, model, batch):
                    loss = super().loss_sum(model, batch)
                    calls["n"] += 1
                    return loss + float("inf") if calls["n"] == n else loss

            Faulty.__name__ = cls.__name__
            return Faulty

        trainer.get_task_class = get_task_class
    elif kind == "enospc_at_checkpoint":
        original_save_file = checkpoint.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if os.path.basename(os.path.dirname(str(filename))).startswith(f".tmp-step-{n:06d}."):
                from safetensors import SafetensorError

                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return original_save_file(tensors, filename, *args, **kwargs)

        checkpoint.save_file = save_file
    elif kind == "dump_grads":
        _dump_grads_at_first_step(trainer, arg)
    else:
        raise ValueError(f"PEFTLAB_TEST_FAULT: unknown fault {fault!r}")


def _dump_grads_at_first_step(trainer, path: str) -> None:
    """At the first optimizer step (after the accumulation, DDP's all-reduce and any clipping), write
    every trainable gradient to PATH.rank<R>.safetensors and end the process."""
    original = trainer.make_optimizer

    def make_optimizer(model, trainable, *args, **kwargs):
        optimizer = original(model, trainable, *args, **kwargs)

        def step(*a, **k):
            from safetensors.torch import save_file

            grads = {n: p.grad.detach().clone().contiguous() for n, p in trainable.items() if p.grad is not None}
            save_file(grads, f"{path}.rank{os.environ.get('RANK', '0')}.safetensors")
            os._exit(0)

        optimizer.step = step
        return optimizer

    trainer.make_optimizer = make_optimizer


if os.environ.get("PEFTLAB_TEST_FAULT"):
    _install(os.environ["PEFTLAB_TEST_FAULT"])
