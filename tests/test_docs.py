"""The documentation site and the README: `mkdocs build --strict` passes (no broken link or anchor,
no page missing from the nav), every generated block sits in its page once, and the README keeps
the set-up commands .ci/run depends on. mkdocs comes with the `test` extra: a missing mkdocs fails
here, it is never skipped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every block a generator or a measurement writes, and the page that holds it.
BLOCKS = {
    "policy": "policy.md", "compat": "compatibility.md", "deploy": "deployments.md", "race": "deployments.md",
    "production": "production.md", "report": "operations.md", "record-cost": "performance.md", "bench": "performance.md",
}


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_mkdocs_is_installed_with_the_test_extra():
    import material  # noqa: F401  (the theme mkdocs.yml names)
    import mkdocs  # noqa: F401


def test_site_builds_strictly(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    for page in ROOT.joinpath("docs").glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert name in pages, f"docs/{page.name} did not become a page"


@pytest.mark.parametrize("damage", ["broken link", "broken anchor", "page not in nav"])
def test_the_strict_build_fails_on(damage, tmp_path):
    """The check above can fail: the same site with one defect does not build."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("mkdocs.yml", "CHANGELOG.md", "SECURITY.md"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "docs", copy / "docs")
    faq = copy / "docs" / "faq.md"
    if damage == "broken link":
        faq.write_text(faq.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    elif damage == "broken anchor":
        faq.write_text(faq.read_text() + "\nSee [nowhere](policy.md#no-such-section).\n")
    else:
        (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    done = build(copy, tmp_path / "site")
    assert done.returncode != 0, f"{damage}: the strict build passed\n{done.stdout}{done.stderr}"


def test_every_generated_block_is_in_its_page_once():
    for name, page in BLOCKS.items():
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
            text = path.read_text()
            begins, ends = text.count(f"<!-- {name}:begin"), text.count(f"<!-- {name}:end -->")
            want = 1 if path.name == page and path.parent.name == "docs" else 0
            assert (begins, ends) == (want, want), f"{path.relative_to(ROOT)}: {begins} {name}:begin / {ends} {name}:end, want {want}"


def test_readme_keeps_the_set_up_commands_ci_runs():
    """The README's first two commands are the project's front door; .ci/run runs the second as written."""
    commands = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    ")][:2]
    assert commands[0] == "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/ti-guard demo"
    assert commands[1] == "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
