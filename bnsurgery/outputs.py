"""Writing outputs safely: the one place that decides whether a path may be written, and how.

What it guarantees, for every file bnsurgery writes (a model, a plot):

* **An output never destroys an input.** :func:`check_outputs` compares every output with every
  file the command reads (the source, ``--weights``, ``--data``, ``--calibrate``, the images of
  a data folder, the module file of a ``package.module:factory`` spec) by *file identity*
  (device and inode, after following symbolic links), not by name: a hard link, a symbolic
  link or another spelling of an input is refused, even with ``force``.
* **Only regular files are replaced**, and only with ``force``. A directory, a device node, a
  FIFO or a socket is never an output; a symbolic link is replaced as a link (the file it
  points to is not written through), and a dangling link counts as existing.
* **Nothing partial, ever.** :func:`atomic_write` writes a hidden temporary file
  ``.NAME.XXXXXXXX.tmp`` in the target folder (``NAME`` shortened to fit the file system's
  name limit) and publishes it in one step. Without ``force`` that step fails if the target
  appeared in the meantime (a hard link, or ``renameat2(RENAME_NOREPLACE)``), so of two
  writers racing for one name exactly one wins; with ``force`` it is an ``os.replace``. A
  failed or interrupted write (any exception, ``KeyboardInterrupt`` or a signal turned into an
  exception) removes the temporary file.

Nothing here prints or touches signals: the command line does that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import BnSurgeryError, OutputError, brief

__all__ = [
    "Identity",
    "atomic_write",
    "check_outputs",
    "exists",
    "identity",
    "input_identities",
    "is_dir",
    "temporary_prefix",
]

#: A file's identity: ``(st_dev, st_ino)`` after following symbolic links.
Identity = tuple[int, int]

_DEFAULT_NAME_MAX = 255
_RANDOM = 8  # characters tempfile.mkstemp puts between prefix and suffix
_SUFFIX = ".tmp"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: errnos by which ``link`` says "this file system has no hard links" (try something else)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
#: errnos by which ``renameat2`` says "no RENAME_NOREPLACE here"
_NO_NOREPLACE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


# ------------------------------------------------------------------------- path questions


def exists(path: Path) -> bool:
    """``path.exists()``, but ``False`` where the name cannot even be looked up (too long, a
    file used as a folder), instead of an ``OSError``.

    >>> exists(Path("/no/such/file"))
    False
    """
    try:
        return path.exists()
    except OSError:
        return False


def is_dir(path: Path) -> bool:
    """``path.is_dir()``, ``False`` on any ``OSError``."""
    try:
        return path.is_dir()
    except OSError:
        return False


def identity(path: str | os.PathLike[str]) -> Identity | None:
    """The identity of the file ``path`` names, after following symbolic links.

    Returns:
        ``(st_dev, st_ino)``, or ``None`` when there is no such file (a missing path, a
        dangling link, a name that cannot be looked up).
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _lstat(path: Path) -> os.stat_result | None:
    """``os.lstat``, ``None`` when nothing is there.

    Raises:
        OutputError: the name cannot be looked up (too long, not a folder on the way...).
    """
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(f"{path}: cannot be used as an output ({reason})") from exc


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _unreplaceable(out: Path) -> str | None:
    """Why ``out`` may not be replaced even with ``force``, or ``None`` (absent, a regular
    file, or a symbolic link that is dangling or points to a regular file)."""
    st = _lstat(out)
    if st is None or stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(out)
        except (OSError, ValueError):
            return None  # dangling (or a loop): the link itself is replaced
        if stat.S_ISREG(target.st_mode):
            return None
        return (
            f"{out}: is a symbolic link to {_kind(target.st_mode)}, not to a regular file; "
            "it is never replaced, even with --force"
        )
    return (
        f"{out}: is {_kind(st.st_mode)}, not a regular file; it is never replaced, even with "
        "--force"
    )


# ------------------------------------------------------------------------------- inputs


