"""The one place where handler failures become errnos.

pyfuse3 ends the whole daemon when a handler raises anything but ``FUSEError``, so every handler
of the Operations class is wrapped: ``OSError`` from a syscall on a backing layer becomes its
errno, any other exception is logged with its traceback and becomes ``EIO``. The wrapper also
trims the directory fd cache between requests (see :class:`fusemount.inodes.FdCache`) and logs
one debug line per request when debug logging is on.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

log = logging.getLogger(__name__)

HANDLERS = (
    "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir",
    "symlink", "rename", "link", "open", "read", "write", "flush", "release", "fsync",
    "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr",
    "listxattr", "removexattr", "access", "create",
)  # fmt: skip

C = TypeVar("C", bound=type)
Handler = Callable[..., Awaitable[Any]]


def _wrap(name: str, fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def handler(self: Any, *args: Any) -> Any:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", name, args)
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            log.debug("%s: %s", name, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", name, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.after_request()

    return handler


def guarded(cls: C) -> C:
    """Class decorator: wrap every FUSE handler the class (or its bases) defines."""
    for name in HANDLERS:
        fn = getattr(cls, name, None)
        if fn is not None:
            setattr(cls, name, _wrap(name, fn))
    return cls
