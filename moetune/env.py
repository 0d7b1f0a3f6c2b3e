"""`moetune env`: what a bug report needs to know about the machine, as a block to paste (or `--json`).

Package versions come from the installed metadata (`importlib.metadata`), so a missing package reads
"not installed" instead of failing; torch is imported only when it is installed, for its build and devices.
"""

import importlib.metadata
import os
import platform
import sys
from typing import Any


PACKAGES = ("moetune", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets",
            "safetensors", "tokenizers", "huggingface_hub", "pydantic", "deepspeed")
NOT_INSTALLED = "not installed"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def collect_env() -> dict[str, Any]:
    """Platform, Python, CPU count, package versions, and torch's build and accelerators."""
    import moetune

    versions = {name: package_version(name) for name in PACKAGES}
    versions["moetune"] = f"{moetune.__version__} ({os.path.dirname(moetune.__file__)})"  # the copy running
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "packages": versions,
        "torch": _torch_info() if versions["torch"] != NOT_INSTALLED else None,
    }


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except Exception as err:  # a broken install is exactly what a bug report must show
        return {"error": f"import torch failed: {type(err).__name__}: {err}"}
    info: dict[str, Any] = {
        "cuda_build": torch.version.cuda,
        "rocm_build": getattr(torch.version, "hip", None),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                    "capability": f"{props.major}.{props.minor}"})
    return info


def format_env(report: dict[str, Any]) -> str:
    """The report as `- key: value` lines inside a fenced block, ready for a GitHub issue."""
    lines = [f"- platform: {report['platform']}", f"- python: {report['python']}",
             f"- CPUs: {report['cpu_count']} ({report['cpus_usable']} usable)"]
    lines += [f"- {name}: {version}" for name, version in report["packages"].items()]
    torch = report["torch"]
    if torch and "error" in torch:
        lines.append(f"- torch: {torch['error']}")
    elif torch:
        build = f"CUDA {torch['cuda_build']}" if torch["cuda_build"] else \
            f"ROCm {torch['rocm_build']}" if torch["rocm_build"] else "CPU only"
        lines.append(f"- torch build: {build}")
        devices = [f"{d['index']}: {d['name']}, {d['memory_gib']} GiB, sm {d['capability']}" for d in torch["devices"]]
        lines.append(f"- GPUs: {'; '.join(devices) if devices else 'none visible'}"
                     + (" (MPS available)" if torch["mps_available"] else ""))
    return "\n".join(["```", "moetune env", *lines, "```"])
