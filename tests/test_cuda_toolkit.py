"""How setup.py finds the CUDA toolkit and decides between a CUDA and a CPU-only build
(build_tools/cuda_toolkit.py), on fake toolkits in tmp_path: no GPU, no real toolkit needed.

The fakes are real executables (shell scripts) answering `nvcc --version` and `nvcc --dryrun -v` the
way nvcc 12.8/13.0 do, so the finder's subprocess calls run for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cuda_toolkit import Toolkit, find_toolkits, plan_cuda_build

NO_SEARCH: tuple[str, ...] = ()


def fake_toolkit(root: Path, version: str) -> Path:
    """A folder shaped like a CUDA toolkit: bin/nvcc (answering as nvcc `version` does) and
    include/cuda_runtime.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("#pragma once\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *--version*) echo "Cuda compilation tools, release {version}, V{version}.1" ;;\n'
        f"  *--dryrun*) echo '#$ _HERE_={root}/bin'; echo '#$ TOP={root}/bin/..' ;;\n"
        "esac\n"
    )
    nvcc.chmod(0o755)
    return root


def wrapper_script(folder: Path, target: Path) -> Path:
    """An `nvcc` outside the toolkit that runs the real one, like /usr/local/bin/nvcc here."""
    folder.mkdir(parents=True, exist_ok=True)
    nvcc = folder / "nvcc"
    nvcc.write_text(f'#!/bin/sh\nexec {target / "bin" / "nvcc"} "$@"\n')
    nvcc.chmod(0o755)
    return nvcc


