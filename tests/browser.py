"""Debian's chromium for the tests that look at hearth as a person would: its flags, and what a test does when
it (or JupyterLab, or Playwright) is missing: skip on a developer's machine, fail in CI (`CI=true`), where
scripts/test installs chromium and the test extra brings JupyterLab and Playwright."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def need(*what: str) -> None:
    """Skip (fail under CI=true) unless each of `what` is here: "chromium", "jupyterlab", "playwright"."""
    missing = []
    if "chromium" in what and shutil.which(CHROMIUM) is None:
        missing.append("Debian's chromium (scripts/test installs it when run as root)")
    for module in ("jupyterlab", "playwright"):
        if module in what and importlib.util.find_spec(module) is None:
            missing.append(f"{module} (the test extra: scripts/setup)")
    if missing:
        message = "missing: " + "; ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
