"""Print the project's runtime requirements from pyproject.toml for the worker image, less the
packages the vLLM base image provides and pins for itself (torch, transformers and what vLLM
already brings). The image installs these, then the project with --no-deps, so the image's
dependencies never drift from pyproject.toml.

    python docker/requirements.py [pyproject.toml] > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib

# Provided by the vLLM base image at the versions vLLM was built against; never reinstalled.
FROM_BASE = {"torch", "transformers", "accelerate"}


def requirements(pyproject: str = "pyproject.toml") -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    name = lambda req: re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower()  # noqa: E731
    return [d for d in deps if name(d) not in FROM_BASE]


if __name__ == "__main__":
    print("\n".join(requirements(*sys.argv[1:])))