def test_toolkit_found_through_a_wrapper_script(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-12.8", "12.8")
    wrapper = wrapper_script(tmp_path / "usr" / "bin", home)
    # torch's own guess, the folder above the nvcc on the PATH, has no CUDA headers:
    assert not (wrapper.parent.parent / "include" / "cuda_runtime.h").exists()

    toolkits, notes = find_toolkits(env={}, which=lambda name: str(wrapper), search_globs=NO_SEARCH)

    assert toolkits == [Toolkit(home.resolve(), (12, 8), f"nvcc on the PATH ({wrapper})")]
    assert notes == []


def test_toolkit_found_through_a_symlink(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    toolkits, _ = find_toolkits(
        env={}, which=lambda name: str(tmp_path / "bin" / "nvcc"), search_globs=NO_SEARCH
    )
    assert [(t.home, t.version) for t in toolkits] == [(home.resolve(), (13, 0))]


def test_a_valid_cuda_home_is_the_only_candidate(tmp_path):
    chosen = fake_toolkit(tmp_path / "chosen", "12.8")
    on_path = wrapper_script(tmp_path / "bin", fake_toolkit(tmp_path / "cuda-13.0", "13.0"))
    toolkits, _ = find_toolkits(
        env={"CUDA_HOME": str(chosen)},
        which=lambda name: str(on_path),
        search_globs=(str(tmp_path / "cuda-*"),),
    )
    assert toolkits == [Toolkit(chosen.resolve(), (12, 8), "CUDA_HOME")]


def test_an_invalid_cuda_home_is_noted_and_the_search_goes_on(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    toolkits, notes = find_toolkits(
        env={"CUDA_HOME": str(tmp_path / "usr")},
        which=lambda name: None,
        search_globs=(str(tmp_path / "cuda-*"),),
    )
    assert [t.home for t in toolkits] == [home.resolve()]
    assert notes == [f"CUDA_HOME={tmp_path / 'usr'} has no bin/nvcc and include/cuda_runtime.h"]


def test_installed_toolkits_are_searched_newest_first_without_duplicates(tmp_path):
    old = fake_toolkit(tmp_path / "cuda-12.8", "12.8")
    new = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    (tmp_path / "cuda").symlink_to(new)  # like /usr/local/cuda -> cuda-13.0
    wrapper = wrapper_script(tmp_path / "bin", new)
    toolkits, _ = find_toolkits(
        env={},
        which=lambda name: str(wrapper),
        search_globs=(str(tmp_path / "cuda"), str(tmp_path / "cuda-*")),
    )
    assert [(t.home, t.version, t.found_by) for t in toolkits] == [
        (new.resolve(), (13, 0), f"nvcc on the PATH ({wrapper})"),
        (old.resolve(), (12, 8), str(old)),
    ]


def test_a_folder_without_headers_is_not_a_toolkit(tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    (home / "include" / "cuda_runtime.h").unlink()
    toolkits, notes = find_toolkits(
        env={}, which=lambda name: str(home / "bin" / "nvcc"), search_globs=(str(tmp_path / "cuda-*"),)
    )
    assert toolkits == []
    assert notes == [f"the nvcc on the PATH ({home / 'bin' / 'nvcc'}) does not lead to a toolkit folder"]


def toolkit(version: tuple[int, int], name: str) -> Toolkit:
    return Toolkit(Path("/opt") / name, version, name)


def test_plan_for_a_cpu_torch_is_a_quiet_cpu_build():
    plan = plan_cuda_build(None, [toolkit((13, 0), "cuda-13.0")], skip_requested=False)
    assert (plan.toolkit, plan.warn) == (None, False)
    assert "CPU-only" in plan.reason


def test_plan_honours_the_opt_out():
    plan = plan_cuda_build("13.0", [toolkit((13, 0), "cuda-13.0")], skip_requested=True)
    assert (plan.toolkit, plan.warn) == (None, False)
    assert "BADAM_KERNELS_NO_CUDA=1" in plan.reason


def test_plan_takes_the_first_toolkit_of_torchs_major_version():
    """torch 2.9.1 cu128 on a machine whose nvcc is 13.0 but which also has a 12.x toolkit (issue 15)."""
    first_match, second_match = toolkit((12, 6), "cuda-12.6"), toolkit((12, 8), "cuda-12.8")
    plan = plan_cuda_build(
        "12.8", [toolkit((13, 0), "cuda-13.0"), first_match, second_match], skip_requested=False
    )
    assert plan.toolkit == first_match  # a minor version apart is fine for torch (it only warns)
    assert not plan.warn
    assert "CUDA 12.6 from /opt/cuda-12.6" in plan.reason


def test_plan_falls_back_loudly_when_the_major_version_differs():
    """torch 2.9.1 cu128 with only nvcc 13.0 (issue 15): torch would stop with "The detected CUDA
    version (13.0) mismatches"; the plan is a CPU build whose reason names both versions and the fix."""
    plan = plan_cuda_build("12.8", [toolkit((13, 0), "cuda-13.0")], skip_requested=False)
    assert (plan.toolkit, plan.warn) == (None, True)
    assert "CUDA 12.8" in plan.reason and "13.0 at /opt/cuda-13.0" in plan.reason
    assert "install a CUDA 12.x toolkit" in plan.reason and "CUDA_HOME" in plan.reason


def test_plan_falls_back_loudly_without_a_toolkit():
    plan = plan_cuda_build("13.0", [], skip_requested=False, notes=["CUDA_HOME=/nowhere has no bin/nvcc"])
    assert (plan.toolkit, plan.warn) == (None, True)
    assert "no usable CUDA toolkit" in plan.reason and "CUDA_HOME=/nowhere" in plan.reason


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_this_machines_nvcc_leads_to_its_toolkit():
    """The real nvcc on the PATH (here a wrapper script outside the toolkit) gives a folder with the
    CUDA runtime headers and the version that nvcc reports."""
    toolkits, _ = find_toolkits(
        env={k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    )
    assert toolkits, "nvcc is on the PATH but no toolkit was found"
    assert (toolkits[0].home / "include" / "cuda_runtime.h").is_file()
    reported = subprocess.check_output(["nvcc", "--version"], text=True)
    assert f"release {toolkits[0].version_text}," in reported
