"""Packaging contracts: cheap import, hooks/ and kernels/ only as moelens.*, complete wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_import_moelens_is_cheap_and_side_effect_free(tmp_path):
    result = _python(
        "import sys, moelens, moelens.analysis, moelens.interventions.spec\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'duckdb', 'plotly', 'pyarrow') if m in sys.modules]\n"
        "print(heavy)",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not list(tmp_path.iterdir())  # no files written


@pytest.mark.parametrize("name", ["hooks", "kernels"])
def test_top_level_folders_are_not_importable_packages_from_the_repo_root(name):
    # run from the repository root, where the folders sit on sys.path
    result = _python(
        f"import importlib.util, {name} as m\n"
        "print(getattr(m, '__file__', None), list(getattr(m, '__path__', [])))",
        ROOT,
    )
    # a namespace shell at most: no module of ours is importable as a top-level one
    assert result.returncode == 0 and result.stdout.startswith("None"), result.stdout + result.stderr
    submodule = {"hooks": "adapters", "kernels": "routing"}[name]
    inner = _python(f"import moelens.{name}.{submodule} as m; print(m.__name__)", ROOT)
    assert inner.stdout.strip() == f"moelens.{name}.{submodule}", inner.stderr


def test_transformers_does_not_mistake_the_kernels_folder_for_hugging_face_kernels():
    result = _python(
        "from transformers.utils.import_utils import is_kernels_available\n"
        "import transformers.models.mixtral.modeling_mixtral\n"
        "print(is_kernels_available())",
        ROOT,
    )
    assert result.returncode == 0, result.stderr
    installed = _python("import importlib.metadata as m; m.version('kernels')", ROOT).returncode == 0
    assert result.stdout.strip() == str(installed)


@pytest.mark.slow
def test_wheel_contains_every_source_file(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("moelens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, package in (("moelens", "moelens"), ("hooks", "moelens/hooks"), ("kernels", "moelens/kernels")):
        for source in (ROOT / folder).rglob("*.py"):
            relative = source.relative_to(ROOT / folder)
            if relative.parts[0] in ("hooks", "kernels"):  # the links inside moelens/
                continue
            expected.add(f"{package}/{relative.as_posix()}")
    assert expected - names == set()
    assert "moelens/py.typed" in names
