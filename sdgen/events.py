"""What a run tells its front end, as typed events sent to a sink, and the token that cancels it.

A sink is any callable taking one event: the CLI's prints (progress bar, notices on stderr, paths on stdout),
a server's turns them into HTTP/JSON. Library code never prints. The engine checks the cancel token at every
model evaluation and between images, so a cancelled run stops within one UNet call and keeps every image it
already wrote.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdgen.errors import Cancelled


@dataclass(frozen=True)
class Loaded:
    """A model is ready (``description``: family, prediction type, config, device and precision)."""

    model: str
    description: str
    compiled: str | None = None


@dataclass(frozen=True)
class Started:
    """A run begins: its seed, sampler and how many model evaluations each batch takes (and why)."""

    seed: int
    seed_mode: str
    sampler: str
    steps: int
    evaluations: int  # per batch
    batches: int
    images: int
    why: str = ""  # why evaluations differ from steps, if they do


@dataclass(frozen=True)
class Step:
    """One model evaluation done: ``i`` of ``n`` in batch ``batch``; ``latents`` for a preview."""

    i: int
    n: int
    batch: int
    latents: Any = None


@dataclass(frozen=True)
class Notice:
    """Something the user should know. ``informational`` ones (a quiet front end may drop them) tell of
    nothing that changed the result's course; the others do (a prompt cut, an out-of-memory step down)."""

    message: str
    informational: bool = False


@dataclass(frozen=True)
class Saved:
    path: Path
    metadata: dict[str, Any]
    grid: bool = False


@dataclass(frozen=True)
class Finished:
    images: int
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class Stopped:
    """The run ended before its last image: ``reason`` is "cancelled", "interrupted" (Ctrl-C, SIGTERM) or
    "error" (``message`` says which); the exception is raised to the caller right after this event."""

    reason: str
    message: str
    images: int
    paths: tuple[Path, ...]


Event = Loaded | Started | Step | Notice | Saved | Finished | Stopped
Sink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The sink that hears nothing."""


@dataclass
class CancelToken:
    """Set from any thread (or a signal handler); the run raises :class:`Cancelled` at its next check.
    A token stays cancelled: use a new one for each run."""

    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")
