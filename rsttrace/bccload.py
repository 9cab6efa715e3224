"""Finding bcc and the kernel headers it insists on.

bcc is a distro package (Debian/Ubuntu ``python3-bpfcc``), installed for the distro's Python in
its dist-packages. rsttrace may run under another interpreter (pyenv, a venv without system
site-packages), so when ``import bcc`` fails we load that one package from the distro's
directories by path, without putting the whole dist-packages on sys.path. bcc's Python module is
pure Python over ctypes and libbcc, so any Python 3 can load it.

bcc also compiles every program against kernel headers (``/lib/modules/$(uname -r)/build``, or
``BCC_KERNEL_SOURCE``). rsttrace takes no struct layout from them (layouts come from BTF), so
headers of another kernel version serve; when none match the running kernel we merge the
distro's ``-common`` and arch header trees into a private directory and name it with
``BCC_KERNEL_SOURCE``, never writing under /lib/modules.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import sys
from types import ModuleType
from typing import List, Optional, Tuple

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
DEFAULT_CACHE = "/var/cache/rsttrace"


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


def _version_key(name: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _header_pairs(src: str = "/usr/src") -> List[Tuple[str, Optional[str]]]:
    """(arch dir, common dir or None) for each installed headers package, newest first."""
    pairs: List[Tuple[str, Optional[str]]] = []
    for arch in glob.glob(os.path.join(src, "linux-headers-*")):
        if not os.path.isfile(os.path.join(arch, "include", "generated", "autoconf.h")):
            continue
        base = os.path.basename(arch)
        common: Optional[str] = None
        if not os.path.isdir(os.path.join(arch, "include", "linux")):
            stem = base.rsplit("-", 1)[0]
            for cand in (stem + "-common", stem):  # Debian "-common", Ubuntu flavourless
                if os.path.isdir(os.path.join(src, cand, "include", "linux")):
                    common = os.path.join(src, cand)
                    break
            else:
                continue
        pairs.append((arch, common))
    pairs.sort(key=lambda p: _version_key(os.path.basename(p[0])), reverse=True)
    return pairs


def _link_tree(src: str, dst: str) -> None:
    """Mirror ``src`` under ``dst`` as symlinks to files; later calls override earlier ones."""
    src = os.path.realpath(src)
    for root, dirs, files in os.walk(src, followlinks=True):
        rel = os.path.relpath(root, src)
        target_dir = os.path.join(dst, rel) if rel != "." else dst
        os.makedirs(target_dir, exist_ok=True)
        for name in files:
            link = os.path.join(target_dir, name)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.realpath(os.path.join(root, name)), link)
        # scripts/ and tools/ are kbuild programs, not headers: bcc never reads them.
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in ("scripts", "tools")]


def kernel_headers(
    release: Optional[str] = None,
    cache: Optional[str] = None,
    src: str = "/usr/src",
    modules: str = "/lib/modules",
    kheaders: str = "/sys/kernel/kheaders.tar.xz",
) -> Tuple[Optional[str], str]:
    """Where bcc should find headers: (directory for BCC_KERNEL_SOURCE or None, explanation).

    None means bcc's own lookup will work (matching /lib/modules build dir, or kheaders).
    """
    release = release or platform.release()
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return env, "BCC_KERNEL_SOURCE=%s (from the environment)" % env
    build = os.path.join(modules, release, "build")
    if os.path.isdir(os.path.join(build, "include")):
        return None, "matching headers in %s" % build
    if os.path.exists(kheaders):
        return None, "kernel's own headers (%s)" % kheaders
    pairs = _header_pairs(src)
    if not pairs:
        raise BccMissing(
            "no kernel headers for bcc: install the distro's headers package "
            "(Debian: apt-get install linux-headers-amd64; Ubuntu: linux-headers-generic); "
            "any version works, rsttrace reads struct layouts from BTF"
        )
    exact = [p for p in pairs if os.path.basename(p[0]) == "linux-headers-" + release]
    arch, common = (exact or pairs)[0]
    if common is None:
        return arch, "headers in %s" % arch
    cache = cache or os.environ.get("RSTTRACE_CACHE", DEFAULT_CACHE)
    merged = os.path.join(cache, "headers", os.path.basename(arch))
    marker = os.path.join(merged, ".rsttrace-complete")
    if not os.path.exists(marker):
        tmp = merged + ".tmp%d" % os.getpid()
        _link_tree(common, tmp)
        _link_tree(arch, tmp)
        with open(os.path.join(tmp, ".rsttrace-complete"), "w") as f:
            f.write("%s\n%s\n" % (common, arch))
        if os.path.isdir(merged):  # an incomplete earlier attempt
            import shutil

            shutil.rmtree(merged, ignore_errors=True)
        os.makedirs(os.path.dirname(merged), exist_ok=True)
        os.rename(tmp, merged)
    why = "%s (merged %s + %s)" % (merged, os.path.basename(common), os.path.basename(arch))
    if not exact:
        why += "; not the running kernel's version, which is fine: layouts come from BTF"
    return merged, why
