"""Where minillm may write: checks of ``--out``, ``--overwrite``, ``--force``; the atomic export folder.

Why one module: every command that writes a folder (``prune``, ``recover``) or a file (``--report``,
``--json``) goes through these few functions, so the rules hold everywhere:

* ``--out`` never is, contains, or lies inside an input (model folder, calibration file, recipe, teacher),
  and never is or contains the current or the home directory — whatever the flags;
* ``--overwrite`` replaces only a folder that looks like an export (it has ``minillm.json``) or is empty;
  anything else needs ``--force`` as well;
* exports are built in a temporary folder beside ``--out`` named ``.NAME.tmp-minillm-PID-XXXX``, renamed into
  place at the end (a failing rename removes it); a run killed with SIGKILL leaves one behind, and the next
  run to the same ``--out`` removes every such folder whose owning process is gone;
* SIGTERM (what ``timeout``, SLURM and docker send first) during an export ends the process through the
  normal clean-up, so the temp folder goes at once;
* the finished folder gets the permissions the umask gives (``mkdtemp`` alone makes it 0700).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from minillm.errors import UsageError

METADATA_FILE = "minillm.json"  # the marker of a minillm export (same name as minillm.export's)
#: settings that say where to write or whether to replace: only the command line may give them
COMMAND_LINE_ONLY = ("out", "overwrite", "force", "report", "offload_dir", "trust_remote_code")
#: files minillm itself writes into an export folder, which may be replaced there (with --overwrite)
OWN_FILES = ("minillm_eval.json",)
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp-minillm|old)-(?P<pid>\d+)(?:-.*)?$")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def local_inputs(*sources: object) -> list[Path]:
    """The given sources that are existing local paths (hub ids, dataset names and objects are skipped)."""
    paths = []
    for source in sources:
        if isinstance(source, (str, Path)) and str(source) and Path(str(source)).expanduser().exists():
            paths.append(_resolved(source))
    return paths


def _overlaps(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "lies inside"
    return None


def check_no_overlap(out: str | Path, inputs: Iterable[str | Path] = (), option: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside an input, or is/contains the cwd or home."""
    target = _resolved(out)
    for source in local_inputs(*inputs):
        relation = _overlaps(target, source)
        if relation is not None:
            raise UsageError(
                f"{option} {str(out)!r} {relation} the input {str(source)!r}; "
                f"write to a folder apart from every input"
            )
    for label, place in (("the current directory", Path.cwd()), ("your home directory", Path.home())):
        place = _resolved(place)
        if target == place or target in place.parents:
            raise UsageError(
                f"{option} {str(out)!r} is or contains {label}; give a new folder, e.g. {option} pruned"
            )


def looks_like_export(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def check_output_dir(out: str | Path, overwrite: bool, force: bool = False,
                     inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early (before any work) if ``out`` cannot be written or would clobber something."""
    path = Path(out)
    check_no_overlap(path, inputs)
    if path.is_symlink():
        raise UsageError(f"--out {str(path)!r} is a symbolic link; give a real folder path")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {str(path)!r} is a file; give a folder path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite and not force:
            raise UsageError(
                f"--out {str(path)!r} exists and is not empty; pass --overwrite or choose another folder"
            )
        if not force and not looks_like_export(path):
            raise UsageError(
                f"--out {str(path)!r} is not a minillm export (no {METADATA_FILE}); --overwrite only "
                f"replaces exports: add --force to replace it anyway, or choose another folder"
            )
    parent = path.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UsageError(f"cannot write to {str(parent)!r} (permission denied); choose another --out")
    return path


def check_output_file(path: str | Path | None, overwrite: bool, option: str,
                      inputs: Iterable[str | Path] = (), create_folder: bool = False) -> None:
    """A file a command will write (``--report``, ``--json``): new, or ``overwrite``; its folder exists
    (or, with ``create_folder``, can be made) and is writable. Checked before any work."""
    if path is None:
        return
    file = Path(path)
    target = _resolved(file)
    for source in local_inputs(*inputs):
        relation = _overlaps(target, source)
        replaces = relation == "lies inside" and file.exists() and file.name not in OWN_FILES
        if relation in ("is", "contains") or replaces:
            raise UsageError(f"{option} {str(file)!r} would replace the input {str(source)!r}"
                             f"{'' if relation == 'is' else ' or a file in it'}; choose another file")
    if file.is_dir():
        raise UsageError(f"{option} {str(file)!r} is a folder; give a file name")
    if (file.exists() or file.is_symlink()) and not overwrite:
        raise UsageError(f"{option} {str(file)!r} exists; pass --overwrite to replace it or choose another")
    folder = file.absolute().parent
    if not folder.is_dir() and not create_folder:
        raise UsageError(f"{option} {str(file)!r}: folder {str(folder)!r} does not exist; create it first")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UsageError(f"{option} {str(file)!r}: cannot write to {str(probe)!r}; choose another path")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Delete ``.NAME.tmp-minillm-PID-*`` / ``.NAME.old-PID`` beside ``out`` whose process is gone."""
    path = Path(out).absolute()
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        match = _TMP.match(entry.name)
        if match is None or match["name"] != path.name or entry.is_symlink() or not entry.is_dir():
            continue
        if not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While exporting, SIGTERM raises ``SystemExit`` (so ``finally`` blocks run) instead of killing."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool, force: bool = False,
                      inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out`` in one rename, on any failure it is deleted."""
    inputs = list(inputs)
    path = check_output_dir(out, overwrite, force, inputs)
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    prefix = f".{path.name}.tmp-minillm-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.absolute().parent))
    old = None
    try:
        with _sigterm_exits():
            yield tmp
        tmp.chmod(0o777 & ~_umask())
        check_output_dir(out, overwrite, force, inputs)  # the folder may have appeared meanwhile
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        try:
            tmp.rename(path)
        except OSError as exc:
            if old is not None:
                old.rename(path)
                old = None
            raise UsageError(f"cannot move the export into --out {str(path)!r} ({exc.strerror or exc}); "
                             f"choose a plain folder path") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left only on failure
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
