"""A test that needs a service (Redis, redis-server, vLLM) which is missing fails, naming what is
missing; it skips only where the person running the suite asked for that skip:

    CASCADE_ALLOW_SKIP=redis,vllm python -m pytest -q     (or CASCADE_ALLOW_SKIP=all)

`make test` starts Redis and `make install` installs vLLM, so a full run needs neither. A skip
that nobody asked for would read as a pass."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.redis_server import redis_up

MAIN_REDIS = "redis://127.0.0.1:6379/0"


def allowed(service: str) -> bool:
    asked = {s.strip() for s in os.environ.get("CASCADE_ALLOW_SKIP", "").split(",") if s.strip()}
    return service in asked or "all" in asked


def missing(service: str, reason: str, module: bool = False):
    if allowed(service):
        pytest.skip(f"{reason} (CASCADE_ALLOW_SKIP={service})", allow_module_level=module)
    pytest.fail(f"{reason}. Start or install it (make test starts Redis; make install installs "
                f"vLLM), or skip on purpose with CASCADE_ALLOW_SKIP={service}", pytrace=False)


def require_redis(url: str = MAIN_REDIS):
    if not redis_up(url):
        missing("redis", f"no Redis answers at {url}")


def require_redis_server():
    if not shutil.which("redis-server"):
        missing("redis", "redis-server is not installed (fault tests start their own)")
