"""Small, generic helpers shared by the benchmarks under ``bench/``.

- :func:`machine_info` describes the host (CPU model from ``lscpu``, core count, RAM,
  GPU name when CUDA is available) and the software (python, torch, threads).
- :func:`time_fn` runs a callable with warm-up and returns the median wall time of
  the repeats (synchronising CUDA around each call when asked).
- Peak memory: :func:`cuda_peak_bytes` measures one call with the CUDA allocator's
  peak counter. On CPU, the allocator keeps no such counter, so
  :func:`rss_peak_delta_bytes` uses the kernel's high-water mark (``ru_maxrss``) minus
  the resident set size before the call. On Linux the mark is first reset to the
  current size (``/proc/self/clear_refs``); where that is not allowed the value is
  only meaningful for the first big call of a process. Either way, run each
  configuration in a fresh child process (e.g. with :func:`run_child_json`), so that
  memory cached by the allocator from earlier calls does not hide the peak.

Nothing here imports anything from the project, so any benchmark may use it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "machine_info",
    "today",
    "time_fn",
    "time_once",
    "current_rss_bytes",
    "max_rss_bytes",
    "reset_peak_rss",
    "rss_peak_delta_bytes",
    "cuda_peak_bytes",
    "run_child_json",
    "write_json",
]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def today() -> str:
    """The current date as ISO ``YYYY-MM-DD`` (UTC)."""
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def _lscpu() -> Dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def _mem_total_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> Dict[str, Any]:
    """A JSON-able description of the machine and software the benchmark ran on."""
    cpu = _lscpu()
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu.get("Model name", platform.processor() or "unknown"),
        "cpu_count": os.cpu_count(),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "mem_total_gib": None,
    }
    mem = _mem_total_bytes()
    if mem is not None:
        info["mem_total_gib"] = round(mem / 2**30, 1)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            props = torch.cuda.get_device_properties(0)
            info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
    except ImportError:
        info["torch"] = None
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _sync(device: Optional[str]) -> None:
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: Optional[str] = None) -> float:
    """Wall time in seconds of one call of ``fn`` (CUDA is synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_fn(
    fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, device: Optional[str] = None
) -> Dict[str, Any]:
    """Median wall time (seconds) of ``repeats`` calls after ``warmup`` untimed calls.

    Returns ``{"median_s", "min_s", "times_s"}``.
    """
    for _ in range(warmup):
        fn()
    times = [time_once(fn, device) for _ in range(max(1, repeats))]
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    """High-water mark of this process's resident set size (``ru_maxrss``)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_peak_delta_bytes(fn: Callable[[], Any]) -> Dict[str, Any]:
    """Peak resident memory added by one call of ``fn`` (use a fresh process).

    ``peak_delta_bytes`` = high-water mark after the call minus the resident size just
    before it. The mark is reset first where the kernel allows it (``hwm_reset``).
    ``reliable`` is False when the call did not raise the high-water mark (an earlier
    peak hides it; the value is then a lower bound).
    """
    hwm_reset = reset_peak_rss()
    before_rss = current_rss_bytes()
    before_max = max_rss_bytes()
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    after_max = max_rss_bytes()
    return {
        "peak_delta_bytes": max(0, after_max - before_rss),
        "rss_before_bytes": before_rss,
        "maxrss_before_bytes": before_max,
        "maxrss_after_bytes": after_max,
        "reliable": after_max > before_max,
        "hwm_reset": hwm_reset,
        "elapsed_s": elapsed,
    }


def cuda_peak_bytes(fn: Callable[[], Any]) -> Dict[str, Any]:
    """Peak CUDA memory allocated by one call of ``fn`` above what was allocated before."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "peak_delta_bytes": torch.cuda.max_memory_allocated() - base,
        "allocated_before_bytes": base,
        "reliable": True,
        "elapsed_s": elapsed,
    }


def run_child_json(argv: Sequence[str], timeout: Optional[float] = None, env: Optional[dict] = None) -> Dict[str, Any]:
    """Run ``python argv...`` in a fresh interpreter; parse the last stdout line as JSON.

    Returns ``{"ok": False, "error": ...}`` instead of raising when the child fails
    (non-zero exit, killed for memory, timeout, unparsable output).
    """
    cmd: List[str] = [sys.executable, *argv]
    try:  # from the repository root, so that ``-m bench.NAME`` children import
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        return {"ok": False, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        return {"ok": False, "error": f"bad child output ({exc}): {lines[-1][:200]}"}
    result.setdefault("ok", True)
    return result


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temporary file + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def run_logged(cmd: Sequence[str], log_path: Path, env: Optional[dict] = None,
               cwd: Optional[Path] = None) -> Dict[str, Any]:
    """Run ``cmd`` with stdout and stderr into ``log_path``: its exit status, wall seconds and peak RSS.

    The peak is the child's own high-water mark (``ru_maxrss`` of ``os.wait4`` on its pid,
    which covers the descendants it waited for), so each step of a run is measured alone.
    """
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: do not leave the step running
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "peak_rss_bytes": usage.ru_maxrss * 1024}
