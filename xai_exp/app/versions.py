"""The installed versions: ``xai-exp --version`` and the torch/torchvision pairing check.

Read from the packages' metadata (``importlib.metadata``): nothing here imports torch, so a
fully cached rerun still never loads it.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

# shown by `xai-exp --version`, after xai-exp's own version
COMPONENTS = ("torch", "torchvision", "timm", "grad-cam", "lime", "hydra-core", "mlflow")
# torchvision 0.X is built for torch 2.(X - 15): 0.15 <-> 2.0, ..., 0.29 <-> 2.14
TORCHVISION_OFFSET = 15
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def installed(package: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def version_line() -> str:
    """``xai-exp 0.1.0 (torch 2.14.1, torchvision 0.29.1, ...)``: one line."""
    parts = [f"{name} {found}" for name in COMPONENTS if (found := installed(name))]
    return f"xai-exp {installed('xai-exp') or 'unknown'} ({', '.join(parts)})"


def _major_minor(text: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def _install_hint(torch_version: str, torchvision: str) -> str:
    """The pip command that installs the torchvision built for this torch (same index)."""
    local = torch_version.partition("+")[2]  # cpu, cu124, rocm6.2, or '' (PyPI)
    index = f" --index-url https://download.pytorch.org/whl/{local}" if local else ""
    return f'pip install "torchvision=={torchvision}.*"{index}'


def pairing_problem(torch_version: str, torchvision_version: str) -> str | None:
    """One line when this torchvision was not built for this torch (torch >= 2 only)."""
    torch_mm, vision_mm = _major_minor(torch_version), _major_minor(torchvision_version)
    if torch_mm is None or vision_mm is None or torch_mm[0] != 2 or vision_mm[0] != 0:
        return None  # a version scheme this rule does not cover: let the import decide
    needed = f"0.{torch_mm[1] + TORCHVISION_OFFSET}"
    if vision_mm[1] == torch_mm[1] + TORCHVISION_OFFSET:
        return None
    return (
        f"torch {torch_version} and torchvision {torchvision_version} do not match "
        f"(torch 2.{torch_mm[1]} needs torchvision {needed}); install the matching one: "
        f"{_install_hint(torch_version, needed)}"
    )


def torch_mismatch() -> str | None:
    """The pairing problem of the installed torch and torchvision, if any."""
    torch_version, torchvision_version = installed("torch"), installed("torchvision")
    if torch_version is None or torchvision_version is None:
        return None
    return pairing_problem(torch_version, torchvision_version)


def broken_torchvision(error: BaseException) -> str | None:
    """One line for the error importing a torchvision built for another torch
    (``operator torchvision::nms does not exist``), else None."""
    if not isinstance(error, RuntimeError | ImportError) or "torchvision::" not in str(error):
        return None
    torch_version = installed("torch") or "?"
    torchvision_version = installed("torchvision") or "?"
    torch_mm = _major_minor(torch_version)
    needed = f"0.{torch_mm[1] + TORCHVISION_OFFSET}" if torch_mm and torch_mm[0] == 2 else None
    fix = (
        _install_hint(torch_version, needed)
        if needed
        else f"pip install torch torchvision --index-url {CPU_INDEX} (or without it for CUDA)"
    )
    return (
        f"torchvision {torchvision_version} does not work with torch {torch_version} "
        f"({str(error).strip().splitlines()[0][:120]}); reinstall it for this torch: {fix}"
    )
