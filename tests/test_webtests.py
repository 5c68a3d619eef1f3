"""The web page's JavaScript unit tests (webtests/, node's built-in runner), run under pytest."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO


def test_node_webtests_pass():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs); webtests/ cannot run")
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "webtests").glob("*.test.mjs"))
    assert files, "webtests/ holds no *.test.mjs files"
    # Files listed explicitly: node 20 and node 22+ read a bare directory argument differently.
    result = subprocess.run([node, "--test", "--test-reporter=tap", *files], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    found = re.findall(r"^# (tests|pass|fail|cancelled) (\d+)$", out, re.MULTILINE)
    counts = {key: int(n) for key, n in found}
    assert result.returncode == 0, f"node --test failed:\n{out[-6000:]}"
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, out[-6000:]
    assert counts.get("pass", 0) >= len(files) and counts["pass"] == counts["tests"], out[-6000:]
