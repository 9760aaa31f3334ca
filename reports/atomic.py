"""Write outputs so that a crash, a kill or a second run leaves either the old set or the new.

Single files (``--junit-xml``, ``--markdown``) are written beside their target and renamed
over it. The run folder (``--out``) is written whole into a fresh sibling folder and swapped in
with one atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames,
with the old folder restored by the next run if a kill lands between them). A lock beside the
folder keeps two runs from writing the same ``--out``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path

from mcaudit.errors import InputError

OUTPUT_NAMES = {"results.json", "samples.csv", "index.html"}
FIGURES = "figures"  # figure files and gallery thumbnails (figures/thumbs/), which results.json names


def _ours(path: Path) -> bool:
    """Whether ``path`` in an output folder is one mcaudit writes (so replacing it loses nothing)."""
    if path.name in OUTPUT_NAMES or path.name.endswith(".tmp"):
        return True
    if path.name != FIGURES or not path.is_dir():
        return False
    return all(f.suffix in (".png", ".jpg", ".webp") or (f.is_dir() and f.name == "thumbs") for f in path.rglob("*"))


def write_files_atomically(out_dir: Path, files: dict[str, str | bytes]) -> list[Path]:
    """Each file written beside its target and renamed over it (for single-file outputs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for name, content in files.items():
            staged.append((name, _write_temp(out_dir, name, content)))
    except BaseException:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)
        raise
    written = []
    for name, tmp in staged:
        target = out_dir / name
        os.replace(tmp, target)
        written.append(target)
    return written


def _write_temp(folder: Path, name: str, content: str | bytes) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would surprise a web server
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _siblings(out_dir: Path, kind: str) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*"))


@contextlib.contextmanager
def output_lock(out_dir: Path):
    """Hold ``--out`` for this run; a second run on the same folder is refused at once."""
    import fcntl

    out_dir = Path(out_dir)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    fh = open(lock_path, "a+")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"--out {out_dir}: another mcaudit run is writing this folder") from None
        recover(out_dir)
        yield
    finally:
        fh.close()


def recover(out_dir: Path) -> None:
    """Undo what a killed run left: restore a folder moved aside, drop staged folders and
    temporary files. Only called with the lock held, so nothing here is in use."""
    out_dir = Path(out_dir)
    old = _siblings(out_dir, "old")
    if not out_dir.exists() and old:
        os.rename(old[-1], out_dir)
        old = old[:-1]
    for path in old + _siblings(out_dir, "staging"):
        shutil.rmtree(path, ignore_errors=True)
    if out_dir.is_dir():
        for tmp in out_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def check_writable(out_dir: Path) -> None:
    """Fail before the audit, not after it, when ``--out`` cannot take the outputs."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: is a file, not a folder")
    parent = out_dir.parent
    for p in [parent, *parent.parents]:
        if p.exists():
            if not p.is_dir():
                raise InputError(f"--out {out_dir}: {p} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = _write_temp(parent, f"{out_dir.name}.probe", b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from None
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if not _ours(p))
        if foreign:  # the whole folder is replaced, so anything else in it would be lost
            raise InputError(f"--out {out_dir}: holds files mcaudit did not write ({', '.join(foreign[:3])}); "
                             "give an empty folder or an earlier report folder")


def check_file_writable(path: Path, option: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder, not a file")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _write_temp(parent, path.name, b"").unlink()
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def replace_folder(out_dir: Path, files: dict[str, str | bytes]) -> list[Path]:
    """Write ``files`` as the whole content of ``out_dir``, swapped in at once."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        for name, content in files.items():
            target = staging / name  # a name may hold a sub-folder ("figures/x.png")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(_write_temp(target.parent, target.name, content), target)
        os.chmod(staging, 0o777 & ~_umask())
        if out_dir.exists():
            if not _exchange(staging, out_dir):
                aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                os.rmdir(aside)
                os.rename(out_dir, aside)
                os.rename(staging, out_dir)
                staging = aside
            shutil.rmtree(staging, ignore_errors=True)  # now the old set
        else:
            os.rename(staging, out_dir)
    except BaseException:
        if staging.exists() and staging.name.startswith(f".{out_dir.name}.staging-"):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / name for name in files]


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return result == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
