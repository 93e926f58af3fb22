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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (path,) = out.glob("moelens-*.whl")
    return path


@pytest.mark.slow
def test_wheel_contains_every_source_file_and_the_shipped_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"moelens/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "data").rglob("*") if p.is_file()}
    assert "moelens/data/models/moelens-tiny/model.safetensors" in shipped and shipped - names == set()
    expected = set()
    for folder, package in (("moelens", "moelens"), ("hooks", "moelens/hooks"), ("kernels", "moelens/kernels")):
        for source in (ROOT / folder).rglob("*.py"):
            relative = source.relative_to(ROOT / folder)
            if relative.parts[0] in ("hooks", "kernels"):  # the links inside moelens/
                continue
            expected.add(f"{package}/{relative.as_posix()}")
    assert expected - names == set()
    assert "moelens/py.typed" in names


@pytest.mark.slow
def test_the_installed_wheel_loads_and_traces_the_default_model(wheel, tmp_path):
    """A non-editable install, outside the repository: moelens comes from the wheel alone (its
    dependencies are borrowed from this environment's site-packages, whose editable moelens is not
    activated because .pth files of an added path are not processed)."""
    import site
    import venv

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    target = next(fresh.glob("lib/python*/site-packages"))
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    (target / "borrowed-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [str(fresh / "bin" / "python"), "-c",
         "import moelens, torch\n"
         "model, tok = moelens.load()\n"
         "with torch.no_grad(), moelens.trace(model, tokenizer=tok) as tr:\n"
         "    model.generate(**tok(['def add(a, b):'], return_tensors='pt'), max_new_tokens=3, do_sample=False)\n"
         "print(moelens.__file__)\n"
         "print(int(tr.tokens['generated'].sum()), tr.routes['layer'].nunique())"],
        cwd=elsewhere, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    where, counts = result.stdout.split()[-3], result.stdout.split()[-2:]
    assert where.startswith(str(target)), where
    assert counts == ["2", "4"]