def _module_file(text: str) -> Path | None:
    """The file of a ``package.module:factory`` spec's module, without failing."""
    try:
        from .specs import is_spec, parse_spec

        if not is_spec(text):
            return None
        namespace = parse_spec(text).namespace
        if namespace in ("timm", "torchvision"):
            return None
        from .specs import importable_from_cwd

        with importable_from_cwd():  # where the command line imports it from
            spec = importlib.util.find_spec(namespace)
    except Exception:  # an unknown or broken package: loading will say so
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin or not os.path.isfile(origin):
        return None
    return Path(origin)


def _folder_files(folder: Path) -> list[Path]:
    """The files a data folder is read from (its images; see :mod:`bnsurgery.datasets`)."""
    from .datasets import image_files

    found = []
    try:
        for p in image_files(folder):
            found.append(p)
    except OSError:
        pass  # an unreadable folder: reading it will fail, and say so
    return found


def input_identities(
    inputs: Iterable[str | os.PathLike[str] | None],
) -> dict[Identity, str]:
    """Every file the inputs read, by identity.

    Args:
        inputs: paths and specs as the user gave them (``None`` and ``""`` are skipped): a file
            stands for itself, a folder for each image file under it, a
            ``package.module:factory`` spec that is not an existing path for its module's
            file (``timm:`` and ``torchvision:`` specs read no file of the user's).

    Returns:
        A mapping from each identity to the name to show for it.
    """
    found: dict[Identity, str] = {}
    for item in inputs:
        if item is None or os.fspath(item) == "":
            continue
        text = os.fspath(item)
        path = Path(text)
        if is_dir(path):
            files = _folder_files(path)
        elif identity(path) is not None:
            files = [path]
        else:
            module = _module_file(text)
            files = [module] if module is not None else []
        for f in files:
            key = identity(f)
            if key is not None:
                found.setdefault(key, str(f))
    return found


# ------------------------------------------------------------------------------- checks


def _folder(out: Path) -> Path:
    return out.parent if str(out.parent) else Path(".")


def _same_name(out: Path) -> tuple[str, str]:
    """``out`` with its folder resolved: two spellings of one name compare equal."""
    return (os.path.realpath(_folder(out)), out.name)


def check_outputs(
    outputs: Sequence[str | os.PathLike[str]],
    inputs: Sequence[str | os.PathLike[str] | None],
    *,
    force: bool,
) -> None:
    """Refuse, before any work starts, every output that could not or must not be written.

    Args:
        outputs: every file the command will write.
        inputs: every path or spec the command reads (see :func:`input_identities`).
        force: whether existing regular files may be replaced.

    Raises:
        OutputError: an output is one of the inputs (whatever the name, even with ``force``),
            is named twice, is a directory, device, FIFO or socket (even with ``force``),
            exists (without ``force``; a dangling symbolic link counts), or its folder is
            missing.

    >>> check_outputs(["/nowhere/m.pt"], [], force=True)
    Traceback (most recent call last):
    ...
    bnsurgery.errors.OutputError: /nowhere/m.pt: folder /nowhere does not exist
    """
    protected: dict[Identity, str] | None = None
    seen: dict[tuple[str, str], Path] = {}
    seen_ids: dict[Identity, Path] = {}
    for out in (Path(o) for o in outputs):
        folder = _folder(out)
        if not is_dir(folder):
            raise OutputError(f"{out}: folder {folder} does not exist")
        key = _same_name(out)
        if key in seen:
            raise OutputError(f"{out}: is also the output {seen[key]}; name two different files")
        seen[key] = out
        st = _lstat(out)
        if st is None:
            continue
        own = identity(out)
        if own is not None:
            if protected is None:
                protected = input_identities(inputs)
            if own in protected:
                raise OutputError(
                    f"{out}: is the input {protected[own]}; inputs are never overwritten, "
                    "even with --force"
                )
            if own in seen_ids:
                raise OutputError(f"{out}: is the same file as the output {seen_ids[own]}")
            seen_ids[own] = out
        reason = _unreplaceable(out)
        if reason is not None:
            raise OutputError(reason)
        if not force:
            raise OutputError(f"{out}: already exists; pass --force to replace it")


