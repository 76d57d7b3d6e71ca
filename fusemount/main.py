"""The ``fusemount`` command: parse options, mount, detach, serve, unmount.

Lifetime (the one place that owns it)::

    parent                      child (the daemon)
    ------                      ------------------
    fork ──────────────────────> setsid; open layers; pyfuse3.init (mounts)
                                 raise read_ahead_kb; write pidfile
    wait on the readiness pipe <─ "ok" (or the reason it failed)
    exit 0 (mount is live)       trio.run: one nursery with pyfuse3.main (its request loop
                                 trimmed by fusemount.dispatch) and the signal watcher
                                 SIGTERM/SIGINT/SIGHUP -> pyfuse3.terminate
                                 umount / fusermount3 -u -> pyfuse3.main returns
                                 pyfuse3.close(unmount=True); close fds; remove pidfile

Exit codes: 0 mounted (or, in the foreground, unmounted cleanly), 1 mounting failed, 2 bad
command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys

import pyfuse3
import trio

from fusemount import dispatch, kernel, options
from fusemount.layers import LayerStack
from fusemount.ops import UnionOperations
from fusemount.tree import TreeConfig, UnionTree
from graphdrivers.errors import InvalidOption

log = logging.getLogger(__name__)

READY = b"ok\n"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    try:
        opts = options.parse(sys.argv[1:] if argv is None else argv)
    except InvalidOption as exc:
        print(f"fusemount: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if opts.foreground:
        return serve(opts, None)
    return _detach(opts)


def _detach(opts: options.MountOptions) -> int:
    """Fork the daemon and return once it says the mount is live (or why it is not)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        code = EXIT_FAILED
        try:
            code = serve(opts, write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    os.close(read_fd)
    message = b"".join(chunks)
    if message == READY:
        return EXIT_OK
    os.waitpid(pid, 0)
    reason = message.decode(errors="replace").strip() or "the daemon exited before mounting"
    print(f"fusemount: {reason}", file=sys.stderr)
    return EXIT_FAILED


def _setup_logging(opts: options.MountOptions) -> None:
    level = logging.DEBUG if opts.debug else logging.INFO
    fmt = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    if opts.log:
        logging.basicConfig(filename=opts.log, level=level, format=fmt)
    else:
        logging.basicConfig(level=level if opts.foreground else logging.WARNING, format=fmt)


def _fd_budget() -> int:
    """Raise the soft fd limit to the hard one; the directory fd cache may use half."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(256, soft // 2)


def build(opts: options.MountOptions, fd_capacity: int = 4096) -> UnionOperations:
    """The Operations for these options (layers opened, nothing mounted)."""
    lowers, upper = list(opts.lowerdirs), opts.upperdir
    if opts.readonly and upper:
        lowers, upper = [upper, *lowers], None
    stack = LayerStack(lowers, upper, opts.workdir if upper else None)
    config = TreeConfig(
        whiteout=opts.whiteout,
        opaque_xattr=opts.opaque_xattr,
        upper_timeout=opts.upper_timeout,
        fd_capacity=fd_capacity,
    )
    return UnionOperations(UnionTree(stack, config))


def fuse_options(opts: options.MountOptions, writable: bool) -> set[str]:
    fuse_opts = {"default_permissions", f"fsname={opts.fsname}", "subtype=fusemount"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    if opts.auto_unmount:
        fuse_opts.add("auto_unmount")
    if not writable:
        fuse_opts.add("ro")
    if opts.debug:
        fuse_opts.add("debug")
    return fuse_opts


def serve(opts: options.MountOptions, ready_fd: int | None) -> int:
    """Mount, report readiness, run until unmounted or signalled, clean up."""
    _setup_logging(opts)
    os.umask(0)
    try:
        ops = build(opts, _fd_budget())
    except (OSError, ValueError) as exc:
        return _fail(ready_fd, f"cannot open the layers: {exc}")
    try:
        pyfuse3.init(ops, opts.mountpoint, fuse_options(opts, ops.copyup is not None))
    except RuntimeError as exc:
        ops.close()
        return _fail(ready_fd, f"cannot mount {opts.mountpoint}: {exc}")
    try:
        kernel.raise_read_ahead(opts.mountpoint)
        if opts.pidfile:
            with open(opts.pidfile, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        log.info("mounted %s (%d layers)", opts.mountpoint, len(ops.tree.stack.layers))
        if ready_fd is not None:
            os.write(ready_fd, READY)
            os.close(ready_fd)
            _detach_stdio()
        dispatch.install()
        trio.run(_run_session)
    finally:
        pyfuse3.close(unmount=True)
        ops.close()
        if opts.pidfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(opts.pidfile)
        log.info("unmounted %s", opts.mountpoint)
    return EXIT_OK


def _fail(ready_fd: int | None, reason: str) -> int:
    log.error("%s", reason)
    if ready_fd is None:
        print(f"fusemount: {reason}", file=sys.stderr)
    else:
        os.write(ready_fd, reason.encode(errors="replace") + b"\n")
        os.close(ready_fd)
    return EXIT_FAILED


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


async def _run_session() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals)
        await pyfuse3.main(min_tasks=1, max_tasks=dispatch.MAX_TASKS)
        nursery.cancel_scope.cancel()


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


if __name__ == "__main__":
    sys.exit(main())
