"""Finding bcc, and quieting what its compiler prints.

bcc is a distro package (Debian/Ubuntu ``python3-bpfcc``), installed for the distro's Python in
its dist-packages. rsttrace may run under another interpreter (pyenv, a venv without system
site-packages), so when ``import bcc`` fails we load that one package from the distro's
directories by path, without putting the whole dist-packages on sys.path. bcc's Python module is
pure Python over ctypes and libbcc, so any Python 3 can load it. The kernel headers bcc insists
on are :mod:`rsttrace.capture.headers`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import sys
import tempfile
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator, List

DIST_DIRS = (
    "/usr/lib/python3/dist-packages",  # Debian, Ubuntu
    "/usr/local/lib/python3/dist-packages",
)
DIST_GLOBS = (
    "/usr/lib/python3*/site-packages",  # Fedora, Arch
    "/usr/lib64/python3*/site-packages",
    "/usr/lib/python3*/dist-packages",
    "/usr/local/lib/python3*/dist-packages",
)


class BccMissing(Exception):
    pass


def bcc_candidates() -> List[str]:
    dirs = list(DIST_DIRS)
    for pattern in DIST_GLOBS:
        dirs.extend(sorted(glob.glob(pattern), reverse=True))
    return [d for d in dict.fromkeys(dirs) if os.path.isfile(os.path.join(d, "bcc", "__init__.py"))]


def import_bcc() -> ModuleType:
    """``import bcc``, falling back to the distro's copy by path."""
    if "bcc" in sys.modules:
        return sys.modules["bcc"]
    try:
        import bcc  # type: ignore[import-not-found,import-untyped,unused-ignore]

        return bcc  # type: ignore[no-any-return]
    except ImportError:
        pass
    for d in bcc_candidates():
        pkg = os.path.join(d, "bcc")
        spec = importlib.util.spec_from_file_location(
            "bcc", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg]
        )
        if spec is None or spec.loader is None:
            continue
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:  # libbcc.so missing or incompatible
            del sys.modules["bcc"]
            raise BccMissing("bcc found in %s but failed to load: %s" % (d, e)) from e
        return mod
    raise BccMissing(
        "bcc's Python module is not installed: apt-get install python3-bpfcc "
        "(Fedora/RHEL: dnf install python3-bcc)"
    )


def bcc_version(bcc: ModuleType) -> str:
    v = getattr(bcc, "__version__", None)
    if v:
        return str(v)
    try:
        from bcc.version import __version__  # type: ignore[import-not-found,import-untyped,unused-ignore]

        return str(__version__)
    except Exception:
        return "unknown"


OUTPUT_MAX = 4000  # characters of captured chatter kept in the log line


def _flush_c_stdio() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.fflush(None)  # every C stdio stream: libbcc's printf/std::cout text still in a buffer
    except (OSError, AttributeError):
        pass


@contextmanager
def captured_output(what: str = "bcc compile") -> Iterator[None]:
    """Whatever the body writes to file descriptors 1 and 2 (bcc's and clang's C-level chatter,
    such as "Unable to find kernel headers" on stdout) goes to one log line on stderr instead:
    stdout carries rsttrace's output only (``trace --json``)."""
    from rsttrace import log

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        sink = os.memfd_create("rsttrace-" + what.replace(" ", "-"), os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # no memfd: an unlinked temporary file
        with tempfile.TemporaryFile() as f:
            sink = os.dup(f.fileno())
    saved = (os.dup(1), os.dup(2))
    streams = (sys.stdout, sys.stderr)
    failed = False
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        # Python-level prints too (bcc's own), wherever sys.stdout pointed
        sys.stdout = sys.stderr = open(sink, "w", closefd=False)  # noqa: SIM115 - closed below
        yield
    except BaseException:
        failed = True
        raise
    finally:
        sys.stdout.close()
        sys.stdout, sys.stderr = streams
        _flush_c_stdio()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        size = os.lseek(sink, 0, os.SEEK_END)
        os.lseek(sink, 0, os.SEEK_SET)
        data = os.read(sink, min(size, 1 << 20))
        os.close(sink)
        lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
        if lines:
            text = " | ".join(lines)
            if len(text) > OUTPUT_MAX:
                text = text[:OUTPUT_MAX] + " ..."
            logger = log.get()
            (logger.warning if failed else logger.info)("%s output" % what, lines=len(lines), output=text)
