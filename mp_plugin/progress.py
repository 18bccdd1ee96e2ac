"""A tqdm progress bar that degrades to a no-op when tqdm is missing or output is not wanted."""

from __future__ import annotations

from typing import Any

__all__ = ["progress"]


class _Silent:
    def __init__(self, iterable: Any = None, **_: Any) -> None:
        self._it = iterable

    def __iter__(self):
        return iter(self._it if self._it is not None else ())

    def update(self, n: int = 1) -> None:
        """No-op."""

    def set_postfix(self, *_: Any, **__: Any) -> None:
        """No-op."""

    def set_description(self, *_: Any, **__: Any) -> None:
        """No-op."""

    def close(self) -> None:
        """No-op."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def progress(iterable: Any = None, disable: bool = False, **kwargs: Any) -> Any:
    """Return ``tqdm(iterable, **kwargs)``, or a silent stand-in when disabled or tqdm is absent."""
    if disable:
        return _Silent(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a core dependency, but stay usable without it
        return _Silent(iterable)
    return tqdm(iterable, **kwargs)
