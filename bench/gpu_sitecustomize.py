"""Copied by bench/gpu_check.sh as `sitecustomize.py` into its private package folder (on PYTHONPATH),
so the checkout works there without `pip install` / `make`:

setup.py installs the top-level folder `kernels/` as the subpackage `sfd_fast.kernels`
(package_dir). A bare checkout on PYTHONPATH has no `sfd_fast/kernels`, so a finder appended to
sys.meta_path maps that one name to `$SFD_FAST_ROOT/kernels`. It is consulted only after the normal
path search fails, so an installed project (editable or not) is used unchanged. Any other
sitecustomize further down sys.path (the one this file shadows) still runs afterwards.
"""
import importlib.abc
import importlib.util
import os
import sys

_ROOT = os.environ.get("SFD_FAST_ROOT", "")
_HERE = os.path.dirname(os.path.abspath(__file__))


class KernelsFinder(importlib.abc.MetaPathFinder):
    """Resolves `sfd_fast.kernels` to the checkout's kernels/ folder; its submodules then load
    through the package's own __path__."""

    def find_spec(self, name, path=None, target=None):
        if name != "sfd_fast.kernels" or not _ROOT:
            return None
        init = os.path.join(_ROOT, "kernels", "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(name, init,
                                                      submodule_search_locations=[os.path.dirname(init)])


if not any(isinstance(f, KernelsFinder) for f in sys.meta_path):
    sys.meta_path.append(KernelsFinder())


def _run_shadowed_sitecustomize():
    """Execute the next sitecustomize.py on sys.path after this folder (e.g. the distribution's)."""
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        if folder == _HERE:
            continue
        candidate = os.path.join(folder, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as err:  # the same leniency site.py shows a failing sitecustomize
                print(f"gpu_sitecustomize: {candidate} raised {type(err).__name__}: {err}", file=sys.stderr)
            return


_run_shadowed_sitecustomize()
