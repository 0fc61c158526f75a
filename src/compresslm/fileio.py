"""Writing files safely and reading our own tensor files without pickles.

* Atomic writes: a file (or a directory) is built under a temporary sibling name and renamed into
  place, so a reader sees the previous version or the complete new one, never half of one.
* Temporary names carry the writer's host and process id (`.NAME.compresslm-tmp.HOST.PID.XXXX`):
  a writer killed with SIGKILL cannot clean up, so the next write into that directory removes the
  temporaries of writers on this host that are gone. Live writers and other hosts are left alone.
* Output paths are checked before any compute (`check_writable_file`), by creating and removing a
  probe file beside the target: permission bits, read-only mounts and immutable directories all
  fail there, with the user's path in the message, instead of after an hour of calibration.
* Tensor files (training checkpoints, caches) are safetensors with their other fields as JSON in
  the safetensors metadata: nothing compresslm reads is a pickle.
* Files follow the umask, like any file the user's shell would create.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

from compresslm.errors import CompressLMError, CorruptFileError

_TMP_MARK = ".compresslm-tmp."
_TMP_NAME = re.compile(r"^\..+\.compresslm-tmp\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}$")
_META_KEY = "compresslm"


def cache_root() -> Path:
    """compresslm's own cache: `$COMPRESSLM_CACHE`, default ~/.cache/compresslm."""
    return Path(os.environ.get("COMPRESSLM_CACHE", Path.home() / ".cache" / "compresslm"))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from the shell: 0o666 less the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a new directory gets from the shell: 0o777 less the umask."""
    return 0o777 & ~_umask()


def temp_sibling(target: Path) -> Path:
    """A fresh temporary name beside `target`, naming this host and process."""
    return target.with_name(f".{target.name}{_TMP_MARK}{_host()}.{os.getpid()}.{secrets.token_hex(4)}")


def process_alive(pid: int) -> bool:
    """Whether a process of this host with id `pid` exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temporaries in `directory` left by compresslm writers on this host that have died."""
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        match = _TMP_NAME.match(entry.name)
        if not match or match["host"] != host or process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write; on success rename it onto `target`.

    The temporary is removed if the block raises. With `directory`, the temporary is a new empty
    directory and an existing directory at `target` is replaced only once the new one is complete.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = temp_sibling(target)
    if directory:
        tmp.mkdir(mode=0o700)
    try:
        yield tmp
        if directory:
            _set_modes(tmp)
            if target.exists():
                old = temp_sibling(target)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        else:
            os.chmod(tmp, file_mode())
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _set_modes(root: Path) -> None:
    """Give a staged directory tree the modes the umask gives (libraries may write files 0600)."""
    root.chmod(dir_mode())
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(dir_mode() if path.is_dir() else file_mode())


def check_writable_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, naming `path`, if a file cannot be written there; the parent is created if missing."""
    text = str(path)
    if not text.strip():
        raise CompressLMError(f"the {what} path is empty")
    target = Path(text).expanduser()
    if target.is_dir():
        raise CompressLMError(f"the {what} {text} is a directory; give a file name")
    return _probe(target, text, what)


def check_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Fail now, naming `path`, unless `path` is (or can be made) a directory we can write into."""
    text = str(path)
    if not text.strip():
        raise CompressLMError(f"the {what} path is empty")
    target = Path(text).expanduser()
    if target.exists() and not target.is_dir():
        raise CompressLMError(f"the {what} {text} exists and is not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressLMError(f"cannot create the {what} {text}: {exc.strerror or exc}") from None
    return _probe(target / "probe", text, what).parent


def _probe(target: Path, text: str, what: str) -> Path:
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise CompressLMError(f"cannot write the {what} {text}: cannot create {parent} ({reason})") from None
    if not parent.is_dir():
        raise CompressLMError(f"cannot write the {what} {text}: {parent} is not a directory")
    probe = temp_sibling(target)
    try:
        probe.touch(exist_ok=False)
    except OSError as exc:
        raise CompressLMError(f"cannot write the {what} {text}: {exc.strerror or exc} in {parent}") from None
    probe.unlink(missing_ok=True)
    return target


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], fields: dict) -> None:
    """Write tensors as safetensors with `fields` (JSON-able) in its metadata, atomically."""
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory (tied weights); each is stored once as its own copy
    plain = {key: t.detach().cpu().contiguous().clone() for key, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata={_META_KEY: json.dumps(fields, allow_nan=True)})


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by `save_tensors`: its tensors and fields; CorruptFileError when it is not one."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        fields = json.loads(meta[_META_KEY])
    except FileNotFoundError:
        raise
    except Exception as exc:  # the safetensors parser, a missing key, bad JSON: all mean a damaged file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptFileError(f"{p} is not a readable compresslm tensor file ({reason})") from None
    if not isinstance(fields, dict):
        raise CorruptFileError(f"{p} is not a readable compresslm tensor file (its fields are not an object)")
    return tensors, fields
