"""``export(run_dir, out)``: any run (mergeable or not) packaged for ``peftlab predict``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .._version import __version__
from ..atomicio import atomic_dir, write_json, write_text
from ..outputs import mark
from ..backbones import resolve_backbone
from ..errors import PeftlabError, VerificationError
from ..runs import MODEL_DIR, load_run
from ..util import default_device, is_bnb_model
from .card import export_card
from .merge import DEFAULT_VERIFY_EXAMPLES, VERIFY_FILE, PathLike, check_out, load_splits_or_explain, recipe_and_method
from .verify import compare_models, threshold_failures

log = logging.getLogger("peftlab")

EXPORT_FILE = "peftlab_export.json"
EXPORT_FORMAT = "peftlab-export/1"


def export(
    run_dir: PathLike,
    out: PathLike,
    *,
    verify_examples: int = DEFAULT_VERIFY_EXAMPLES,
    overwrite: bool = False,
    ) -> dict:
    """Package a run (any method, mergeable or not) for ``peftlab predict``; returns verify.json.

    The package is a minimal run folder: ``model/`` (the method's weights, safetensors, tokenizer,
    peftlab_method.json), ``recipe.yaml`` (its ``backbone`` section is the reference to the base),
    ``labels.json``, the run's metrics/params, ``peftlab_export.json`` and a README. The base
    backbone is not copied: ``load_run``/``predict`` load it by name and apply the saved method.
    The package is loaded back and checked against the run before it becomes visible.
    """

    run_dir, out = Path(run_dir), Path(out)
    recipe, method = recipe_and_method(run_dir)
    if verify_examples < 1:
        raise PeftlabError("--verify-examples: expected a positive number of validation examples")
    check_out(out, overwrite, [run_dir])
    device = default_device()
    log.info(f"export: loading {run_dir}")
    run = load_run(run_dir, device=device)
    if not is_bnb_model(run.model):
        run.model.to(device)
    rows = load_splits_or_explain(run.task, run_dir).validation[:verify_examples]
    with atomic_dir(out) as tmp:
        shutil.copytree(run_dir / MODEL_DIR, tmp / MODEL_DIR)
        for name in ("recipe.yaml", "labels.json", "metrics.json", "params.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        info = {
            "format": EXPORT_FORMAT,
            "task": run.task.name,
            "method": method.name,
            "can_merge": bool(method.can_merge),
            "base": {
                "name": recipe.backbone.name,
                "revision": recipe.backbone.revision,
                "quantization": recipe.backbone.quantization,
                "dtype": recipe.backbone.dtype,
                "resolved_at_export": resolve_backbone(recipe.backbone),
            },
            "labels": list(run.task.labels),
            "source_run": str(run_dir.resolve()),
            "peftlab_version": __version__,
        }
        write_json(tmp / EXPORT_FILE, info)
        mark(tmp, "export")
        log.info(f"export: verifying the package on {len(rows)} validation example(s)")
        package = load_run(tmp, device=device)
        if not is_bnb_model(package.model):
            package.model.to(device)
        stats = compare_models(run.model, package.model, run.task, run.tokenizer, rows, device)
        thresholds = {"max_abs_logit_diff": 1e-4, "min_agreement": 1.0, "defaults_of": "export",
                      "note": "the package must reproduce the run"}
        failures = threshold_failures(stats, thresholds)
        if failures:
            raise VerificationError(f"{out}: verification failed: the exported package does not reproduce the run: "
                                    f"{'; '.join(failures)}; nothing was written")
        report = {"run": str(run_dir.resolve()), "task": run.task.name, "method": method.name,
                  "backbone": recipe.backbone.name, "quantization": recipe.backbone.quantization,
                  "kind": "export", "split": "validation", **stats, "thresholds": thresholds, "passed": True,
                  "peftlab_version": __version__}
        write_json(tmp / VERIFY_FILE, report)
        write_text(tmp / "README.md", export_card(run, info, report))
    log.info(f"export: wrote {out}")
    return report
