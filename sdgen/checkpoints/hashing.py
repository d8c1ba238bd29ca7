"""A1111's 'Model hash': the first 10 hex digits of the file's SHA-256, cached by path, size and mtime."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sdgen.runtime.cache import cache_dir


def model_hash(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / "hashes.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        known[key] = h.hexdigest()
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, store)
        except OSError:
            pass  # a read-only cache only costs time next run
    return known[key][:10]
