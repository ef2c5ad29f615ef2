"""The documentation site builds with warnings as errors, and a failing example fails the build.

The full build executes every tutorial (markdown-exec) and renders every API page (mkdocstrings);
``--strict`` turns any warning -- a failing code block, a broken cross-reference, a docstring
parameter that is not in the signature -- into a failed build.  Never pass ``-q``: it drops the
warnings before ``--strict`` counts them, and a broken site then builds.  Skipped when the
``docs`` extra is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("markdown_exec")

ROOT = Path(__file__).resolve().parents[1]


def _build(config: Path, site: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    # one torch thread: it runs beside the other pytest-xdist worker (see scripts/docs.sh)
    env = dict(os.environ, MPLBACKEND="Agg", NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_site_builds_strict(tmp_path: Path) -> None:
    res = _build(ROOT / "mkdocs.yml", tmp_path / "site", timeout=600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-10000:]
    site = tmp_path / "site"
    for page in ["index.html", "methods.html", "cli.html", "compare.html", "api/ntkscope.html", "tutorials/five-lines.html"]:
        assert (site / page).is_file(), page
    cli = (site / "cli.html").read_text()
    assert "ntkscope estimate" in cli and "--model" in cli  # generated --help, not an empty block


@pytest.mark.parametrize(
    "body, message",
    [
        ('```python exec="on"\nraise ValueError("this example is broken")\n```\n', "this example is broken"),
        ("A link to [a name that does not exist][ntkscope.no_such_name].\n", "no_such_name"),
    ],
    ids=["failing-example", "broken-reference"],
)
def test_broken_page_fails_the_build(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# t\n\n" + body)
    (tmp_path / "mkdocs.yml").write_text(
        textwrap.dedent(
            """\
            site_name: t
            plugins: [markdown-exec, autorefs]
            markdown_extensions: [pymdownx.superfences]
            """
        )
    )
    res = _build(tmp_path / "mkdocs.yml", tmp_path / "site", timeout=120)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr
