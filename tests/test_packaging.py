"""`pip install .` and `pip install -e .` both import pl_optim.callbacks (explicit package-dir)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import pl_optim, pl_optim.callbacks, pl_optim.compression; print(pl_optim.callbacks.__file__)"


def _venv_with_outer_deps(path: Path) -> Path:
    """A fresh venv (no pip/setuptools of its own) that sees this interpreter's installed packages
    through a .pth line: plain path entries, so the outer editable install of pl_optim is NOT
    active there, while pip, setuptools and torch are."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    outer = sysconfig.get_paths()["purelib"]
    Path(site, "_outer_deps.pth").write_text(outer + "\n")
    return python


def _install_and_probe(tmp_path: Path, editable: bool) -> str:
    python = _venv_with_outer_deps(tmp_path / "venv")
    cmd = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["-e", str(ROOT)] if editable else [str(ROOT)]
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True)
    out = subprocess.run([str(python), "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_imports_callbacks(tmp_path, editable):
    location = Path(_install_and_probe(tmp_path, editable))
    if editable:
        assert location == ROOT / "callbacks" / "__init__.py"
    else:
        assert location.parent.name == "callbacks" and location.parent.parent.name == "pl_optim"
        assert str(tmp_path / "venv") in str(location)


def test_core_never_imports_lightning():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "pl_optim").rglob("*.py")
        if any(
            line.lstrip().startswith(("import lightning", "from lightning", "import pytorch_lightning"))
            for line in p.read_text().splitlines()
        )
    ]
    assert offenders == []
