"""The documentation site builds without a warning (``mkdocs build --strict``: broken links and
anchors, unresolved cross-references, pages missing from the navigation, docstrings that name
parameters the functions do not have), renders what it shows (no leftover reStructuredText
roles or literal-block markers, no escaped pipes), needs nothing from the network, and has an
API entry for every public class and function. Skipped where MkDocs is not installed
(``pip install -e ".[docs]"``; the ``test`` extra installs it, so CI builds the site)."""
import importlib
import inspect
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: the public modules whose classes and functions the API reference must document
PUBLIC_MODULES = [
    "nngeometry", "nngeometry.metrics", "nngeometry.hessian", "nngeometry.jacobian",
    "nngeometry.gram", "nngeometry.layercollection", "nngeometry.layers", "nngeometry.object",
    "nngeometry.object.pspace", "nngeometry.object.vector", "nngeometry.object.map",
    "nngeometry.object.fspace", "nngeometry.backend", "nngeometry.backend.torch_hooks",
    "nngeometry.backend.torch_hooks.torch_hooks", "nngeometry.backend.torch_func_hessian",
    "nngeometry.backend.torch_func_jacobian", "nngeometry.estimators",
    "nngeometry.solve", "nngeometry.spectrum", "nngeometry.optim", "nngeometry.regularization",
    "nngeometry.laplace", "nngeometry.laplace_lm", "nngeometry.laplace_gp",
    "nngeometry.influence", "nngeometry.maths", "nngeometry.utils",
    "nngeometry.serialization",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def test_docs_site_builds_strict(site):
    assert (site / "api" / "representations" / "index.html").exists()


def _visible_text(html):
    html = re.sub(r"<(script|style)\b.*?</\1>", "", html, flags=re.S)
    return re.sub(r"<[^>]+>", "", html)


def test_site_renders_its_markup(site):
    leftovers = []
    for page in site.rglob("*.html"):
        text = _visible_text(page.read_text(encoding="utf-8"))
        for pattern in (r":(meth|class|func|mod|attr|obj|exc|data):`", r"\w::\s*$", r"\\\|"):
            for m in re.finditer(pattern, text, flags=re.M):
                leftovers.append(f"{page.relative_to(site)}: {text[m.start():m.end() + 30]!r}")
    assert not leftovers, "\n".join(leftovers[:20])


def test_site_needs_no_network(site):
    remote = []
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        # scripts, stylesheets, images and fonts: a page must open offline (links may point out)
        for m in re.finditer(r"<(script|link|img)\b[^>]*\b(src|href)=\"(https?:)?//[^\"]+\"",
                             html):
            remote.append(f"{page.relative_to(site)}: {m.group(0)}")
    assert not remote, "\n".join(remote[:20])


def _documented(site):
    raw = (site / "objects.inv").read_bytes()
    body = zlib.decompress(raw.split(b"\n", 4)[4]).decode()
    return {line.split(" ")[0].rsplit(".", 1)[-1] for line in body.splitlines() if line.strip()}


def test_every_public_class_and_function_has_an_api_entry(site):
    documented = _documented(site)
    missing = set()
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        public = getattr(module, "__all__", None) or [n for n in vars(module)
                                                      if not n.startswith("_")]
        for attr in public:
            obj = getattr(module, attr, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("nngeometry"):
                continue  # re-exports of torch, collections...
            if obj.__name__ not in documented:
                missing.add(f"{obj.__module__}.{obj.__name__} (public in {name})")
    assert not missing, "no API entry for:\n" + "\n".join(sorted(missing))
