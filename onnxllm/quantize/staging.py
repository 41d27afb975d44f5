"""Moving a staged variant into its package so that a failure (or Ctrl-C) can undo every step."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class Commit:
    """Moves staged files into place remembering what they replaced, so `rollback` can undo it all.

    `keep`: a file of the package (quality.json) that is rewritten in place, not moved: rollback
    restores the bytes it had when the commit began."""

    def __init__(self, root: Path, *, keep: str):
        self.root = root
        self.kept = root / keep
        self.moved: list[tuple[Path, Path | None]] = []  # (final, backup of what was there)
        self.original = self.kept.read_bytes() if self.kept.exists() else None

    def move(self, src: Path, final: Path) -> None:
        # Recorded before acting, so an interrupt between the two renames is still undone.
        backup = final.with_name(f".{final.name}.{os.getpid()}.old") if final.exists() else None
        self.moved.append((final, backup))
        if backup is not None:
            os.replace(final, backup)
        os.replace(src, final)

    def rollback(self) -> None:
        for final, backup in reversed(self.moved):
            with contextlib.suppress(OSError):
                if backup is None:
                    final.unlink(missing_ok=True)
                elif backup.exists():  # else the first rename never happened: final is the original
                    os.replace(backup, final)
        with contextlib.suppress(OSError):
            if self.original is None:
                self.kept.unlink(missing_ok=True)
            elif self.kept.read_bytes() != self.original:
                self.kept.write_bytes(self.original)

    def finish(self) -> None:
        for _, backup in self.moved:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
