"""The broker URL: one check used by every command and the worker, and credentials kept out of
files and output.

- `check(url)` validates the scheme, reaches the server and logs in, failing with one clear
  line (BrokerError, exit 2 in the CLI). A wrong scheme or password fails at once; a server that
  cannot be reached is retried with backoff for `wait` seconds, each try logged (the worker
  waits CASCADE_BROKER_WAIT seconds at start-up, default 300: a Redis restart is ridden out;
  commands a person runs try once and answer in seconds).
- Job directories store the broker without credentials (`public`). A process connects to a
  job's broker with the credentials it was given (`remember`: the worker's and the command's
  --broker, or CASCADE_BROKER) for the same host, port and database (`credentials_for`).
- Every URL printed or logged goes through `redact`.
"""

from __future__ import annotations

import logging
import os
import time
from urllib.parse import urlsplit, urlunsplit

from cascade.errors import CascadeError

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")
_GIVEN: list[str] = []           # URLs with credentials this process was given, newest first
_CHECKED: set[str] = set()


class BrokerError(CascadeError):
    """The broker URL is wrong, the broker cannot be reached, or it refuses the credentials."""


def redact(url: str | None) -> str:
    if not url:
        return str(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def public(url: str | None) -> str | None:
    """The URL without user name and password: what a job directory records."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def remember(url: str | None):
    """Credentials this process may use for a broker (a command's --broker, a worker's URL)."""
    if url and url not in _GIVEN:
        _GIVEN.insert(0, url)


def credentials_for(stored: str | None) -> str | None:
    """The URL to connect to a job's recorded broker with: one this process was given (or
    CASCADE_BROKER) for the same scheme, host, port and database, else the recorded URL."""
    if not stored:
        return stored
    env = os.environ.get("CASCADE_BROKER")
    for url in _GIVEN + ([env] if env else []):
        if public(url) == public(stored):
            return url
    return stored


def check(url: str, wait: float = 0.0, who: str = "cascade") -> str:
    """Validate and reach the broker (see the module docstring); returns the URL. Checked URLs
    are remembered for the process, so repeated calls cost nothing."""
    import redis

    if url in _CHECKED:
        return url
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise BrokerError(f"{who}: the broker {redact(url)} is not a Redis URL (scheme {scheme!r}); "
                          f"use redis://[:PASSWORD@]HOST:PORT/DB, rediss://... or unix://...")
    deadline, delay, tries = time.monotonic() + wait, 0.5, 0
    while True:
        tries += 1
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
            try:
                client.ping()
            finally:
                client.close()
            break
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError,
                redis.exceptions.ResponseError) as exc:
            if urlsplit(url).password is None:
                raise BrokerError(f"{who}: the broker {redact(url)} needs a password ({exc}); give it as "
                                  f"redis://:PASSWORD@HOST:PORT/DB in CASCADE_BROKER or --broker") from None
            raise BrokerError(f"{who}: the broker {redact(url)} refused the password ({exc}); check "
                              f"the password in CASCADE_BROKER or --broker") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"{who}: cannot reach the broker {redact(url)}: {exc}"
                                  + (f" (tried for {wait:.0f} s)" if wait else "")) from None
            log.warning("%s: cannot reach the broker %s (try %d: %s); trying again in %.1f s, for "
                        "up to %.0f s more", who, redact(url), tries, exc, min(delay, left), left)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)
    _CHECKED.add(url)
    remember(url)
    return url


def worker_wait() -> float:
    """Seconds a worker waits for its broker at start-up (CASCADE_BROKER_WAIT, default 300)."""
    return float(os.environ.get("CASCADE_BROKER_WAIT", "300"))
