"""The kernel headers bcc insists on, without writing under /lib/modules.

bcc compiles every program against kernel headers (``/lib/modules/$(uname -r)/build``, or
``BCC_KERNEL_SOURCE``). rsttrace takes no struct layout from them (layouts come from BTF), so
headers of another kernel version serve; when none match the running kernel we merge the
distro's ``-common`` and arch header trees into a private directory and name it with
``BCC_KERNEL_SOURCE``. The cache is refused if anyone but root could have written into it.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import stat
from typing import List, Optional, Tuple

from rsttrace.capture.bccload import BccMissing

DEFAULT_CACHE = "/var/cache/rsttrace"


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
        os.makedirs(target_dir, mode=0o755, exist_ok=True)
        for name in files:
            link = os.path.join(target_dir, name)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.realpath(os.path.join(root, name)), link)
        # scripts/ and tools/ are kbuild programs, not headers: bcc never reads them.
        if rel == ".":
            dirs[:] = [d for d in dirs if d not in ("scripts", "tools")]


class CacheError(BccMissing):
    """The header cache is unsafe or unusable: the message names the path, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__("%s (%s)" % (problem, fix))
        self.fix = fix


MARKER = ".rsttrace-complete"


def _refuse_unsafe(path: str, st: os.stat_result) -> None:
    """ssh's rule for its keys: root compiles from this tree, so only root (or we) may have written it."""
    if st.st_uid not in (0, os.geteuid()):
        raise CacheError("header cache: %s is owned by uid %d, not root: rsttrace will not compile from it"
                         % (path, st.st_uid), "remove it, rm -rf %s, or chown -R root: %s" % (path, path))
    if st.st_mode & 0o022:
        raise CacheError("header cache: %s is group- or world-writable (mode %04o): rsttrace will not compile "
                         "from it" % (path, stat.S_IMODE(st.st_mode)), "chmod go-w %s, or remove it: rm -rf %s"
                         % (path, path))


def _safe_dir(path: str) -> None:
    """Create ``path`` (and missing parents) 0755 whatever the umask, or check the one there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent and parent != path and not os.path.isdir(parent):
            _safe_dir(parent)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        else:
            os.chmod(path, 0o755)  # mkdir's mode is masked by the umask, in both directions
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError("header cache: %s is not a directory" % path,
                         "remove it, or set RSTTRACE_CACHE to another path")
    if st.st_uid == os.geteuid() and st.st_mode & 0o022 and not os.listdir(path):
        # Ours and empty (a kubelet emptyDir is created 0777): nothing in it to distrust, and once
        # tightened nobody else can add anything.
        os.chmod(path, 0o755)
        st = os.stat(path)
    _refuse_unsafe(path, st)


def check_ancestors(path: str) -> None:
    """The directories above the cache root, as ssh checks a key's: whoever may rename an entry
    in one could swap the cache for their own tree. Sticky directories (/tmp) are fine."""
    parent = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    for d in reversed(chain):
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return  # created below, by _safe_dir
        if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise CacheError("header cache: %s, above %s, is %s: whoever may write there could swap the cache "
                             "for their own tree" % (d, path, "owned by uid %d" % st.st_uid
                                                     if st.st_uid not in (0, os.geteuid())
                                                     else "group- or world-writable (mode %04o)"
                                                     % stat.S_IMODE(st.st_mode)),
                             "set RSTTRACE_CACHE to a path whose every directory is root's")


def check_tree(path: str) -> None:
    """Every directory under ``path``, and the marker, is root's (or ours) and not writable by others."""
    _refuse_unsafe(path, os.lstat(path))
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            _refuse_unsafe(p, os.lstat(p))
    marker = os.path.join(path, MARKER)
    if os.path.lexists(marker):
        _refuse_unsafe(marker, os.lstat(marker))


def _complete(merged: str, common: str, arch: str) -> bool:
    """The marker names these two trees and the tree it marks is there (a marker alone is rebuilt)."""
    try:
        with open(os.path.join(merged, MARKER)) as f:
            if f.read().split("\n")[:2] != [common, arch]:
                return False
    except OSError:
        return False
    return os.path.isfile(os.path.join(merged, "include", "generated", "autoconf.h")) and os.path.isdir(
        os.path.join(merged, "include", "linux"))


def merged_headers(cache: str, common: str, arch: str) -> str:
    """The distro's ``-common`` and arch header trees merged (as symlinks) under the cache, built
    once; every directory checked before use."""
    if not os.path.isabs(cache):
        raise CacheError("RSTTRACE_CACHE=%r is not an absolute path" % cache,
                         "set it to a root-owned directory, or unset it for %s" % DEFAULT_CACHE)
    merged = os.path.join(cache, "headers", os.path.basename(arch))
    fix = ("make it writable by root, or set RSTTRACE_CACHE to a root-owned directory on a writable filesystem "
           "(in a container: an emptyDir)")
    try:
        check_ancestors(cache)
        _safe_dir(cache)
        _safe_dir(os.path.dirname(merged))
        if os.path.lexists(merged):
            check_tree(merged)
            if _complete(merged, common, arch):
                return merged
        tmp = merged + ".tmp%d" % os.getpid()
        old_umask = os.umask(0o022)  # the tree and marker: 0755 and 0644 whatever the caller's umask
        try:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)
            _link_tree(common, tmp)
            _link_tree(arch, tmp)
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write("%s\n%s\n" % (common, arch))
        finally:
            os.umask(old_umask)
        if os.path.lexists(merged):  # an incomplete or stale earlier tree: replaced, never trusted
            shutil.rmtree(merged)
        try:
            os.rename(tmp, merged)
        except OSError:
            # another rsttrace finished first: use its tree if it is whole
            shutil.rmtree(tmp, ignore_errors=True)
            check_tree(merged)
            if not _complete(merged, common, arch):
                raise
    except CacheError:
        raise
    except OSError as e:
        raise CacheError("header cache: %s: %s" % (e.filename or cache, e.strerror or e), fix) from e
    return merged


def kernel_headers(
    release: Optional[str] = None,
    cache: Optional[str] = None,
    src: str = "/usr/src",
    modules: str = "/lib/modules",
    kheaders: str = "/sys/kernel/kheaders.tar.xz",
) -> Tuple[Optional[str], str]:
    """Where bcc should find headers: (directory for BCC_KERNEL_SOURCE or None, explanation).

    None means bcc's own lookup will work (matching /lib/modules build dir, or kheaders).
    Raises BccMissing (CacheError for the cache) with the fix in its message.
    """
    release = release or platform.release()
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if not os.path.isdir(os.path.join(env, "include")):
            raise BccMissing("BCC_KERNEL_SOURCE=%s has no include/ directory: point it at a kernel headers tree "
                             "(such as /usr/src/linux-headers-VERSION) or unset it" % env)
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
    merged = merged_headers(cache or os.environ.get("RSTTRACE_CACHE", DEFAULT_CACHE), common, arch)
    why = "%s (merged %s + %s)" % (merged, os.path.basename(common), os.path.basename(arch))
    if not exact:
        why += "; not the running kernel's version, which is fine: layouts come from BTF"
    return merged, why
