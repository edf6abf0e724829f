"""Headless Chromium for the browser tests: Debian's ``/usr/bin/chromium`` (or ``CAMLENS_CHROMIUM``) driven
by Playwright, whose own browser download is never used. Skipped when either is missing, a failure when
``CAMLENS_REQUIRE_BROWSER=1`` (CI)."""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import pytest

CHROMIUM = os.environ.get("CAMLENS_CHROMIUM", "/usr/bin/chromium")
ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run")


def chromium(extra: Sequence[str] = ()) -> Iterator[Any]:
    """Yield a launched Playwright Chromium (for a fixture); closes it afterwards."""
    required = os.environ.get("CAMLENS_REQUIRE_BROWSER") == "1"
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        if required:
            pytest.fail("playwright is not installed (pip install playwright; never `playwright install`)")
        pytest.skip("pip install playwright (no browser download)")
    if not os.path.exists(CHROMIUM):
        if required:
            pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        br = p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, *extra])
        yield br
        br.close()
