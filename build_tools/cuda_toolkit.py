"""Find the CUDA toolkit for a CUDA build of torch, and decide whether the CUDA kernels can be built.

setup.py runs this before it imports torch.utils.cpp_extension, because that module fixes CUDA_HOME
when it is imported: from $CUDA_HOME, else from the folder above the `nvcc` found on the PATH. When
that nvcc is a wrapper script or a symlink outside the toolkit (/usr/local/bin/nvcc running
/usr/local/cuda-13.0/bin/nvcc) the guess is a folder without cuda_runtime.h and the build stops.
Here the toolkit is found where it really is, and checked against torch's CUDA major version,
because torch refuses to build with a toolkit of another major version. When no usable toolkit
exists the plan is a CPU-only build, with the reason and how to fix it.

Standard library only: it must run before anything imports torch's build helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Where CUDA toolkits are installed when nothing points at them (Linux conventions).
DEFAULT_SEARCH_GLOBS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda", "/opt/cuda-*")


@dataclass(frozen=True)
class Toolkit:
    """A CUDA toolkit folder (bin/nvcc and include/cuda_runtime.h inside) and its nvcc's version."""

    home: Path
    version: tuple[int, int]
    found_by: str  # how it was found, for messages: "CUDA_HOME", "nvcc on the PATH (...)", ...

    @property
    def version_text(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"


@dataclass(frozen=True)
class CudaPlan:
    """What setup.py builds: CUDA kernels with `toolkit`, or the CPU extension only.

    `reason` says why in one sentence (recorded in the build and shown at run time); `warn` is True
    when torch has CUDA but its kernels cannot be built, a state the user should hear about loudly.
    """

    toolkit: Toolkit | None
    reason: str
    warn: bool


def is_toolkit(home: Path) -> bool:
    """A toolkit folder holds nvcc and the runtime headers that torch's CUDA headers include."""
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def nvcc_version(nvcc: Path, run: Callable[..., str] = subprocess.check_output) -> tuple[int, int] | None:
    """(major, minor) from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    try:
        out = run([str(nvcc), "--version"], text=True, stderr=subprocess.STDOUT, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


def toolkit_of_nvcc(nvcc: Path, run: Callable[..., str] = subprocess.check_output) -> Path | None:
    """The toolkit folder that the command `nvcc` belongs to, even when it is a wrapper elsewhere.

    A symlink is resolved first. A wrapper script is asked: `nvcc --dryrun -v` prints the toolkit's
    location (TOP=...) without compiling anything, and needs an input name, not a file.
    """
    resolved = nvcc.resolve().parent.parent
    if is_toolkit(resolved):
        return resolved
    try:
        out = run(
            [str(nvcc), "--dryrun", "-v", "-c", "probe.cu"], text=True, stderr=subprocess.STDOUT, timeout=60
        )
    except subprocess.CalledProcessError as exc:  # some nvcc versions fail after printing the plan
        out = exc.output or ""
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+?)\s*$", out, re.MULTILINE)
    if match:
        top = Path(match[1]).resolve()
        if is_toolkit(top):
            return top
    return None


def candidate_homes(
    env: Mapping[str, str],
    which: Callable[[str], str | None] = shutil.which,
    search_globs: Sequence[str] = DEFAULT_SEARCH_GLOBS,
    run: Callable[..., str] = subprocess.check_output,
) -> tuple[list[tuple[Path, str]], list[str]]:
    """Toolkit folders in order of preference, each with how it was found, and notes on what was
    rejected. A valid CUDA_HOME (or CUDA_PATH) is the user's choice and the only candidate."""
    notes = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            home = Path(env[var])
            if is_toolkit(home):
                return [(home.resolve(), var)], notes
            notes.append(f"{var}={home} has no bin/nvcc and include/cuda_runtime.h")
    found: list[tuple[Path, str]] = []
    nvcc = which("nvcc")
    if nvcc:
        home = toolkit_of_nvcc(Path(nvcc), run)
        if home:
            found.append((home, f"nvcc on the PATH ({nvcc})"))
        else:
            notes.append(f"the nvcc on the PATH ({nvcc}) does not lead to a toolkit folder")
    for pattern in search_globs:
        for path in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if is_toolkit(path):
                found.append((path.resolve(), str(path)))
    unique: dict[Path, str] = {}
    for home, how in found:
        unique.setdefault(home, how)
    return list(unique.items()), notes


def plan_cuda_build(
    torch_cuda: str | None, toolkits: Sequence[Toolkit], *, skip_requested: bool, notes: Sequence[str] = ()
) -> CudaPlan:
    """Decide the build from torch's CUDA version ("13.0", None for a CPU torch) and the toolkits
    found (in order of preference). Pure: no probing of the machine.

    torch refuses (RuntimeError "detected CUDA version mismatches") to build an extension with an
    nvcc whose major version differs from the one torch was built with; minor versions may differ.
    So the first toolkit of torch's major version is used; with none, the CPU extension is built.
    """
    if torch_cuda is None:
        return CudaPlan(None, "torch is a CPU-only build, so only the CPU kernels were built", warn=False)
    if skip_requested:
        return CudaPlan(None, "BADAM_KERNELS_NO_CUDA=1 was set when the extension was built", warn=False)
    major = int(torch_cuda.split(".")[0])
    for toolkit in toolkits:
        if toolkit.version[0] == major:
            return CudaPlan(
                toolkit,
                f"built with CUDA {toolkit.version_text} from {toolkit.home} (found by {toolkit.found_by}) "
                f"for torch's CUDA {torch_cuda}",
                warn=False,
            )
    how_to_fix = (
        f"install a CUDA {major}.x toolkit (https://developer.nvidia.com/cuda-toolkit-archive), point "
        "CUDA_HOME at it and rebuild with `pip install --no-build-isolation -e .`; or use a torch built "
        "for the toolkit you have"
    )
    if toolkits:
        others = ", ".join(f"{t.version_text} at {t.home}" for t in toolkits)
        problem = f"torch was built with CUDA {torch_cuda} but the only CUDA toolkits found are {others}"
    else:
        looked = "; ".join(["looked at CUDA_HOME, CUDA_PATH, nvcc on the PATH and /usr/local/cuda*", *notes])
        problem = f"torch was built with CUDA {torch_cuda} but no usable CUDA toolkit was found ({looked})"
    return CudaPlan(None, f"no CUDA kernels: {problem}; {how_to_fix}", warn=True)


def find_toolkits(
    env: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
    search_globs: Sequence[str] = DEFAULT_SEARCH_GLOBS,
    run: Callable[..., str] = subprocess.check_output,
) -> tuple[list[Toolkit], list[str]]:
    """Every usable toolkit on this machine, preferred first, and notes on the rejected ones."""
    homes, notes = candidate_homes(env, which, search_globs, run)
    toolkits = []
    for home, how in homes:
        version = nvcc_version(home / "bin" / "nvcc", run)
        if version is None:
            notes.append(f"{home}/bin/nvcc --version did not run")
        else:
            toolkits.append(Toolkit(home, version, how))
    return toolkits, notes
