"""Output files: names made from inputs, and writes that never leave half a file behind."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def temporary(path: Path) -> Iterator[Path]:
    """A fresh temporary file beside `path` (same folder, same suffix); removed unless it was renamed away."""
    path = Path(path)
    # The suffix is kept so writers that pick a format from the name (ffmpeg) still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then rename: a crash never leaves half a file."""
    with temporary(path) as tmp:
        write(tmp)
        os.replace(tmp, path)


def slug(text: str, limit: int = 40, fallback: str = "video") -> str:
    """A file-name-safe form of `text`, never empty: letters, digits and their accents of any script, lowercase,
    anything else one dash ("Zoë" -> "zoë", "李雷" -> "李雷", "Astro Naut!" -> "astro-naut"). NFKC first, so a name
    typed with a combining accent or full-width letters names the same file."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    # Letters (L), marks (M: an accent, a Devanagari vowel sign) and digits (N); never a separator, a dot or an
    # invisible format character (a right-to-left override would make the name read differently).
    kept = "".join(c if unicodedata.category(c)[0] in "LMN" else "-" for c in text)
    return re.sub(r"-+", "-", kept).strip("-")[:limit].strip("-") or fallback


# A video of the default size is a few MB; less free space than this fails the encode late.
MIN_FREE_BYTES = 64 << 20


def check_writable(path: Path, *, flag: str = "--out") -> None:
    """Prove before any work that a file can be made at `path`: not a folder, its folder a folder (or creatable
    under one) that this user may write to, with some free space. Raises `OutputError` naming `flag`."""
    from ..errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; name a file inside it, e.g. {path / ('video' + path.suffix)}")
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: no permission to write in {existing}")
    try:
        free = os.statvfs(existing).f_bavail * os.statvfs(existing).f_frsize
    except (OSError, AttributeError):  # no statvfs (Windows): the encode reports a full disk itself
        free = MIN_FREE_BYTES
    if free < MIN_FREE_BYTES:
        raise OutputError(f"{flag} {path}: only {free >> 20} MB free in {existing}")
