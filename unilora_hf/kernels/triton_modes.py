"""Compiled and interpreted twins of a Triton kernel module, and a low-overhead launcher.

Triton fixes a kernel's mode (compiled or interpreted) when the ``@triton.jit`` decorator runs, and a
kernel's callees are looked up in its module's globals. ``variant(module, interpret, is_interpreted)`` therefore
returns the module itself when its mode matches, else a second instance of the same file executed with
the interpreter switch forced (cached). ``for_device`` picks compiled kernels for CUDA tensors and the
interpreted twin for CPU tensors, the latter only when ``TRITON_INTERPRET=1`` is set (the CI path).

``FastLauncher`` launches a compiled kernel without Triton's per-call argument binding. The first call
for a key goes through ``kernel[grid](...)`` (which compiles or finds the kernel and returns it); later
calls with the same key call the compiled kernel's launcher directly. The key must determine Triton's
specialisation of every argument: the caller passes the exact integer arguments and each tensor's dtype
and 16-byte alignment in it. Any launch hook (a profiler) or an interpreted kernel takes the normal path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch
import triton

_VARIANTS: dict[tuple[str, bool], object] = {}


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value (the opt-in for the CPU path)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def interpreter_switch(interpret: bool):
    """Triton's interpreter switch (the knob and ``TRITON_INTERPRET``) forced to ``interpret`` inside. Both the
    ``@triton.jit`` decorator and the compiler consult it: a compiled kernel launched (and so compiled) while
    the process runs with ``TRITON_INTERPRET=1`` (the CPU tests) must be compiled with the switch off."""
    knobs = getattr(triton, "knobs", None)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        if knobs is not None:
            with knobs.runtime.scope():
                knobs.runtime.interpret = interpret
                yield
        else:
            yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def variant(module, interpret: bool, is_interpreted: bool):
    """``module`` (whose kernels are interpreted iff ``is_interpreted``) with kernels in mode ``interpret``."""
    if is_interpreted == interpret:
        return module
    module_name, file = module.__spec__.name, module.__file__
    key = (module_name, interpret)
    if key not in _VARIANTS:
        package, _, base = module_name.rpartition(".")
        name = f"{package}._{base.lstrip('_')}_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, file)
        twin = importlib.util.module_from_spec(spec)
        with interpreter_switch(interpret):
            spec.loader.exec_module(twin)
        sys.modules[name] = _VARIANTS[key] = twin
    return _VARIANTS[key]


def for_device(module, is_interpreted: bool, device: torch.device | str):
    """The twin of ``module`` for tensors on ``device``: compiled for CUDA; interpreted for CPU,
    only when ``TRITON_INTERPRET=1`` is set (else RuntimeError)."""
    device = torch.device(device)
    if device.type == "cuda":
        return variant(module, False, is_interpreted)
    if not interpreter_enabled():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run them on "
            "CPU tensors in Triton's interpreter"
        )
    return variant(module, True, is_interpreted)


class FastLauncher:
    """Launches of one kernel, the compiled kernel remembered per caller-chosen key.

    ``launch(key, grid, device, *args, **options)`` runs ``kernel[grid](*args, **options)`` (``args``:
    all of the kernel's arguments in declaration order, constexprs included; ``options``: ``num_warps``,
    ``num_stages``) and, when ``key`` is not None, remembers the compiled kernel under it. ``cached(key)``
    returns it while no launch hook (a profiler) is installed, else None, and ``run(compiled, grid0,
    device_index, *args)`` launches it directly on the current stream, skipping Triton's per-call
    binding. The key must determine Triton's specialisation of every argument (integer values, tensor
    dtypes and 16-byte alignment) and the options."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}
        self.direct = type(kernel).__name__ != "InterpretedFunction"
        self._knobs = getattr(triton, "knobs", None)

    def cached(self, key):
        runtime = self._knobs.runtime if self._knobs is not None else None
        if runtime is None or _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            return None
        return self.compiled.get(key)

    @staticmethod
    def run(compiled, grid0: int, device_index: int, *args) -> None:
        stream = torch._C._cuda_getCurrentRawStream(device_index)
        compiled.run(grid0, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)

    def launch(self, key, grid, device: torch.device, *args, **options) -> None:
        if self.direct and interpreter_enabled():  # compiled kernel, CPU tests' switch on: compile with it off
            with torch.cuda.device(device), interpreter_switch(False):
                result = self.kernel[grid](*args, **options)
        else:
            with torch.cuda.device(device) if device.type == "cuda" else _nothing():
                result = self.kernel[grid](*args, **options)
        if key is not None and self.direct and result is not None:
            self.compiled[key] = result


def _hooked(hook) -> bool:
    """Whether a launch hook is installed: a callable, or a non-empty ``HookChain`` (newer triton)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
