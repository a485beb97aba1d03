"""Datasets behind fsspec URLs (s3://, gs://, https://, ...): the filesystem with its backend and
timeouts, retries with backoff, node-wide file locks, and the manifest. The shards are read through
pretrain/data/remote_dataset.py (.idx files) and remote_cache.py (.bin byte ranges)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pretrain.errors import DataError

MANIFEST = "manifest.json"
INSTALL = "pip install -e '.[remote]'"
# The package each protocol's fsspec backend needs (the `remote` extra installs them).
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
T = TypeVar("T")


class RemoteDataError(DataError):
    """A remote dataset that cannot be read (after retries); names the URL."""


class RemoteBackendMissing(RemoteDataError):
    """The fsspec backend of a URL's protocol is not installed; names the extra that installs it."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0

    @classmethod
    def of(cls, cfg: Any) -> RetryPolicy:
        """From a DataConfig (data.remote_attempts, remote_backoff_s, remote_timeout_s)."""
        return cls(cfg.remote_attempts, cfg.remote_backoff_s, cfg.remote_timeout_s)


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def default_cache_dir() -> Path:
    return Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain")) / "datasets"


def open_filesystem(url: str, policy: RetryPolicy) -> tuple[Any, str]:
    """(fsspec filesystem, root path) of `url`; a missing backend is a data error naming the extra."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        return fsspec.core.url_to_fs(url, **_storage_options(protocol, policy))
    except ImportError as e:
        package = BACKENDS.get(protocol, f"the fsspec backend of {protocol}://")
        raise RemoteBackendMissing(
            f"data.paths has {url}: reading {protocol}:// needs {package}, which is not installed ({e}); "
            f"install the remote extra: {INSTALL}"
        ) from e
    except ValueError as e:  # fsspec: "Protocol not known"
        raise RemoteDataError(
            f"data.paths has {url}, whose protocol {protocol}:// fsspec does not know ({e}); use a local "
            f"folder or an s3://, gs:// or http(s):// URL"
        ) from e


def _storage_options(protocol: str, policy: RetryPolicy) -> dict[str, Any]:
    """Our timeouts, under whatever the user configured for the protocol (FSSPEC_<PROTOCOL>_* variables
    or fsspec's config files), which wins: fsspec would let our options replace theirs whole."""
    import fsspec.config

    user = dict(fsspec.config.conf.get(protocol, {}))
    t = policy.timeout_s
    if protocol in ("http", "https") and _importable("aiohttp"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
        return {"client_kwargs": {"timeout": timeout, **user.get("client_kwargs", {})}}
    if protocol in ("s3", "s3a"):
        ours = {"connect_timeout": t, "read_timeout": t}
        return {"config_kwargs": {**ours, **user.get("config_kwargs", {})}}
    return {}


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _transient() -> tuple[type[BaseException], ...]:
    """What a retry may cure: I/O and connection errors, timeouts, and HTTP errors (5xx; aiohttp's
    are not OSErrors). Missing files and refused permissions are not retried."""
    errors: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
    try:
        import aiohttp
    except ImportError:
        return errors
    return (*errors, aiohttp.ClientError)


def with_retries(action: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """`action()`, tried policy.attempts times with exponential backoff; then a RemoteDataError on `what`."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except FileNotFoundError as e:
            raise RemoteDataError(f"{what} does not exist: {e}") from e
        except PermissionError as e:
            raise RemoteDataError(f"{what} cannot be read ({e}); check the credentials") from e
        except _transient() as e:
            if attempt == policy.attempts:
                raise RemoteDataError(
                    f"cannot read {what} after {policy.attempts} attempts: {type(e).__name__}: {e}; "
                    f"check the server, or raise data.remote_attempts / data.remote_timeout_s"
                ) from e
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def read_bytes(
    fs: Any, path: str, what: str, policy: RetryPolicy, start: int | None = None, end: int | None = None
) -> bytes:
    """The bytes of `path` (or of its range [start, end)), with retries."""
    return bytes(with_retries(lambda: fs.cat_file(path, start=start, end=end), what, policy))


def fetch_manifest(url: str, policy: RetryPolicy | None = None) -> bytes:
    """The bytes of the manifest of the dataset at `url` (and nothing else of it)."""
    policy = policy or RetryPolicy()
    fs, root = open_filesystem(url, policy)
    return read_bytes(fs, f"{root.rstrip('/')}/{MANIFEST}", f"{url.rstrip('/')}/{MANIFEST}", policy)


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """Exclusive among the processes sharing `path`'s filesystem (the ranks of a node with a node-local
    cache): the first to arrive does the work, the others wait here, with no collective to time out.
    The lock file stays: unlinking it would let a waiter and a newcomer hold two different locks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def install_bytes(target: Path, data: bytes) -> None:
    """Write a cache file so that readers see it whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
