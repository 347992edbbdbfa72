"""Writes that never leave a half-written file or folder behind: build beside, then rename.

Temp files and folders are created with mode 0666/0777 and the umask applied by the kernel, so what
gets published has the permissions of any file the user creates (0644/0755 under umask 022);
`tempfile.mkstemp/mkdtemp` would make them private (0600/0700). Temp names carry the writer's pid,
`.NAME.PID-RANDOM.tmp`, so a later run can tell a killed run's leftovers from a live one's.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

from sdlora.errors import SdloraError
from sdlora.paths import check_output_file, explain_oserror

LEGACY_AGE_S = 24 * 3600   # leftovers of older versions (mkdtemp names, no pid) count as stale after a day


def umask() -> int:
    """The process umask, read without changing it (Linux: /proc); elsewhere set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)   # not thread-safe for the instant it is changed; only where /proc is missing
    os.umask(old)
    return old


def _temp_name(name: str, kind: str = "tmp") -> str:
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def temp_file(folder, name: str) -> Path:
    """A new empty file next to where `name` will go, with the umask's permissions."""
    while True:
        p = Path(folder) / _temp_name(name)
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return p
        except FileExistsError:
            continue


def temp_dir(folder, name: str, kind: str = "tmp") -> Path:
    """A new empty folder next to where `name` will go, with the umask's permissions."""
    while True:
        p = Path(folder) / _temp_name(name, kind)
        try:
            os.mkdir(p, 0o777)
            return p
        except FileExistsError:
            continue


def atomic_write(path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call `write(tmp)` to fill a temp file beside `path`, then rename it to `path`.

    overwrite=False never replaces an existing file (FileExistsError instead), even in a race.
    An OSError (disk full, read-only, no permission) becomes an SdloraError that says so and that
    `path` was left as it was.
    """
    path = check_output_file(path)
    existed = path.exists()
    try:
        tmp = temp_file(path.parent, path.name)
        try:
            try:
                write(tmp)
            except Exception as e:
                if as_oserror(e) is e:
                    raise
                raise as_oserror(e) from e
            os.chmod(tmp, 0o666 & ~umask())    # writers that replace the file (safetensors) make it 0600
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)      # fails if `path` exists: no silent overwrite
                os.unlink(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except FileExistsError:
        raise
    except OSError as e:
        raise SdloraError(f"cannot write {path}: {explain_oserror(e)}. Nothing was written"
                          + (f"; the existing {path.name} is unchanged" if existed else "")) from e
    return path


def as_oserror(e: Exception) -> Exception:
    """An I/O failure inside safetensors' Rust code (SafetensorError "... (os error 28) ...") as the
    OSError it was, so it is reported like any other; other exceptions are returned unchanged."""
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    if m is None:
        return e
    code = int(m[1])
    return OSError(code, os.strerror(code))


def atomic_save_file(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save that never leaves a half-written file at `path`."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {k: _utf8(str(v)) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _utf8(text: str) -> str:
    """Text safetensors can store: a file name that is not UTF-8 (surrogate escapes) gets U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` (same file system). An existing `final` is swapped
    out and deleted only after the new folder is in place; if the swap fails it is put back.
    The published folder gets the umask's permissions (whoever created `tmp`)."""
    os.chmod(tmp, 0o777 & ~umask())
    if not final.exists():
        os.replace(tmp, final)
        return
    trash = temp_dir(final.parent, final.name, kind="old")
    os.rename(final, trash / "old")
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(trash / "old", final)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:      # EPERM: someone else's live process
        return e.errno != errno.ESRCH
    return True


def clean_stale(folder, name: str, log=print) -> list[Path]:
    """Remove temp folders of `name` left in `folder` by killed runs: ours by name, and their writer
    is gone (pid not running) or, for older versions' names without a pid, older than a day."""
    ours = re.compile(rf"\.{re.escape(name)}\.(\d+)-[0-9a-f]{{8}}\.(tmp|old)")
    legacy = re.compile(rf"\.{re.escape(name)}\.(old\.)?[a-z0-9_]{{8}}(\.tmp)?")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        m = ours.fullmatch(entry.name)
        if m:
            stale = not _pid_alive(int(m[1]))
        elif legacy.fullmatch(entry.name):
            stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_AGE_S
        else:
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
            log(f"note: removed {entry.path}, left over by an interrupted run")
    return removed
