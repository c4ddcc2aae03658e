"""Output files: names made from inputs, and writes that never leave half a file behind."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same directory, then rename: a crash never leaves half a file."""
    path = Path(path)
    # The suffix is kept so writers that pick a format from the name (ffmpeg) still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slug(text: str, limit: int = 40, fallback: str = "video") -> str:
    """A file-name-safe form of `text` (letters, digits, dashes), never empty."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()[:limit].strip("-") or fallback
