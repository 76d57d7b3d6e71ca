"""Hostile layer tars: nothing outside the layer may change, whatever apply_diff is given.

The oracle is go-archive's testBreakout: a *victim* directory beside the driver's home holds a
few files. Each case applies a tar through ``driver.apply_diff`` that tries to reach the victim
(``..`` names, absolute names, symlinks and hardlinks pointing out, whiteouts under symlinked
parents, metadata through a colliding symlink...). The apply may succeed (when the entry can be
kept inside the layer) or raise :class:`~graphdrivers.errors.InvalidArchive`; either way the
victim must be byte for byte, mode for mode, mtime for mtime and link count for link count what
it was, nothing may appear beside it, the parent layer must not change, and a failed apply must
leave no layer. Cases marked *must fail* are names the contract calls invalid.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from graphdrivers.conformance.fixtures import Case
from graphdrivers.conformance.helpers import make_layer, mkdir, tree, write
from graphdrivers.conformance.manifest import assert_same_tree, manifest
from graphdrivers.conformance.tars import TarBuilder
from graphdrivers.errors import InvalidArchive

# Enough ".." to reach "/" from any mountpoint, then down to the victim.
CLIMB = "../" * 48


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a case needs to aim at the victim."""

    victim: str  # absolute path of the victim directory

    @property
    def up(self) -> str:
        """A relative name that reaches the victim from anywhere."""
        return CLIMB + self.victim.lstrip("/")

    @property
    def up_parent(self) -> str:
        return CLIMB + os.path.dirname(self.victim).lstrip("/")


Build = Callable[[TarBuilder, Ctx], TarBuilder]
Prepare = Callable[[Path, Ctx], None]


@dataclasses.dataclass(frozen=True)
class Attack:
    build: Build
    must_fail: bool = False
    prepare: Prepare | None = None


def _link_to_victim_dir(root: Path, ctx: Ctx) -> None:
    os.symlink(ctx.victim, root / "link")


def _link_to_victim_file(root: Path, ctx: Ctx) -> None:
    os.symlink(ctx.victim + "/hello", root / "link")


ATTACKS: dict[str, Attack] = {
    # names that climb out or start at /
    "dotdot-new-file": Attack(lambda t, c: t.file(c.up + "/evil", b"pwned")),
    "dotdot-overwrite": Attack(lambda t, c: t.file(c.up + "/hello", b"pwned")),
    "dotdot-dir": Attack(lambda t, c: t.dir(c.up + "/newdir")),
    "dotdot-in-middle": Attack(lambda t, c: t.file("a/b/" + c.up + "/hello", b"pwned")),
    "absolute-overwrite": Attack(lambda t, c: t.file(c.victim + "/hello", b"pwned")),
    "absolute-new-file": Attack(lambda t, c: t.file(c.victim + "/evil", b"pwned")),
    # symlinks, then writes through them
    "symlink-then-write": Attack(
        lambda t, c: t.symlink("escape", c.victim).file("escape/hello", b"pwned")
    ),
    "symlink-relative-then-write": Attack(
        lambda t, c: t.symlink("escape", c.up).file("escape/evil", b"pwned")
    ),
    "symlink-then-dir": Attack(lambda t, c: t.symlink("escape", c.victim).dir("escape/newdir")),
    "two-hop-symlink": Attack(
        lambda t, c: t.symlink("hop1", "hop2").symlink("hop2", c.up).file("hop1/hello", b"pwned")
    ),
    "two-hop-symlink-nested": Attack(
        lambda t, c: (
            t.dir("d")
            .symlink("d/hop", "../hop2")
            .symlink("hop2", c.victim)
            .file("d/hop/evil", b"pwned")
        )
    ),
    "absolute-symlink-as-parent": Attack(
        lambda t, c: t.symlink("rootlink", "/").file("rootlink" + c.victim + "/hello", b"pwned")
    ),
    "dir-over-symlink-then-write": Attack(
        lambda t, c: t.symlink("d", c.victim).dir("d").file("d/evil", b"pwned")
    ),
    "lower-symlink-then-write": Attack(
        lambda t, c: t.file("link/hello", b"pwned"), prepare=_link_to_victim_dir
    ),
    # hardlinks out of the root
    "hardlink-out-relative": Attack(lambda t, c: t.hardlink("h", c.up + "/hello")),
    "hardlink-out-absolute": Attack(lambda t, c: t.hardlink("h", c.victim + "/hello")),
    "hardlink-then-write": Attack(
        lambda t, c: t.hardlink("h", c.up + "/hello").file("h", b"pwned")
    ),
    "hardlink-through-symlink": Attack(
        lambda t, c: t.symlink("s", c.victim).hardlink("h", "s/hello")
    ),
    "hardlink-to-symlink-then-write": Attack(
        lambda t, c: t.symlink("s", c.victim + "/hello").hardlink("h", "s").file("h", b"pwned")
    ),
    "hardlink-to-dir": Attack(lambda t, c: t.dir("d").hardlink("h", "d"), must_fail=True),
    "hardlink-to-missing": Attack(lambda t, c: t.hardlink("h", "no/such/file"), must_fail=True),
    # whiteouts that name the dir itself, its parent, or something outside
    "wh-bare": Attack(lambda t, c: t.file(".wh."), must_fail=True),
    "wh-dot": Attack(lambda t, c: t.file(".wh.."), must_fail=True),
    "wh-dotdot": Attack(lambda t, c: t.file(".wh..."), must_fail=True),
    "dir-wh-bare": Attack(lambda t, c: t.file("d/.wh."), must_fail=True),
    "dir-wh-dot": Attack(lambda t, c: t.file("d/.wh.."), must_fail=True),
    "dir-wh-dotdot": Attack(lambda t, c: t.file("d/.wh..."), must_fail=True),
    "whiteout-under-symlink": Attack(lambda t, c: t.symlink("s", c.victim).file("s/.wh.hello")),
    "whiteout-under-relative-symlink": Attack(lambda t, c: t.symlink("s", c.up).file("s/.wh.sub")),
    "whiteout-under-lower-symlink": Attack(
        lambda t, c: t.file("link/.wh.hello"), prepare=_link_to_victim_dir
    ),
    "opaque-under-symlink": Attack(lambda t, c: t.symlink("s", c.victim).file("s/.wh..wh..opq")),
    "opaque-under-lower-symlink": Attack(
        lambda t, c: t.file("link/.wh..wh..opq"), prepare=_link_to_victim_dir
    ),
    "whiteout-dotdot-name": Attack(lambda t, c: t.file(c.up + "/.wh.hello")),
    "whiteout-of-victim-dir": Attack(lambda t, c: t.file(c.up_parent + "/.wh.victim")),
    "opaque-dotdot": Attack(lambda t, c: t.file(c.up + "/.wh..wh..opq")),
    # entries that name the root itself
    "empty-name": Attack(lambda t, c: t.file("", b"x", mode=0o777, uid=4321)),
    "slash-dir": Attack(lambda t, c: t.dir("", mode=0o777, uid=4321, gid=4321)),
    "dot-dir": Attack(lambda t, c: t.dir(".", mode=0o777, uid=4321, gid=4321)),
    "dotslash-file": Attack(lambda t, c: t.file("./", b"x", mode=0o777, uid=4321)),
    # metadata through a symlink
    "symlink-entry-metadata": Attack(
        lambda t, c: t.symlink(
            "link", c.victim + "/hello", mode=0o777, uid=4321, gid=4321, mtime=0
        )
    ),
    "chmod-through-colliding-symlink-dir": Attack(
        lambda t, c: t.dir("link", mode=0o777, uid=4321, gid=4321, mtime=0),
        prepare=_link_to_victim_dir,
    ),
    "chmod-through-colliding-symlink-file": Attack(
        lambda t, c: t.file("link", b"pwned", mode=0o777, uid=4321, gid=4321, mtime=0),
        prepare=_link_to_victim_file,
    ),
    "xattr-through-colliding-symlink": Attack(
        lambda t, c: t.file("link/hello", b"pwned", xattrs={"user.evil": "1"}),
        prepare=_link_to_victim_dir,
    ),
    # special files aimed outside
    "device-inside": Attack(lambda t, c: t.device("dev/evil", 1, 3)),
    "device-outside": Attack(lambda t, c: t.device(c.up + "/evil-dev", 1, 3)),
    "block-device-outside": Attack(lambda t, c: t.device(c.up + "/evil-blk", 7, 0, block=True)),
    "fifo-outside": Attack(lambda t, c: t.fifo(c.up + "/evil-fifo")),
}


