"""A1111's 'Model hash': the first 10 hex digits of the file's SHA-256, cached by path, size and mtime.

Hashing a 2-7 GB file takes seconds, so it never stands between the user and the first denoising step: when
the cache does not know the file, a background thread hashes it while the model loads and runs (hashlib and
file reads release the GIL), and the first PNG waits for it only if it is not done by then.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from sdgen.runtime.cache import cache_dir

HASH_DIGITS = 10


def _store() -> Path:
    return cache_dir() / "hashes.json"


def _known() -> dict[str, str]:
    """The cache's entries; an unreadable or malformed cache (e.g. ``null``) counts as empty."""
    try:
        known = json.loads(_store().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if isinstance(k, str) and isinstance(v, str)}


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (of any size), as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _remember(key: str, digest: str) -> None:
    known = _known()
    known[key] = digest
    store = _store()
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, store)
    except OSError:
        pass  # a read-only cache only costs time next run


class ModelHash:
    """A file's model hash, looked up at once and, when not cached, computed in a background thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._value: str | None = None
        self._error: OSError | None = None
        key = _key(path)
        digest = _known().get(key)
        if digest is not None:
            self._value = digest[:HASH_DIGITS]
            self._thread: threading.Thread | None = None
        else:
            self._thread = threading.Thread(target=self._compute, args=(key,), name="sdgen-hash", daemon=True)
            self._thread.start()

    def _compute(self, key: str) -> None:
        try:
            digest = file_sha256(self.path)
        except OSError as e:  # the file went away mid-run: the PNGs get no hash rather than no PNG
            self._error = e
            return
        _remember(key, digest)
        self._value = digest[:HASH_DIGITS]

    def value(self) -> str | None:
        """The hash (waiting for the thread if need be), or None if the file could not be read."""
        if self._thread is not None:
            self._thread.join()
        return self._value
