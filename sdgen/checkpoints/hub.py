"""The default model when no ``--ckpt`` is given: SD 1.5 from the Hugging Face cache, downloaded once.

Offline, huggingface_hub retries its DNS lookups for about half a minute before it gives up; sdgen first
asks, with a short timeout, whether the hub's host resolves and answers at all, and says at once when not.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from sdgen.errors import CheckpointError

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD 1.5, as most tools default to
DEFAULT_FILE = "v1-5-pruned-emaonly.safetensors"
REACH_TIMEOUT_S = 1.5


def _not_available(why: str) -> CheckpointError:
    return CheckpointError(
        f"no --ckpt given and the default model ({DEFAULT_REPO}/{DEFAULT_FILE}) is not cached "
        f"and {why}; pass your checkpoint with --ckpt PATH"
    )


def _reachable(host: str, port: int = 443) -> bool:
    def connect() -> bool:
        with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
            return True

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=REACH_TIMEOUT_S)
    except (OSError, concurrent.futures.TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)  # a hung DNS lookup is left to finish in its thread


def default_checkpoint(notice: Callable[[str], None]) -> Path:
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(DEFAULT_REPO, DEFAULT_FILE, local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE"):
        raise _not_available("HF_HUB_OFFLINE is set")
    host = urlparse(constants.ENDPOINT).hostname or ""
    if not _reachable(host):
        raise _not_available(f"{host} cannot be reached (offline?)")
    notice(f"sdgen: no --ckpt given; downloading {DEFAULT_REPO}/{DEFAULT_FILE} (once)")
    try:
        return Path(hf_hub_download(DEFAULT_REPO, DEFAULT_FILE))
    except Exception as e:
        raise _not_available(f"could not be downloaded ({type(e).__name__})") from e
