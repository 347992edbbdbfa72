"""Why a path cannot be read or written, said in words (for inputs, outputs and OSErrors).

Checks run before any expensive work, so a bad path fails in a second, not after a model load.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from sdlora.errors import SdloraError

# errno -> (what happened, what to do)
_ERRNO = {
    errno.ENOSPC: ("no space left on the device", "free some space or write somewhere else"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write somewhere else"),
    errno.EROFS: ("the file system is read-only", "write somewhere else"),
    errno.EACCES: ("permission denied", "check the permissions or write somewhere else"),
    errno.EPERM: ("operation not permitted", "check the permissions or write somewhere else"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("it is a folder, not a file", "give a file name"),
    errno.ELOOP: ("a symbolic link loop (a link that points back to itself)", "fix or remove the link"),
    errno.ENAMETOOLONG: ("the name is too long", "use a shorter path"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
    errno.EIO: ("an input/output error (a failing disk or network drive?)", "check the device"),
}


def explain_oserror(e: OSError) -> str:
    """One sentence for an OSError: the path, what happened (errno name) and what to do."""
    if e.errno is None:      # raised with a message of ours (FileNotFoundError("no such LoRA file ..."))
        return str(e)
    what, todo = _ERRNO.get(e.errno, (e.strerror or str(e), "check the path and the device"))
    code = errno.errorcode.get(e.errno, "")
    where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
    other = f" (and {os.fsdecode(e.filename2)})" if getattr(e, "filename2", None) is not None else ""
    return f"{where}{what}{f' [{code}]' if code else ''}{other}; {todo}"


def check_input_file(path, what: str = "file") -> Path:
    """`path` as a readable regular file, or an SdloraError saying what it is instead."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise SdloraError(f"{what} {path} is a broken symbolic link (to {os.readlink(path)}); "
                              "fix or remove the link") from None
        if e.errno == errno.ENOENT:
            raise SdloraError(f"{what} {path} not found; check the path") from None
        raise SdloraError(f"cannot read {what} {explain_oserror(e)}") from None
    if os.path.isdir(path):
        raise SdloraError(f"{what} {path} is a folder, not a file; give the path of a file inside it")
    if not os.path.isfile(path):
        raise SdloraError(f"{what} {path} is not a regular file (mode {oct(st.st_mode)}); give a file")
    return path


def check_output_file(path) -> Path:
    """`path` can be created or replaced as a file: its folder exists and it is not a folder itself."""
    path = Path(path)
    if path.is_dir():
        raise SdloraError(f"cannot write {path}: it is an existing folder; give a file name, "
                          f"e.g. {path / 'mix.safetensors'}")
    if not path.parent.is_dir():
        raise SdloraError(f"cannot write {path}: folder {path.parent} does not exist; create it or pick another path")
    return path


def check_output_dir(path) -> Path:
    """`path` is a folder or can be created as one (its nearest existing ancestor is a writable folder)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            raise SdloraError(f"cannot write to {path}: {probe} is a broken symbolic link; fix or remove it")
        probe = probe.parent
    if not probe.is_dir():
        raise SdloraError(f"cannot write to {path}: {probe} is a file, not a folder; pick another output folder")
    if not os.access(probe, os.W_OK):
        raise SdloraError(f"cannot write to {path}: {probe} is not writable (read-only or no permission); "
                          "pick another output folder")
    return path


def scan_tree(base: Path, what: str = "the base folder") -> tuple[list[Path], list[Path]]:
    """(folders, files) of `base`, relative, links followed; a link loop or a broken link is an error
    (said before any work, instead of a copy that never ends or a loader's traceback)."""
    base = Path(base)
    dirs, files = [], []

    def walk(folder: Path, rel: Path, above: frozenset):
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise SdloraError(f"cannot read {what}: {explain_oserror(e)}") from None
        for entry in entries:
            if entry.name == ".git":
                continue
            p = Path(entry.path)
            try:
                is_dir = stat.S_ISDIR(os.stat(p).st_mode)   # follows links
            except OSError as e:
                if e.errno == errno.ENOENT and p.is_symlink():
                    raise SdloraError(f"{p} in {what} is a broken symbolic link (to {os.readlink(p)}); "
                                      "fix or remove it") from None
                raise SdloraError(f"cannot read {what}: {explain_oserror(e)}") from None
            if not is_dir:
                files.append(rel / entry.name)
                continue
            real = os.path.realpath(p)
            if real in above:
                raise SdloraError(f"{p} in {what} is a symbolic link loop: it leads back to {real}, "
                                  "a folder it is inside; fix or remove the link")
            dirs.append(rel / entry.name)
            walk(p, rel / entry.name, above | {real})

    walk(base, Path(), frozenset({os.path.realpath(base)}))
    return dirs, files
