"""Where code runs and in which precision: device, CPU capabilities, autocast, and the
environment record written beside every measurement.

This module sits below everything that computes (training, sampling, evaluation, benchmarks,
the study, the web page) and imports nothing else of the package but its errors, the names of
its choices (:mod:`minidiff.settings`) and the allocator's state (:mod:`minidiff.allocator`).

bf16 pays on a CPU only where it is native (AVX512-BF16 or AMX); elsewhere oneDNN emulates it at
about 1% of the fp32 speed. ``--precision auto`` therefore asks what torch will actually run, not
only what the silicon offers: the CPU's flags, ATen's dispatch level
(``ATEN_CPU_CAPABILITY``) and oneDNN's ISA limit (``ONEDNN_MAX_CPU_ISA``), so that
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` makes a bf16 CPU behave, and choose, like
an AVX2-only one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from . import __version__
from .allocator import freed_memory_kept
from .errors import MinidiffError
from .settings import DEVICES, PRECISIONS, check_choice

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above which bf16 runs natively
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                     "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX",
                     "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT")


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a device; ``cuda`` without a GPU is an error."""
    check_choice("device", name, DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MinidiffError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of ``/proc/cpuinfo`` (read once per field), None off Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_model() -> str | None:
    """``family F, model M`` of /proc/cpuinfo, None off Linux: what tells an AMD Zen 3 (family
    25, model 1) from a Zen 4 (25, 17), which share the model name "AMD EPYC"."""
    family, model = _cpuinfo("cpu family"), _cpuinfo("model\t")
    return None if family is None or model is None else f"family {family}, model {model}"


def cpu_capability() -> str:
    """ATen's vector dispatch level (``AVX512``, ``AVX2``, ``DEFAULT``, ...); it follows
    ``ATEN_CPU_CAPABILITY``."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_bf16_native() -> bool:
    """True when bf16 matmuls and convolutions run natively on this CPU as torch is set up:
    the CPU has AVX512-BF16 or AMX-BF16, ATen dispatches AVX-512 and oneDNN may use them."""
    flags = _cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    if not cpu_capability().startswith("AVX512"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in _ONEDNN_BF16_ISAS:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 path
        return False


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 is native on ``device`` (a CUDA GPU that supports it, or see
    :func:`cpu_bf16_native`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_native()


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where bf16 is native on ``device``, else ``fp32``; an explicit
    ``fp32``/``bf16`` is kept (bf16 on a CPU without it is correct but ~100x slower)."""
    check_choice("precision", name, PRECISIONS)
    if name != "auto":
        return name
    return "bf16" if bf16_native(device) else "fp32"


def autocast_context(device: torch.device | str, precision: str):
    """bf16 autocast when ``precision`` is ``bf16``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_class() -> str:
    """One line naming what decides speed here, e.g. ``AVX512, bf16 native``."""
    return f"{cpu_capability()}, bf16 {'native' if cpu_bf16_native() else 'emulated'}"


def environment(device: torch.device | None = None) -> dict:
    """What every result records about where it was measured."""
    device = device or torch.device("cpu")
    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "cpu": cpu_name(), "cpu_model": cpu_model(), "cpu_capability": cpu_capability(),
           "bf16_native": cpu_bf16_native(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(),
           "minidiff": __version__, "malloc_kept": freed_memory_kept()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def environment_line(env: dict | None = None) -> str:
    """:func:`environment` as the one line a report prints under its title."""
    env = env or environment()  # a record from before a field existed prints without it
    cls = ""
    if "cpu_capability" in env:  # e.g. " (family 25, model 1; AVX2, bf16 emulated)"
        bf16 = f"{env['cpu_capability']}, bf16 {'native' if env.get('bf16_native') else 'emulated'}"
        cls = f" ({env['cpu_model']}; {bf16})" if env.get("cpu_model") else f" ({bf16})"
    torch_ = f", torch {env['torch']}" if "torch" in env else ""
    return f"{env['date']}, {env['cpu']}{cls}, {env['threads']} threads{torch_}"


class Timing(NamedTuple):
    seconds: float  # the median of the timed calls
    warmup_seconds: float  # the untimed warm-up call (0 without one)
    result: Any  # what the last timed call returned


def timed(fn: Callable[[], Any], repeats: int = 1, warmup: Callable[[], Any] | None = None
          ) -> Timing:
    """Wall time of ``fn``: the median of ``repeats`` calls, after one untimed call of ``warmup``
    (often ``fn`` itself: it pays kernel selection, allocation and any compilation)."""
    first = 0.0
    if warmup is not None:
        t0 = time.perf_counter()
        warmup()
        first = time.perf_counter() - t0
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), first, result)


class CompiledOrEager(torch.nn.Module):
    """``torch.compile`` of a noise predictor that falls back to eager execution, once and with a
    note, when compiling fails on this machine (no C++ compiler, unsupported backend...) or when
    its first output disagrees with eager's.

    The first compiled call is checked against the eager network on the same input: seen here,
    Inductor's AVX2 code for this U-Net returned NaN on an AVX-512 CPU told to dispatch AVX2
    (``ATEN_CPU_CAPABILITY=avx2``), so a wrong compiled kernel must cost one check, never a
    grid of broken images. The graph is compiled for the first batch size seen; smaller batches
    (a last partial one) are padded to it inside ``forward`` so they reuse that graph, and under
    ``torch.inference_mode`` every input reaches it as an inference tensor, so no guard fails.
    """

    TOLERANCE = 0.05  # relative RMS difference; bf16 autocast alone stays near 1e-2

    def __init__(self, model: torch.nn.Module, warn: Callable[[str], None] | None = None):
        super().__init__()
        self.model, self.warn, self.failed, self.batch = model, warn, False, None
        self.checked = False
        self.compiled = torch.compile(model, dynamic=False)

    def _fall_back(self, why: str) -> None:
        self.failed = True
        (self.warn or print)(f"note: torch.compile {why}; running eagerly")

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t, y=None):
        if not self.failed:
            n = x.shape[0]
            self.batch = self.batch or n
            pad = self.batch - n
            if pad > 0:
                x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
                t = torch.cat([t, t[:1].expand(pad)])
                y = None if y is None else torch.cat([y, y[:1].expand(pad)])
            if torch.is_inference_mode_enabled():  # inference tensors only: a padded batch's
                # new t beside a full batch's view of the schedule was a guard failure, and a
                # second compile of the same graph (half of --compile's cost)
                x, t, y = (v if v is None or v.is_inference() else v.clone() for v in (x, t, y))
            try:
                out = self.compiled(x, t, y)
            except Exception as e:  # compiler back-ends raise many types; eager is always right
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                self._fall_back(f"failed ({msg})")
                return self.model(x[:n], t[:n], None if y is None else y[:n])
            if self.checked:
                return out[:n]
            self.checked = True
            ref = self.model(x, t, y)
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
            if torch.isfinite(out).all() and err.item() <= self.TOLERANCE:
                return out[:n]
            self._fall_back(f"disagreed with eager execution (relative difference "
                            f"{err.item():.3g})")
            return ref[:n]
        return self.model(x, t, y)
