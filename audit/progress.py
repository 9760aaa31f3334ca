"""Progress bars on stderr, only when someone is watching a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, enabled: bool = True, **kwargs) -> Iterable[T]:
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, **kwargs)
