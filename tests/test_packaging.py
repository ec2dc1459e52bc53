"""The built wheel carries the plugin and the spec, the way `pip install .` installs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel, once for the module."""
    # pip builds in place: build a clean copy so no build/ or *.egg-info leaks either way
    src = tmp_path_factory.mktemp("src") / "txcallme"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(src)], check=True, timeout=180)
    (built,) = dist.glob("txcallme-*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    """The wheel has the twistd plugin (no __init__ in twisted/), the spec XML, the
    JSON Schemas of the wire envelopes and py.typed."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/callme_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "txcallme/amqp/amqp0-9-1.xml" in names
    assert "txcallme/py.typed" in names
    for envelope in ("request", "reply", "error"):
        assert f"txcallme/schemas/{envelope}.schema.json" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "callme = txcallme.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_lists_plugin(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel alone (no source tree on sys.path), twistd lists callme."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=120)
    # -S: no site-packages .pth files (the editable install would put the source tree on
    # sys.path); dependencies come from the venv's site-packages added by hand, last.
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]);"
        "from twisted.scripts.twistd import run; sys.argv = ['twistd', '--help']; run()"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code, str(target), site_packages],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "callme" in out.stdout, out.stdout + out.stderr
    import_check = subprocess.run(
        [sys.executable, "-S", "-c",
         "import sys; sys.path[:0] = [sys.argv[1]]; sys.path.append(sys.argv[2]);"
         "import txcallme; print(txcallme.__file__)", str(target), site_packages],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert import_check.stdout.startswith(str(target)), import_check.stdout + import_check.stderr
