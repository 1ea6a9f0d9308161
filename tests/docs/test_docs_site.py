"""The documentation site builds without a warning (``mkdocs build --strict``: broken links and
anchors, pages missing from the navigation, docstrings that name parameters the functions do not
have). Skipped where MkDocs is not installed (``pip install -e ".[docs]"``; the ``test`` extra
installs it, so CI builds the site)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "api" / "representations" / "index.html").exists()
