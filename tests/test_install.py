"""Installation hygiene: nothing of ours hijacks an installed package, whichever way the code is run.

The failure this guards against (2026-12-06): transformers 5.25 imports Hugging Face's `kernels`
package from `transformers.modeling_utils`; the repository's top-level `kernels/` folder used to be a
package (it had an `__init__.py`), so wherever the repository root came first on `sys.path`
(`python -m pytest` from the root, tests/conftest.py, bench/conftest.py, PYTHONPATH in
bench/gpu_check.sh) `import kernels` found ours and every Stable Diffusion path failed with
`ImportError: cannot import name 'CUDAProperties' from 'kernels'`.

Now `kernels/` has no `__init__.py` (a plain folder: a regular package anywhere on sys.path wins over
it) and is importable only as `sfd_fast.kernels` through the link `sfd_fast/kernels -> ../kernels`.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SFD_FAST_DIST = "sfd-fast"


def _importable_names(folder: Path) -> set[str]:
    """Top-level names that `folder` on sys.path makes importable as a module or regular package."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names


def _installed_top_level_names() -> dict[str, list[str]]:
    """Top-level import names of every installed distribution except ours -> the distributions."""
    owners = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in owners.items()
            if not {d.lower().replace("_", "-") for d in dists} <= {SFD_FAST_DIST}}


def test_kernels_folder_is_not_a_top_level_package():
    assert (ROOT / "kernels" / "sfd_loss.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes `import kernels` resolve to this repository whenever its root is on "
        "sys.path, shadowing Hugging Face's `kernels` (transformers >= 5.25 imports it)")
    link = ROOT / "sfd_fast" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


@pytest.mark.parametrize("folder", [".", "bench"], ids=["repo-root", "bench"])
def test_no_name_on_our_paths_shadows_an_installed_package(folder):
    """The repository root (conftest, `python -m`, PYTHONPATH) and bench/ (bench/conftest.py) are put
    on sys.path; nothing importable from them may carry the name of an installed distribution."""
    taken = _installed_top_level_names()
    clashes = {n: taken[n] for n in _importable_names(ROOT / folder) if n in taken}
    assert not clashes, f"{folder}/ shadows installed packages: {clashes}"


def test_the_clash_check_sees_a_planted_package(tmp_path):
    """Mutation check of the test above: a folder holding a package named like an installed one
    (here `pytest`'s own `_pytest`) is reported."""
    (tmp_path / "_pytest").mkdir()
    (tmp_path / "_pytest" / "__init__.py").write_text("")
    assert "_pytest" in _importable_names(tmp_path) & set(_installed_top_level_names())


# Each launch mode puts the repository root (or sfd_fast/) on sys.path its own way; the child then
# imports transformers' model code (which imports Hugging Face `kernels` when installed) and our
# kernels, and prints where each came from.
_CHILD = r"""
import importlib.util, sys
{setup}
import transformers.modeling_utils  # transformers >= 5.25: `from kernels import ...` inside
from sfd_fast.kernels import sfd_loss
from sfd_fast.kernels.triton_support import triton_available
spec = importlib.util.find_spec("kernels")
print("KERNELS", spec.origin if spec is not None else None)
print("SFD_LOSS", sfd_loss.__name__, sfd_loss.__file__)
"""

_MODES = {
    # `python -m pytest` / `python -c` from the root: the working directory is sys.path[0]
    "cwd-first": ("", {}),
    # tests/conftest.py and bench/conftest.py insert the root at sys.path[0]
    "conftest-insert": (f"sys.path.insert(0, {str(ROOT)!r})", {}),
    # bench/gpu_check.sh: PYTHONPATH=<private wheels>:<root>
    "pythonpath": ("", {"PYTHONPATH": str(ROOT)}),
    # `python sfd_fast/train.py`, and the deepspeed / torchrun launchers, which start that same script
    # per rank: sfd_fast/ is sys.path[0], then train.py's own path code runs (not its main)
    "train-script": (f"sys.path.insert(0, {str(ROOT / 'sfd_fast')!r}); import runpy; "
                     f"runpy.run_path({str(ROOT / 'sfd_fast' / 'train.py')!r}, run_name='not_main')", {}),
}


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_each_launch_mode_imports_its_own_kernels(mode):
    setup, env_extra = _MODES[mode]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", _CHILD.format(setup=setup)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("KERNELS", "SFD_LOSS")))
    name, path = lines["SFD_LOSS"].split(" ", 1)
    assert name == "sfd_fast.kernels.sfd_loss"
    assert Path(path).resolve() == (ROOT / "kernels" / "sfd_loss.py").resolve()
    origin = lines["KERNELS"]
    ours = (ROOT / "kernels").resolve()
    try:
        hf_kernels = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        # without Hugging Face `kernels`, nothing regular may answer to that name from our folder
        assert origin == "None" or not Path(origin).resolve().is_relative_to(ours), origin
    else:
        expected = Path(hf_kernels.locate_file("kernels/__init__.py")).resolve()
        assert Path(origin).resolve() == expected, (
            f"`import kernels` resolves to {origin}, not Hugging Face's package ({expected})")


def test_wheel_carries_the_kernels(tmp_path):
    """A (non-editable) wheel holds sfd_fast/kernels/*.py, copied through the link, and imports from an
    unpacked install with the repository nowhere on sys.path."""
    import zipfile

    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sfd_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"sfd_fast/kernels/sfd_loss.py", "sfd_fast/kernels/triton_support.py"} <= set(names)
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` in the wheel"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import os, sys; sys.path = [p for p in sys.path if os.path.abspath(p or '.') != sys.argv[2]]; "
            "sys.path.insert(0, sys.argv[1]); from sfd_fast.kernels import sfd_loss; print(sfd_loss.__file__)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), str(ROOT)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).resolve() == (tmp_path / "site" / "sfd_fast" / "kernels" / "sfd_loss.py").resolve()