def _make_victim(victim: Path) -> None:
    victim.mkdir()
    os.chmod(victim, 0o755)
    (victim / "hello").write_bytes(b"hello victim\n")
    os.chmod(victim / "hello", 0o644)
    sub = victim / "sub"
    sub.mkdir()
    os.chmod(sub, 0o700)
    (sub / "inner").write_bytes(b"inner\n")
    os.chmod(sub / "inner", 0o600)


def _victim_state(case: Case) -> tuple[Any, list[str]]:
    m = manifest(case.victim, mtimes=True, dir_mtimes=True, nlink=True)
    return m, sorted(os.listdir(case.dir))


def _base(root: Path) -> None:
    write(root, "d/keep", b"in d")
    write(root, "top", b"at the top")
    mkdir(root, "a/b")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_breakout(gd_case: Case, name: str) -> None:
    """A hostile tar changes nothing outside its layer (see the module docstring)."""
    attack = ATTACKS[name]
    driver = gd_case.open()
    _make_victim(gd_case.victim)
    ctx = Ctx(os.fspath(gd_case.victim))

    def base(root: Path) -> None:
        _base(root)
        if attack.prepare is not None:
            attack.prepare(root, ctx)

    make_layer(driver, "base", None, base)
    base_tree = tree(driver, "base")
    victim_before, beside_before = _victim_state(gd_case)
    data = attack.build(TarBuilder(), ctx).to_bytes()

    error: Exception | None = None
    try:
        driver.apply_diff("evil", "base", _stream(data))
    except InvalidArchive as exc:
        error = exc
    except Exception as exc:
        raise AssertionError(
            f"{name}: apply_diff raised {type(exc).__name__}: {exc}; a hostile tar must "
            "raise InvalidArchive (or BreakoutError) or be kept inside the layer"
        ) from exc

    victim_after, beside_after = _victim_state(gd_case)
    assert_same_tree(victim_before, victim_after, f"{name}: the victim beside the home")
    assert beside_after == beside_before, f"{name}: new entries beside the home: {beside_after}"
    assert_same_tree(base_tree, tree(driver, "base"), f"{name}: the parent layer")

    if error is not None:
        assert not driver.exists("evil"), f"{name}: the failed apply left its layer"
        assert "evil" not in driver.list_layers()
        return
    assert not attack.must_fail, f"{name}: the contract calls this tar invalid, it was accepted"
    with driver.mounted("evil") as root:
        st = os.lstat(root)
        assert stat.S_ISDIR(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0) or (
            os.geteuid() != 0
        ), f"{name}: the layer root became {stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid}"


def _stream(data: bytes) -> Any:
    import io

    return io.BytesIO(data)
