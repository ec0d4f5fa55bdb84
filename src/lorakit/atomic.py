"""Writes that either complete or leave things as they were: files and whole folders, put in place by rename.

Every write goes to a temporary sibling `.{name}.tmp-{host}-{pid}-{random}`, is flushed to disk, and is put
in place with one rename; a folder replaces an existing one by an atomic exchange of the two (Linux
`renameat2(RENAME_EXCHANGE)`), so a reader sees the old folder or the new one, never a mix. The writer holds
an exclusive lock on the parent folder from its check to its rename, so the check that a place is free and the
write are one step, and two processes writing to one place take turns. A temporary whose writer died (a kill)
is removed by the next write to that place.

Nothing here imports the rest of lorakit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the renames stay atomic
    fcntl = None

_HOST = socket.gethostname().replace("-", "_").replace(".", "_")[:32] or "host"


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """A fresh temporary sibling of `target`, named so a later writer can tell whether its owner still lives."""
    return target.with_name(f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _owner_alive(name: str, target: str, kinds: Iterable[str]) -> bool | None:
    """For a temporary of `target` (None if `name` is not one): whether its writing process still runs.

    A temporary from another host counts as alive: its owner cannot be checked from here."""
    for kind in kinds:
        prefix = f".{target}.{kind}-"
        if not name.startswith(prefix):
            continue
        host, _, rest = name[len(prefix):].partition("-")
        pid, _, _ = rest.partition("-")
        if host != _HOST or not pid.isdigit():
            return True
        if int(pid) == os.getpid():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return None


def _clean_stale(target: Path) -> list[Path]:
    """Remove the temporaries of `target` whose writer has died; restore a folder that an interrupted
    two-rename swap had moved aside. Returns what was removed."""
    parent, removed = target.parent, []
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        alive = _owner_alive(entry.name, target.name, ("tmp", "old"))
        if alive is not False:
            continue
        if entry.name.startswith(f".{target.name}.old-") and not target.exists():
            os.rename(entry, target)  # the swap stopped between its two renames: the old one is the one
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def tidy(target: Path) -> list[Path]:
    """Remove what killed writers of `target` left beside it (see `_clean_stale`); returns what was removed."""
    target = _real(target)
    with locked(target.parent):
        return _clean_stale(target)


def clean_folder(folder: Path) -> list[Path]:
    """Remove the temporaries of every entry of `folder` whose writer has died (see `clean_stale`)."""
    removed = []
    with locked(folder):
        for entry in sorted(folder.iterdir()):
            m = _TEMPORARY.fullmatch(entry.name)
            if m and _owner_alive(entry.name, m["target"], ("tmp", "old")) is False:
                removed += _clean_stale(folder / m["target"])
    return removed


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if needed) for the block; writers of its entries take turns."""
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks: the renames stay atomic, writers no longer take turns
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot sync a folder
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for f in files:
            _fsync(Path(folder) / f)
        _fsync(Path(folder))


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: str | os.PathLike, data: bytes | str, overwrite: bool = True) -> Path:
    """Write `data` to `path` whole: a reader sees the old content or the new, never part of either.

    overwrite False: raise FileExistsError if `path` exists, checked and written as one step."""
    path = Path(os.path.abspath(path))
    if isinstance(data, str):
        data = data.encode("utf-8")
    with locked(path.parent):
        _clean_stale(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder, not a file")
        tmp = temp_name(path)
        try:
            _write_bytes(tmp, data)
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if path exists, even if another writer made it just now
                tmp.unlink()
            _fsync(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write, flushed to disk (a kill leaves whole lines, at worst a torn last one)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or filesystem cannot, so the caller falls back to two renames."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(tmp|old)-[^-]+-\d+-[0-9a-f]{8}")


def replaceable(target: str | os.PathLike, replaced: Callable[[str], bool] = lambda name: True) -> list[Path]:
    """Check that a whole-folder write may replace `target`; return the entries of it that the write keeps
    (those for which `replaced(name)` is False). FileExistsError if `target` is a file, holds the current
    folder, or would keep a folder or a special file (which would have to be copied)."""
    old = _real(target)
    if old.exists() and not old.is_dir():
        raise FileExistsError(f"{old} is a file, not a folder")
    if not old.exists():
        return []
    here = Path.cwd()
    if here == old or old in here.parents:
        raise FileExistsError(f"{old} holds the current folder; it cannot be replaced as a whole")
    kept = [e for e in sorted(old.iterdir()) if not (replaced(e.name) or _TEMPORARY.fullmatch(e.name))]
    odd = [e.name for e in kept if not (e.is_symlink() or e.is_file())]
    if odd:
        raise FileExistsError(f"{old} holds {', '.join(odd[:3])}, which is not part of what is written there; "
                              f"give a new folder, or one that holds only files")
    return kept


def _carry(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    """Bring the files of folder `old` that the write does not replace into `new` (hard links where possible;
    temporaries of writes inside `old` stay behind). A folder or special file there that is not replaced is
    refused (FileExistsError) rather than copied: the old folder is only exchanged when that costs nothing."""
    for entry in replaceable(old, replaced):
        if (new / entry.name).exists():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
            continue
        try:
            os.link(entry, new / entry.name)
        except OSError:
            shutil.copy2(entry, new / entry.name)


def _real(target: str | os.PathLike) -> Path:
    """`target` as an absolute path; a folder reached through a symbolic link is written where the link
    points, and the link stays."""
    target = Path(os.path.abspath(target))
    return target.resolve() if target.is_symlink() else target


def stage(target: str | os.PathLike) -> Path:
    """A new empty temporary folder beside `target`, to fill and then `publish` at `target`."""
    target = _real(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    tmp.mkdir()
    return tmp


def publish(
    tmp: Path,
    target: str | os.PathLike,
    check: Callable[[Path], None] | None = None,
    replaced: Callable[[str], bool] | None = None,
) -> Path:
    """Put the filled folder `tmp` at `target` in one step, replacing what was there.

    Under the parent's lock: `check(target)` may refuse (it raises) before anything changes; the entries of
    an existing `target` for which `replaced(name)` is False are carried into the new folder (default: none
    is carried); then the two are exchanged and the old one removed. On any error `tmp` is removed and
    `target` is as it was."""
    target = _real(target)
    try:
        with locked(target.parent):
            _clean_stale(target)
            replaceable(target, replaced or (lambda name: True))
            if check is not None:
                check(target)
            if target.is_dir() and replaced is not None:
                _carry(target, tmp, replaced)
            _sync_tree(tmp)
            if not target.exists():
                os.rename(tmp, target)  # onto nothing, or an empty folder made meanwhile; a full one refuses
            elif _exchange(tmp, target):
                shutil.rmtree(tmp)  # now the old folder
            else:
                aside = temp_name(target, "old")
                os.rename(target, aside)
                os.rename(tmp, target)
                shutil.rmtree(aside)
            _fsync(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_dir(
    target: str | os.PathLike,
    fill: Callable[[Path], None],
    check: Callable[[Path], None] | None = None,
    replaced: Callable[[str], bool] | None = None,
) -> Path:
    """Make the folder `target` whole: `fill(tmp)` writes its files into a temporary folder, which is then
    published at `target` (see `publish`). A failure or a kill leaves `target` as it was."""
    target = _real(target)
    tidy(target)
    tmp = stage(target)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, target, check, replaced)
