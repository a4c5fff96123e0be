"""The package's layout as installed: every folder of kvfast/ ships, and kernels/ ships as kvfast.kernels."""
from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kvfast").rglob("__init__.py")}
    assert on_disk | {"kvfast.kernels"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"kvfast.kernels": "kernels"}


def test_kernels_import_as_part_of_kvfast():
    import kvfast.kernels

    assert Path(kvfast.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
