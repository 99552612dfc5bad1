"""The worker image's dependencies come from pyproject.toml, not from a hand-written list."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_image_requirements_are_pyprojects_less_what_the_vllm_base_pins():
    out = subprocess.run([sys.executable, "docker/requirements.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    kept = [d.replace(" ", "") for d in deps
            if not re.match(r"(torch|transformers|accelerate)\b", d)]
    assert out == kept and "polars>=1.20" in out
    assert not any(r.startswith(("torch", "transformers", "pandas")) for r in out)


def test_dockerfile_installs_from_the_metadata_only():
    text = (ROOT / "docker/Dockerfile").read_text()
    assert "docker/requirements.py" in text and "-c /tmp/base-constraints.txt" in text
    assert "--no-deps" in text
    run_lines = " ".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # no package pinned by hand (every requirement comes from pyproject.toml)
    assert not re.search(r'"[a-z][a-z0-9_.\[\]-]*[<>=]=?[0-9]', run_lines)
