"""`python -m badam_kernels.llamafactory train CONFIG.yaml`: LLaMA-Factory's own CLI, with the
`badam` optimizer it uses for `use_badam: true` served by badam_kernels.

LLaMA-Factory imports BlockOptimizer, BlockOptimizerRatio, BAdamCallback and
clip_grad_norm_old_version from `badam`, and refuses to start unless a distribution
`badam>=1.2.1` is installed. This command writes into a temporary folder, which lives as long as
the command:

- a package `badam` whose module is badam_kernels.badam_alias (those four names), and
- the distribution metadata `badam 1.4+badamkernels.<our version>` (badam 1.4's API, served by
  badam_kernels), which satisfies the version check and says what it is in `pip list`;

puts the folder first on sys.path and on PYTHONPATH, so the processes LLaMA-Factory starts
(torchrun with FORCE_TORCHRUN=1 or several GPUs, the web UI's training runs) get the same; prints
one line saying so; and runs LLaMA-Factory's CLI with the arguments given (`train CONFIG.yaml
key=value ...`, as for `llamafactory-cli`). The YAML stays as it is. Nothing is installed: outside
this command `import badam` is whatever the environment has, the real badam or nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import badam_kernels

BADAM_API_VERSION = "1.4"  # the badam release whose names and signatures badam_alias serves
SERVED_VERSION = f"{BADAM_API_VERSION}+badamkernels.{badam_kernels.__version__}"
# The package's module replaces itself with badam_alias: `badam.X is badam_kernels.badam_alias.X`.
SHIM_INIT = '''"""badam, served by badam_kernels for one `python -m badam_kernels.llamafactory` run."""
import sys

from badam_kernels import badam_alias

sys.modules[__name__] = badam_alias
'''
SHIM_METADATA = f"""Metadata-Version: 2.1
Name: badam
Version: {SERVED_VERSION}
Summary: badam's API served by badam_kernels {badam_kernels.__version__} (for one LLaMA-Factory run)
"""
ANNOUNCEMENT = (
    f"badam_kernels {badam_kernels.__version__}: LLaMA-Factory's `use_badam` runs on badam_kernels' "
    f"optimizers (fused kernels), served as `badam` {SERVED_VERSION}"
)
NO_LLAMAFACTORY = (
    "LLaMA-Factory is not installed in this environment ({python}). Install it with "
    "`pip install llamafactory==0.9.5` (the version badam_kernels is tested with; the extra "
    "badam_kernels[llamafactory] pins it), then run `python -m badam_kernels.llamafactory train CONFIG.yaml`."
)


def write_badam_shim(folder: Path) -> None:
    """Write the `badam` package and its distribution metadata into `folder`."""
    package = folder / "badam"
    package.mkdir()
    (package / "__init__.py").write_text(SHIM_INIT)
    dist_info = folder / f"badam-{SERVED_VERSION}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(SHIM_METADATA)


@contextlib.contextmanager
def badam_served_by_badam_kernels() -> Iterator[Path]:
    """Within the block, `import badam` and the `badam` distribution are badam_kernels', in this
    process and in every process it starts (PYTHONPATH); afterwards both are as they were."""
    if "badam" in sys.modules:
        raise RuntimeError(
            f"`badam` is already imported in this process (from {sys.modules['badam'].__file__}); "
            "it can only be served by badam_kernels in a fresh process"
        )
    saved_path, saved_pythonpath = list(sys.path), os.environ.get("PYTHONPATH")
    with tempfile.TemporaryDirectory(prefix="badam_kernels_llamafactory_") as name:
        folder = Path(name)
        write_badam_shim(folder)
        sys.path.insert(0, str(folder))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), saved_pythonpath]))
        importlib.invalidate_caches()
        try:
            yield folder
        finally:
            sys.path[:] = saved_path
            sys.modules.pop("badam", None)
            if saved_pythonpath is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved_pythonpath


def main(argv: Sequence[str] | None = None) -> int:
    """Run LLaMA-Factory's CLI (`argv`, default sys.argv[1:]) with `badam` served by badam_kernels.
    Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("llamafactory") is None:
        print(NO_LLAMAFACTORY.format(python=sys.executable), file=sys.stderr)
        return 2
    with badam_served_by_badam_kernels():
        print(ANNOUNCEMENT, flush=True)
        from llamafactory.cli import main as llamafactory_main

        saved_argv = sys.argv
        sys.argv = ["llamafactory-cli", *argv]
        try:
            llamafactory_main()
        finally:
            sys.argv = saved_argv
    return 0


if __name__ == "__main__":
    sys.exit(main())
