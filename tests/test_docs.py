"""The docs build with --strict, and every code block they (and the README) show runs.

Fences tell what a block is: ``python`` blocks of one page run in order as one script, ``sh``
blocks of one page run in order as one ``bash -e`` script with the venv's commands on PATH, and
``text`` blocks are output or diagrams, not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks(page: Path, lang: str) -> list[str]:
    return [body for fence, body in FENCE.findall(page.read_text()) if fence == lang]


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is not installed in the venv; run ./bootstrap"
    run = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if p.name not in nav]
    assert not missing, f"pages not reachable from the mkdocs nav: {missing}"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=page_id)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(blocks(page, "python")))
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{page.name}:\n{run.stdout}\n{run.stderr}"


# The README's shell block is the set-up commands, which .ci/run runs: see the last test.
@pytest.mark.parametrize("page", [p for p in PAGES[1:] if blocks(p, "sh")], ids=page_id)
def test_shell_blocks_run(page: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path)
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    script = "set -euo pipefail\n" + "\n".join(blocks(page, "sh"))
    run = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{page.name}:\n{run.stdout}\n{run.stderr}"


def test_readme_opens_with_the_two_setup_commands_ci_uses() -> None:
    first = blocks(REPO / "README.md", "sh")[0].splitlines()
    commands = [line.split("#")[0].strip() for line in first if line.strip()]
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.startswith("./bootstrap && ") and "graphdrivers compare" in main_job
    assert tests.startswith("./bootstrap && ")

    ci = (REPO / ".ci" / "run").read_text()
    assert "./bootstrap" in ci
    assert tests.removeprefix("./bootstrap && ") in ci