# ------------------------------------------------------------------------------ writing


def _name_max(folder: Path) -> int:
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return _DEFAULT_NAME_MAX
    return limit if limit and limit > 0 else _DEFAULT_NAME_MAX


def temporary_prefix(name: str, name_max: int = _DEFAULT_NAME_MAX) -> str:
    """The prefix of the temporary file for output ``name``: ``.NAME.``, with ``NAME`` cut so
    that ``.NAME.XXXXXXXX.tmp`` fits in ``name_max`` bytes.

    >>> temporary_prefix("model.safetensors")
    '.model.safetensors.'
    >>> len(temporary_prefix("m" * 250)) + 8 + len(".tmp")
    255
    """
    budget = max(name_max - 2 - _RANDOM - len(_SUFFIX), 1)
    short = name
    while short and len(os.fsencode(short)) > budget:
        short = short[:-1]
    return f".{short}."


def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (Linux, glibc 2.28 or later), or ``None``."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


def _exists_error(out: Path) -> OutputError:
    return OutputError(f"{out}: already exists; pass --force to replace it")


def _publish_new(tmp: str, out: Path) -> None:
    """Move ``tmp`` to ``out`` in one step that fails if ``out`` exists (no clobbering)."""
    try:
        os.link(tmp, out)
    except FileExistsError as exc:
        raise _exists_error(out) from exc
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    else:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    renameat2 = _renameat2()
    if renameat2 is not None:
        if (
            renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(out), _RENAME_NOREPLACE)
            == 0
        ):
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise _exists_error(out)
        if code not in _NO_NOREPLACE:
            raise OSError(code, os.strerror(code), str(out))
    # Neither hard links nor RENAME_NOREPLACE: reserve the name (O_EXCL), then replace it.
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise _exists_error(out) from exc
    os.close(fd)
    try:
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(out)
        raise


def _publish(tmp: str, out: Path, force: bool) -> None:
    if not force:
        _publish_new(tmp, out)
        return
    reason = _unreplaceable(out)  # again: something may have appeared since the check
    if reason is not None:
        raise OutputError(reason)
    os.replace(tmp, out)


def atomic_write(
    out: str | os.PathLike[str], write: Callable[[str], None], *, force: bool = False
) -> Path:
    """Call ``write(tmp_path)``, then publish the result as ``out`` in one step.

    Args:
        out: the file to write.
        write: writes the complete content to the path it is given.
        force: replace an existing regular file (or symbolic link, as a link).

    Returns:
        ``out`` as a path.

    Raises:
        OutputError: ``out`` exists (without ``force``, also when it appears while writing),
            is not a regular file, its folder is missing or not writable, or the write failed.
            No partial or temporary file is left, whatever ``write`` raises.
    """
    out = Path(out)
    folder = _folder(out)
    if not is_dir(folder):
        raise OutputError(f"{out}: folder {folder} does not exist")
    reason = _unreplaceable(out)
    if reason is not None:
        raise OutputError(reason)
    if not force and _lstat(out) is not None:
        raise _exists_error(out)
    try:
        fd, tmp = tempfile.mkstemp(
            dir=folder, prefix=temporary_prefix(out.name, _name_max(folder)), suffix=_SUFFIX
        )
    except OSError as exc:
        raise OutputError(f"{out}: cannot write in {folder} ({exc.strerror or exc})") from exc
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) create 0600: the usual mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _publish(tmp, out, force)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{out}: write failed ({exc.strerror or exc})") from exc
        if isinstance(exc, Exception) and not isinstance(exc, BnSurgeryError):
            # writers report a full disk or a file size limit in their own exception types
            # (torch: RuntimeError from its stream writer; safetensors: its own error)
            raise OutputError(f"{out}: write failed ({brief(exc)})") from exc
        raise
    return out
