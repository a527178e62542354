"""report.html opened in a real headless browser (Debian's chromium): the page renders offline and its plots are
drawn. Skipped when no chromium is installed (.ci/run installs it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from prefdiag.cli import app

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NMR_RGB = np.array([0xD8, 0x1B, 0x60]) / 255  # prefdiag.reports.plots.NMR_COLOUR: negative-margin-regime points


def find_browser() -> str | None:
    override = os.environ.get("PREFDIAG_CHROMIUM")
    if override:
        return override if shutil.which(override) else None
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def screenshot(browser: str, page: Path, png: Path, profile: Path, height: int = 3000) -> None:
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size=1200,{height}", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]


@pytest.mark.skipif(find_browser() is None, reason="no chromium found (apt-get install chromium; or PREFDIAG_CHROMIUM)")
def test_report_renders_with_its_plots_in_headless_chromium(model_dirs, pairs_file, tmp_path):
    import matplotlib.image

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["compare", str(pairs_file), "-r", str(model_dirs["llama"]), "-p", str(model_dirs["llama-policy"]),
         "--device", "cpu", "-q", "-o", str(out), "--min", "ranking_accuracy=0.5"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["negative_margin_regime_rate"] > 0
    png = tmp_path / "report.png"
    screenshot(find_browser(), out / "report.html", png, tmp_path / "profile")
    image = matplotlib.image.imread(png)[..., :3]
    assert image.shape == (3000, 1200, 3)
    # The quadrant scatter is drawn: its negative-margin-regime markers (opaque, one colour) are on the page.
    marker = (np.abs(image - NMR_RGB) < 0.05).all(axis=-1)
    assert marker.sum() > 50, "no negative-margin-regime markers: the scatter plot did not render"
    rows = np.flatnonzero(marker.any(axis=1))
    assert 600 < rows.min() < 2500  # below the gate banner and metric table, within the first screen
    # The page is not blank: a good share of it is drawn (plots, tables), not background.
    background = (np.abs(image - image[5, 5]) < 0.02).all(axis=-1)
    assert background.mean() < 0.85
    if os.environ.get("PREFDIAG_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["PREFDIAG_KEEP_SCREENSHOT"])
