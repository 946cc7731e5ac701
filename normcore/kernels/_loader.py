"""Build ``csrc/*.cpp`` once per machine, load the module once per process, and switch it.

``norm_kernels.cpp`` is the Python module; each ``types_*.cpp`` holds the kernels of one
storage type, and ``tensors.cpp`` the normalization entry points, which take torch tensors:
the one unit built against torch's headers (in torch's C++ standard) and linked to its
libraries. All of them compile at once, then link into one shared library, which goes
to ``$TORCH_EXTENSIONS_DIR`` (torch's directory for compiled extensions,
``~/.cache/torch_extensions`` by default) under ``normcore_<key>/``. The key hashes the
sources, the compiler flags, the Python ABI, torch's version and place, and the CPU's
feature flags (``-march=native``): a new source, interpreter, torch or machine builds anew
(20-60 seconds, depending on the cores), anything else loads the cached file in
milliseconds. A build
works in a temporary folder and renames the library into place, so concurrent processes
(test workers, service replicas) never see half a library and never wait on a lock that a
killed process left behind.

If there is no compiler or the build fails, one warning is logged and normcore keeps using
its plain torch path; nothing raises.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger("normcore.kernels")

SOURCES = Path(__file__).with_name("csrc")  # translation units and the headers they include
NAME = "normcore_kernels"  # the module name compiled into the source (PyInit_normcore_kernels)
COMPILERS = ("c++", "g++", "clang++")
FLAGS = (
    "-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-fPIC",
    "-fvisibility=hidden", "-fopenmp",
)
LINK_FLAGS = ("-shared", "-fopenmp")
TORCH_UNIT = "tensors.cpp"  # compiled with torch's headers, in torch's C++ standard
TORCH_STD = "-std=c++20"
TORCH_LIBRARIES = ("-lc10", "-ltorch_cpu", "-ltorch_python")
BUILD_TIMEOUT_S = 300


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded; normcore falls back to torch."""


class _State:
    enabled = True
    module: ModuleType | None = None  # loaded extension
    failure: str | None = None  # why it could not be loaded (then it is not tried again)
    active: ModuleType | None = None  # module if enabled, else None: the hot path's read


_state = _State()
_lock = threading.Lock()


def ops() -> ModuleType | None:
    """The kernels extension, built or loaded on first use; None when off or unavailable."""
    active = _state.active
    if active is not None or not _state.enabled or _state.failure is not None:
        return active
    return _load()


def usable() -> bool:
    """Whether ``ops()`` may give the kernels: False once they are switched off or failed to
    build, so callers can skip their checks of an input (the torch path's overhead)."""
    return _state.active is not None or (_state.enabled and _state.failure is None)


def enabled() -> bool:
    """Whether normcore may use the kernels (they may still be unavailable)."""
    return _state.enabled


def set_enabled(flag: bool) -> bool:
    """Turn the kernels on or off for the whole process; returns the previous setting.

    Off, every call takes the plain torch path of ``normcore.functional``.
    """
    with _lock:
        previous, _state.enabled = _state.enabled, bool(flag)
        _state.active = _state.module if _state.enabled else None
    return previous


def warm_up() -> bool:
    """Build (if needed) and load the kernels now rather than on first use.

    Returns whether the fast path is in use: False when it is switched off or could not be
    built (the reason was logged once).
    """
    return ops() is not None


def _load() -> ModuleType | None:
    with _lock:
        if _state.module is None and _state.failure is None:
            try:
                _state.module = _import(build())
            except (KernelBuildError, OSError, ImportError, subprocess.SubprocessError) as exc:
                _state.failure = str(exc)
                log.warning("normcore kernels unavailable, using the torch path: %s", exc)
        _state.active = _state.module if _state.enabled else None
        return _state.active


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        import platform

        return f"{platform.machine()} {platform.processor()}"


def build_directory() -> Path:
    """Where this machine's build of the current source lives."""
    key = hashlib.sha256()
    sources = [p.read_bytes() for p in sorted(SOURCES.iterdir()) if p.suffix in (".cpp", ".h")]
    import torch

    for part in (*sources, " ".join(FLAGS + LINK_FLAGS + TORCH_LIBRARIES).encode(),
                 sys.version.encode(), str(sysconfig.get_config_var("EXT_SUFFIX")).encode(),
                 torch.__version__.encode(), torch.__file__.encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _default_root()
    return Path(root) / f"normcore_{key.hexdigest()[:16]}"


def _default_root() -> str:
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def build() -> Path:
    """Compile the kernels unless this machine's build is cached; returns the library."""
    directory = build_directory()
    target = directory / f"{NAME}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if target.exists():
        return target
    compiler = next((c for c in map(shutil.which, COMPILERS) if c), None)
    if compiler is None:
        raise KernelBuildError(f"no C++ compiler found (tried {', '.join(COMPILERS)})")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{NAME}-", dir=directory) as scratch:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        include = f"-I{sysconfig.get_paths()['include']}"
        torch_compile, torch_link = _torch_flags()
        objects = []
        compiles = []
        for unit in sorted(SOURCES.glob("*.cpp")):  # all at once: one per core
            objects.append(str(Path(scratch) / f"{unit.stem}.o"))
            flags = [*FLAGS, include]
            if unit.name == TORCH_UNIT:
                flags = [TORCH_STD if f.startswith("-std=") else f for f in flags]
                flags += torch_compile
            compiles.append([compiler, *flags, "-c", str(unit), "-o", objects[-1]])
        _run_all(compiles, deadline)
        tmp = str(Path(scratch) / "module.so")
        _run_all([[compiler, *objects, *LINK_FLAGS, *torch_link, "-o", tmp]], deadline)
        os.replace(tmp, target)  # atomic: readers see no file or the whole file
    return target


def _torch_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for torch's headers and libraries, as its own extensions use."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile = [*(f"-I{p}" for p in include_paths()), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    link = [*(f"-L{p}" for p in library_paths()),
            *(f"-Wl,-rpath,{p}" for p in library_paths()), *TORCH_LIBRARIES]
    return compile, link


def _run_all(commands: list[list[str]], deadline: float) -> None:
    """Run the commands side by side; KernelBuildError with the first failure's output."""
    running = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for c in commands]
    try:
        for command, process in zip(commands, running, strict=True):
            _, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
            if process.returncode != 0:
                raise KernelBuildError(
                    f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-2000:]}"
                )
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
