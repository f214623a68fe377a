"""Build and load `kernels.c`, the fused float32 CPU kernels of `--cpu_kernels on`.

Nothing is built or loaded until `load()` is called (by `revjepa.cpu.use_cpu_kernels`). The C
file is compiled once per machine with the system's C compiler (`$CC`, else `cc` or `gcc`)
into a cache folder keyed by the source, the flags, the compiler and the CPU (the code is
built for the CPU it runs on), and loaded with ctypes. Building takes about a second, needs
no torch headers, and links the OpenMP runtime that torch has already loaded, so the kernels
share torch's threads.

Where no compiler is found or the build fails, `load()` raises KernelsUnavailable with a
one-line reason (the caller says it once and uses torch's ops). `REVJEPA_KERNEL_CACHE` moves
the cache (default `~/.cache/revjepa`; a temporary folder when that is not writable).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")
# -ffast-math is not used: on this compiler it would also set flush-to-zero for the whole
# process when the library loads. OpenMP simd pragmas give the vectorised reductions.
# 512-bit vectors where the CPU has them (gcc prefers 256): GELU and the softmax's exp are
# compute-bound, 1.3-1.5x faster with them here (the flag is inert without AVX-512).
COMPILE_FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-fno-math-errno",
    "-fPIC",
    "-std=c11",
]

_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_SIGNATURES = {
    "attention_forward": [_P, _P, _P, _I32, _F, _P, _P, _I64, _I64, _I64, _I64, _F, _I32],
    "attention_backward": [_P, _P, _P, _I32, _F, _P, _P, _I64, _I64, _I64, _I64, _F, _I32],
    "gelu_forward": [_P, _P, _P, _I64, _I64, _I32],
    "gelu_backward": [_P, _P, _P, _P, _P, _P, _I64, _I64, _I32],
    "uniform16": [ctypes.c_uint64, _P, _I64, _I32],
    "softmax_cross_entropy": [_P, _P, _P, _I64, _I64, _I32],
    "residual_forward": [_P, _P, _P, _P, _I32, _F, _P, _I64, _I64, _I32],
    "residual_backward": [_P, _P, _I32, _F, _P, _P, _P, _I64, _I64, _I32],
}

_state: dict[str, object] = {}  # "lib": the loaded library, or None and "error" once tried


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model name and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown-cpu"
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    """Where built libraries are kept."""
    env = os.environ.get("REVJEPA_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "revjepa"


def build(compiler: str, out_dir: Path) -> Path:
    """Compile SOURCE into out_dir (an existing build of the same key is reused). The file
    appears atomically, so concurrent processes (one per rank) never load a partial one."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(COMPILE_FLAGS), version, _cpu_id()]).encode()
    ).hexdigest()[:16]
    target = out_dir / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        run = dict(capture_output=True, text=True, check=True)
        subprocess.run([compiler, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)], **run)
        subprocess.run([compiler, "-shared", "-fopenmp", str(obj), "-o", str(lib)], **run)
        os.replace(lib, target)
    return target


class KernelsUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message is one line saying why."""


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    try:
        if compiler is None:
            raise OSError("no C compiler found (cc, gcc or $CC)")
        try:
            built = build(compiler, cache_dir())
        except OSError:  # e.g. a read-only home directory: build for this process only
            built = build(compiler, Path(tempfile.mkdtemp(prefix="revjepa-kernels-")))
        lib = ctypes.CDLL(str(built))
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        first = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
        raise KernelsUnavailable(f"the C kernels were not built: {first}") from exc
    return lib


def load() -> ctypes.CDLL:
    """The kernels, built and loaded at the first call (the outcome is kept for the process:
    a failure is not retried). Raises KernelsUnavailable."""
    if "lib" not in _state:
        try:
            _state["lib"] = _load()
        except KernelsUnavailable as exc:
            _state["lib"], _state["error"] = None, exc
    if _state["lib"] is None:
        raise _state["error"]  # type: ignore[misc]
    return _state["lib"]  # type: ignore[return-value]


def library() -> ctypes.CDLL | None:
    """`load()`, or None where the kernels cannot be built here (no message)."""
    try:
        return load()
    except KernelsUnavailable:
        return None


def loaded() -> ctypes.CDLL:
    """The library loaded by an earlier `load()`; never builds (for the fused ops, which only
    run once `use_cpu_kernels` has loaded it)."""
    lib = _state.get("lib")
    if lib is None:
        raise RuntimeError(
            "the CPU kernels are not loaded (revjepa.cpu.use_cpu_kernels loads them)"
        )
    return lib  # type: ignore[return-value]
