"""OS and object-store failures (a full disk, an I/O error, a fault that outlived the retries) as one
:class:`StorageError` line: the store, the operation, what went wrong, and what was left behind, instead of a
raw ``OSError [Errno 28]`` or obstore traceback. Each writing operation of the store runs inside
:func:`storage_errors` with a ``left`` callback that says, from how far it got, what a user finds afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Iterator

import obstore

from daunce_store.errors import DaunceStoreError, StorageError

__all__ = ["storage_errors", "describe_os_error"]

_OS_ERROR = re.compile(r"os error (\d+)")


def describe_os_error(error: BaseException) -> str:
    """What went wrong, in a few words: the OS's text for the errno (obstore's local store reports it as
    ``(os error 28)`` inside its message), and the file or key when known."""
    code = getattr(error, "errno", None)
    if code is None:
        match = _OS_ERROR.search(str(error))
        code = int(match.group(1)) if match else None
    if code is not None:
        what = os.strerror(code).lower()
        if code == errno.ENOSPC:
            what += " (free space, or move the store, then run the command again)"
    else:
        text = str(error).strip()
        what = text.splitlines()[0] if text else type(error).__name__
    name = getattr(error, "filename", None)
    return f"{what} at {name}" if name else what


@contextlib.contextmanager
def storage_errors(url: str, operation: str, left: Callable[[], str]) -> Iterator[None]:
    """Run ``operation``; an ``OSError`` or obstore error inside becomes one :class:`StorageError`
    ``"<url>: <operation> failed: <what>; <left()>"``. Errors of this package pass through unchanged."""
    try:
        yield
    except DaunceStoreError:
        raise
    except (OSError, obstore.exceptions.BaseError) as e:
        raise StorageError(f"{url}: {operation} failed: {describe_os_error(e)}; {left()}") from e
