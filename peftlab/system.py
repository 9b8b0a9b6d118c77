"""The operating system's side of a run: cores, resident memory, glibc's allocator, the machine."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def run_threads(num_threads: Optional[int] = None, processes: int = 1) -> int:
    """The CPU threads one process of a run uses: ``train.num_threads`` if set, else the cores
    (``PEFTLAB_NUM_THREADS`` when a bench or sweep running several cells at once sets it) split
    between the run's processes on this machine. Runs and the planner's timed steps both use it."""
    cores = int(os.environ.get("PEFTLAB_NUM_THREADS", "0") or 0) or cpu_cores()
    return num_threads or max(1, cores // max(processes, 1))


def skip_import(name: str) -> bool:
    """Make ``import name`` fail, and ``importlib.util.find_spec(name)`` say it is absent, for the rest
    of this process (Python's documented ``None`` entry in ``sys.modules``); False if already imported.

    For one-recipe processes only: an unquantized training run hides bitsandbytes, which peft imports
    whenever it is installed and whose import loads torch's compiler (``torch._inductor``), resident
    memory that such a run never uses."""
    import sys

    if sys.modules.get(name) is not None:
        return False
    sys.modules[name] = None  # type: ignore[assignment]
    return True


def import_bitsandbytes_uncompiled() -> bool:
    """Import bitsandbytes with the kernels of its default (CPU fallback) backend left uncompiled;
    False if it was already imported (nothing changes) or is not installed.

    That backend wraps them in ``torch.compile`` at import, which loads torch's compiler (about 120
    MiB resident on CPU) and compiles them at first use; bitsandbytes runs the plain functions
    wherever compiling fails, so they compute the same. For one-recipe processes (``peftlab train``,
    ``peftlab plan``): ``torch.compile`` is the identity only while bitsandbytes imports."""
    import importlib
    import importlib.util
    import sys

    import torch

    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return False
    real = torch.compile

    def uncompiled(model: Any = None, **_kwargs: Any) -> Any:
        return model if model is not None else (lambda fn: fn)

    torch.compile = uncompiled
    try:
        importlib.import_module("bitsandbytes")
    finally:
        torch.compile = real
    return True


def prepare_bitsandbytes(quantization: str) -> None:
    """For a one-recipe process, before peft is imported: an unquantized run hides bitsandbytes
    (:func:`skip_import`), a quantized one imports it uncompiled (:func:`import_bitsandbytes_uncompiled`)."""
    if quantization == "none":
        skip_import("bitsandbytes")
    else:
        import_bitsandbytes_uncompiled()


def skip_scipy() -> bool:
    """For a one-recipe process, before transformers is imported (its import caches whether SciPy is
    installed): hide SciPy, which transformers' model code imports for its object-detection losses
    only (about 37 MiB resident that no peftlab run uses). False where it is too late: then nothing
    changes."""
    import sys

    return "transformers" not in sys.modules and skip_import("scipy")


def set_mmap_threshold(mb: float) -> bool:
    """Fix glibc's mmap threshold at ``mb`` MiB (freed large blocks are unmapped, not kept in the heap).

    glibc raises the threshold to the size of every mmapped block freed (up to 32 MiB), after which
    activation-sized tensors come from the heap and their memory stays resident once freed; a fixed
    threshold turns that off. Returns False where there is no glibc ``mallopt`` (nothing changes).
    """
    mallopt = libc_function("mallopt")
    return bool(mallopt(M_MMAP_THRESHOLD, int(mb * 1024 * 1024))) if mallopt is not None else False


def release_free_memory() -> bool:
    """Hand the heap memory glibc keeps after frees (a training step's small tensors) back to the OS
    (``malloc_trim``), so that an evaluation pass starts from what is alive, not from the step's high
    water mark. False where there is no glibc."""
    malloc_trim = libc_function("malloc_trim")
    return bool(malloc_trim(0)) if malloc_trim is not None else False


MADV_DONTNEED = 4  # Linux madvise advice


def madvise_dontneed(start: int, length: int) -> bool:
    """``madvise(start, length, MADV_DONTNEED)``: the pages leave resident memory (anonymous ones
    read back as zeros, unwritten file pages as the file's bytes); False where that fails."""
    import ctypes

    madvise = libc_function("madvise")
    return madvise is not None and madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_DONTNEED) == 0


def drop_clean_file_pages(addresses: "list[int]") -> int:
    """Drop from this process's resident memory the pages of each file mapping that holds one of
    ``addresses`` and has none of its pages written (``Anonymous: 0 kB`` in /proc/self/smaps), so the
    page contents stay the file's and are read back from the page cache when touched again. Returns
    the resident bytes dropped; 0 off Linux.

    A quantized load reads every float weight of the memory-mapped checkpoint to quantize it, and
    those pages stay resident although only the unquantized ones (embeddings, norms) are used again,
    and of the embeddings only the rows of tokens the data has."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    dropped = 0
    for lo, hi, fields in _file_mappings(text):
        if fields.get("Anonymous") == 0 and fields.get("Rss", 0) > 0 and any(lo <= a < hi for a in addresses):
            if madvise_dontneed(lo, hi - lo):
                dropped += fields["Rss"]
    return dropped


def _file_mappings(smaps: str) -> "list[tuple[int, int, dict[str, int]]]":
    """(start, end, {field: bytes}) of each file-backed mapping in a /proc/<pid>/smaps text."""
    out: list[tuple[int, int, dict[str, int]]] = []
    fields: dict[str, int] = {}
    for line in smaps.splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            fields = {}
            if len(parts) >= 6 and parts[5].startswith("/"):
                out.append((lo, hi, fields))
        elif len(parts) == 3 and parts[2] == "kB" and out and out[-1][2] is fields:
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


class TrimBeforeLargeBatches:
    """Hand freed heap memory back to the OS (:func:`release_free_memory`) on the way from small
    batches to a large one.

    A small batch's tensors are under glibc's mmap threshold, so its activations come from the heap,
    which stays resident when they are freed. A large batch then maps its big tensors on top of that
    heap, and that sum is the run's peak. Trimming once, before the first large batch after small ones,
    keeps the peak at what the large batch needs. A run of equal batches (fixed-length windows) never
    trims. "Large" is at least ``fraction`` of the largest batch seen (padded elements)."""

    def __init__(self, enabled: bool, fraction: float = 0.8):
        self.enabled, self.fraction = enabled, fraction
        self.largest, self.last_large = 0, True

    def before(self, size: int) -> bool:
        """Called before each batch of ``size`` padded elements; True when it trimmed."""
        if not self.enabled:
            return False
        self.largest = max(self.largest, size)
        large = size >= self.fraction * self.largest
        trim = large and not self.last_large
        self.last_large = large
        return trim and release_free_memory()


@functools.lru_cache(maxsize=None)
def libc_function(name: str) -> Any:
    """``name`` from the C library, looked up once per process (``find_library`` runs a subprocess,
    and malloc_trim runs before every evaluation); None where the library has no such function."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def memory_bytes(text: object) -> "int | None":
    """``24GiB``, ``1500MiB``, ``2.5G``, ``800M`` or a number of bytes -> bytes; None if it is none of those."""
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
             "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(number)
    except ValueError:
        return None
    unit = raw[len(number):]
    return int(value * units[unit]) if value > 0 and unit in units else None


def _proc_kib(path: str, key: str) -> "int | None":
    """The ``key: N kB`` field of a /proc status file, in bytes; None where there is none."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def available_memory_bytes() -> int:
    """Memory a new allocation can have now without swapping (Linux's MemAvailable: free memory plus
    the page cache it can drop)."""
    found = _proc_kib("/proc/meminfo", "MemAvailable")
    return found if found is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, the high-water mark of its own address space.
    (getrusage's ru_maxrss also keeps the parent's resident size at the fork that started a child, so a
    run launched from a large process would report that process's size.)"""
    found = _proc_kib("/proc/self/status", "VmHWM")
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover
        return peak_rss_bytes()


def machine_info() -> dict:
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cpu = cpu or platform.processor() or platform.machine()
    cores = cpu_cores()
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) * 1024 / 2**30, 1)
    return {
        "cpu": cpu, "cores": cores, "logical_cpus": os.cpu_count(), "memory_gib": mem,
        "platform": platform.platform(), "gpus": gpu_info(),
    }


def gpu_info() -> list[dict]:
    """GPUs as nvidia-smi lists them (the parent never initialises CUDA itself)."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            res = subprocess.run(
                [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            res = None
        if res is not None and res.returncode == 0:
            gpus = []
            for line in res.stdout.strip().splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 3:
                    with contextlib.suppress(ValueError):
                        gpus.append({"name": parts[0], "memory_gib": round(float(parts[1]) / 1024, 1), "driver": parts[2]})
            return gpus
    return []
