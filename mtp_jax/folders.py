"""Folders a command makes: a refused command leaves none of them behind."""

from __future__ import annotations

import pathlib


def new_folders(path: pathlib.Path) -> list[pathlib.Path]:
    """The folders that making `path` would create, innermost first ([] when it exists)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(folders: list[pathlib.Path]) -> None:
    """Removes `folders` (innermost first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
