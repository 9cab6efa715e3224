"""Offline kernel test rig: boot Debian's own 5.10, 6.1, 6.12 and 7.2 (unstable)
kernels and Debian 13's cloud-flavor 6.12 under qemu and run one command inside
each.  See rig/README.md.

Host side only, Python 3.9 stdlib.  The guest side is rig/guest/.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Dict, List, Optional, Tuple

RIG_DIR = Path(__file__).resolve().parent
GUEST_DIR = RIG_DIR / "guest"
# Bump when the way an image is made changes in a way the inputs hashed in
# cache_key() do not show (e.g. the wheel installer below).
IMAGE_FORMAT = "rsttrace-rig-image-1"
DEFAULT_CACHE = "/var/cache/rsttrace-rig"
DEFAULT_TIMEOUT = 15 * 60
# A guest needs no network; only the project's own test namespaces.
MARK = "RSTTRACE-RIG:"


@dataclass(frozen=True)
class Release:
    label: str  # what --kernel takes and what prefixes output lines
    suite: str  # Debian suite given to debootstrap
    aliases: Tuple[str, ...]  # also taken by --kernel: release number, codename
    python: str  # the suite's python3 ("3.11"): selects requirements.txt lines by marker
    flavor: str = ""  # kernel flavor: "" is Debian's generic amd64, "cloud" is cloud-amd64

    @property
    def slug(self) -> str:
        """Name of this image in the cache (images/, debs/, locks/, logs/)."""
        return "%s-%s" % (self.suite, self.flavor) if self.flavor else self.suite


RELEASES: Tuple[Release, ...] = (
    Release("5.10", "bullseye", ("11",), "3.9"),
    Release("6.1", "bookworm", ("12",), "3.11"),
    Release("6.12", "trixie", ("13",), "3.13"),
    # Debian unstable: whatever kernel, bcc and Python it has when the image is built
    # (7.2, 0.37, 3.14 on 2026-12-01); a new python3 there fails the build loudly.
    Release("7.2", "sid", ("unstable",), "3.14"),
    # Debian 13's cloud flavor: the same 6.12 series as above, a different configuration.
    Release("6.12-cloud", "trixie", ("cloud", "trixie-cloud"), "3.13", flavor="cloud"),
)
BY_LABEL = {r.label: r for r in RELEASES}
# The packages.txt names a flavor replaces with its own.
FLAVOR_PACKAGES = {
    "cloud": {
        "linux-image-amd64": "linux-image-cloud-amd64",
        "linux-headers-amd64": "linux-headers-cloud-amd64",
    },
}


# ----------------------------------------------------------------- output ---

_print_lock = threading.Lock()


def say(prefix: str, text: str, stream: IO[str] = sys.stdout) -> None:
    """Print one line per input line, prefixed, without interleaving threads."""
    with _print_lock:
        for line in text.splitlines() or [""]:
            stream.write("[%s] %s\n" % (prefix, line))
        stream.flush()


class RigError(Exception):
    """A setup problem (missing tool, failed build): exit status 2."""


# ------------------------------------------------------------ input lists ---


def read_list(path: Path) -> List[str]:
    """Non-empty lines of a package or requirements file, comments removed."""
    items = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            items.append(line)
    return items


def release_packages(release: Release, packages: Sequence[str]) -> List[str]:
    """packages.txt for one release: a flavor swaps in its own kernel and headers."""
    swap = FLAVOR_PACKAGES.get(release.flavor, {})
    return [swap.get(p, p) for p in packages]


_MARKER = re.compile(r"""python_version\s*(<=|>=|==|!=|<|>)\s*["']?(\d+(?:\.\d+)*)["']?""")


def _version(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def release_wheels(release: Release, lines: Sequence[str]) -> List[str]:
    """requirements.txt lines that apply to the release's Python, markers removed.

    Only ``python_version <op> "X.Y"`` markers (joined by ``and``) are understood: enough
    to pin a binary wheel per Python.  pip is not asked to evaluate them, since pip
    download judges markers by the host's Python, not by --python-version.  Lines
    without a marker stay as they are, so the cache keys of releases a marker does not
    touch stay the same.
    """
    ops = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
    }
    have = _version(release.python)
    out = []
    for line in lines:
        req, sep, marker = line.partition(";")
        req = req.strip()
        if sep:
            terms = [t.strip() for t in marker.split(" and ")]
            keep = True
            for term in terms:
                m = _MARKER.fullmatch(term)
                if not m:
                    raise RigError("requirements.txt: marker %r not understood (only python_version)" % (term,))
                keep = keep and ops[m.group(1)](have, _version(m.group(2)))
            if not keep:
                continue
        out.append(req)
    return out


def cache_key(
    release: Release,
    packages: Sequence[str],
    wheels: Sequence[str],
    mirror: str,
    stage1: bytes,
) -> str:
    """Hash of everything that goes into an image; a change means a rebuild."""
    h = hashlib.sha256()
    for part in (
        IMAGE_FORMAT,
        # A flavor is another image of the same suite; the generic ones keep their keys.
        release.slug,
        mirror,
        "\n".join(sorted(packages)),
        "\n".join(sorted(w.lower() for w in wheels)),
    ):
        h.update(part.encode() + b"\0")
    h.update(stage1)
    return h.hexdigest()[:16]


# --------------------------------------------------------- wheel installer ---


def _dist_info_dir(names: Iterable[str]) -> str:
    tops = {n.split("/", 1)[0] for n in names}
    infos = [t for t in tops if t.endswith(".dist-info")]
    if len(infos) != 1:
        raise RigError("wheel has %s .dist-info directories" % len(infos))
    return infos[0]


def console_scripts(entry_points: str) -> Dict[str, str]:
    """The [console_scripts] section of an entry_points.txt: name -> target."""
    scripts: Dict[str, str] = {}
    section = ""
    for raw in entry_points.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]").strip()
        elif section == "console_scripts" and "=" in line:
            name, target = (s.strip() for s in line.split("=", 1))
            scripts[name] = target.split("[", 1)[0].strip()  # drop extras
    return scripts


def script_text(target: str) -> str:
    module, _, attr = target.partition(":")
    call = attr or "main"
    head = call.split(".", 1)[0]
    return "#!/usr/bin/python3\nimport sys\nfrom %s import %s\nsys.exit(%s())\n" % (module, head, call)


def install_wheel(wheel: Path, root: Path, python: str) -> List[str]:
    """Unpack one wheel into root's /usr/local the way pip would, without pip.

    The minbase image has no pip, and running pip in a chroot would need the
    chroot's proc and network; a wheel is a zip laid out for site-packages, so
    unpacking it on the host is enough.  Returns the console scripts made.
    """
    site = root / "usr/local/lib" / python / "dist-packages"
    bindir = root / "usr/local/bin"
    site.mkdir(parents=True, exist_ok=True)
    bindir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = _dist_info_dir(names)
        data = info[: -len(".dist-info")] + ".data"
        for name in names:
            if name.endswith("/"):
                continue
            parts = name.split("/")
            if name.startswith("/") or ".." in parts:
                raise RigError("%s: unsafe path %s" % (wheel.name, name))
            if parts[0] == data:
                kind, rest = parts[1], parts[2:]
                if kind in ("purelib", "platlib"):
                    dest = site.joinpath(*rest)
                elif kind == "scripts":
                    dest = bindir.joinpath(*rest)
                else:  # headers, data: /usr/local like a system-wide pip
                    dest = root.joinpath("usr/local", *rest)
            else:
                dest = site.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(name))
            if parts[0] == data and parts[1] == "scripts":
                dest.chmod(0o755)
        (site / info / "INSTALLER").write_text("rsttrace-rig\n")
        made = []
        try:
            eps = zf.read("%s/entry_points.txt" % (info,)).decode()
        except KeyError:
            eps = ""
        for name, target in console_scripts(eps).items():
            path = bindir / name
            path.write_text(script_text(target))
            path.chmod(0o755)
            made.append(name)
    return made


# ------------------------------------------------------------ image build ---


@dataclass
class Image:
    release: Release
    key: str
    directory: Path
    meta: Dict[str, object] = field(default_factory=dict)
    built_seconds: Optional[float] = None  # None: taken from the cache

    @property
    def root_img(self) -> Path:
        return self.directory / "root.img"

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def mke2fs_version() -> Tuple[int, ...]:
    out = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True, check=False)
    m = re.search(r"mke2fs (\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def tree_usage(root: Path) -> Tuple[int, int]:
    """(bytes rounded up to 4 KiB blocks, inode count) of a directory tree."""
    total, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_size + 4095) // 4096 * 4096
            count += 1
    return total, count


def make_ext4(tree: Path, image: Path, label: str, log: IO[str]) -> None:
    """ext4 image of a directory with mke2fs -d: no loop device, no mount."""
    used, inodes = tree_usage(tree)
    # Room for what the guest writes (the project, outputs, pycache) on top
    # of the cached content; the file is sparse, so headroom costs no disk.
    size_mib = int(used * 1.25) // (1 << 20) + 1024
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-d", str(tree)]
    cmd += ["-N", str(int(inodes * 1.5) + 65536)]
    if mke2fs_version() >= (1, 47):
        # orphan_file (default in newer mke2fs.conf) is unknown to 5.10,
        # which would then refuse to mount the root read-write.
        cmd += ["-O", "^orphan_file"]
    cmd += [str(image), "%sM" % (size_mib,)]
    run_logged(cmd, log)


def _mounts_under(path: Path) -> List[str]:
    prefix = str(path.resolve()) + "/"
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(prefix):
                found.append(mnt)
    return sorted(found, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf a debootstrap target, unmounting what a failed run left there."""
    if not path.exists():
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False)
    if _mounts_under(path):
        raise RigError("%s still has mounts; not removing it" % (path,))
    shutil.rmtree(path, ignore_errors=True)


def run_logged(cmd: Sequence[str], log: IO[str], **kw: object) -> None:
    log.write("+ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    proc = subprocess.run(
        list(cmd),
        stdout=log,
        stderr=subprocess.STDOUT,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        raise RigError("%s failed with status %s" % (cmd[0], proc.returncode))


def pip_command() -> List[str]:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"],
        capture_output=True,
        check=False,
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise RigError("pip is needed on the host to download wheels (apt install python3-pip)")


def guest_python(root: Path) -> str:
    """'python3.X' that /usr/bin/python3 of a rootfs points at."""
    target = os.readlink(root / "usr/bin/python3")
    name = os.path.basename(target)
    if not re.fullmatch(r"python3\.\d+", name):
        raise RigError("unexpected /usr/bin/python3 -> %s" % (target,))
    return name


def kernel_files(root: Path) -> Tuple[str, Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RigError("expected one kernel in /boot, found %s" % len(kernels))
    version = kernels[0].name[len("vmlinuz-") :]
    initrd = root / "boot" / ("initrd.img-%s" % (version,))
    if not initrd.exists():
        raise RigError("no initrd for %s: did initramfs-tools run?" % (version,))
    build = root / "lib/modules" / version / "build"
    if not os.path.lexists(build) or not (root / ("usr/src/linux-headers-%s" % (version,))).is_dir():
        raise RigError("no matching linux-headers for %s" % (version,))
    return version, kernels[0], initrd


@dataclass
class BuildConfig:
    cache: Path
    packages: List[str]
    wheels: List[str]
    requirements: Path
    mirror: str  # "" = debootstrap's own default mirror
    rebuild: bool = False


def image_for(release: Release, cfg: BuildConfig) -> Image:
    stage1 = (GUEST_DIR / "rig-init").read_bytes()
    packages = release_packages(release, cfg.packages)
    wheels = release_wheels(release, cfg.wheels)
    key = cache_key(release, packages, wheels, cfg.mirror or "default", stage1)
    directory = cfg.cache / "images" / ("%s-%s" % (release.slug, key))
    return Image(release, key, directory)


def load_meta(image: Image) -> bool:
    try:
        image.meta = json.loads((image.directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return all(p.exists() for p in (image.root_img, image.vmlinuz, image.initrd))


def ensure_image(release: Release, cfg: BuildConfig) -> Image:
    """Reuse the cached image of this release or build it (under a lock)."""
    image = image_for(release, cfg)
    if not cfg.rebuild and load_meta(image):
        return image
    locks = cfg.cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / ("%s.lock" % (release.slug,)), "w") as lock:
        # Another rig run (another engineer, another CI job) may be building
        # the same image: wait for it instead of racing it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cfg.rebuild and load_meta(image):
            return image
        build_image(image, cfg)
        return image


UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/rsttrace-rig-unsafe-io"
# Modules the initramfs needs to mount the virtio root; with MODULES=list the
# initrd holds these instead of most of the kernel's drivers: 5 MiB instead of
# 35, which saves several seconds of every boot under TCG.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")


def scratch_dir(cache: Path) -> Path:
    """Where the debootstrap target is made: $RSTTRACE_RIG_TMP, else /dev/shm
    when it has room for a rootfs (4 GiB), else the cache itself."""
    env = os.environ.get("RSTTRACE_RIG_TMP")
    if env:
        return Path(env)
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize >= 4 << 30:
            return Path("/dev/shm")
    except OSError:
        pass
    return cache / "tmp"


def preseed_root(root: Path) -> None:
    """Files put in the target before debootstrap runs, so that its dpkg and
    update-initramfs see them the first time (no second initramfs build).
    Only paths no package owns: /etc/dpkg/dpkg.cfg.d and conf.d snippets."""
    files = {
        UNSAFE_IO: "# rig build only: no fsync per file while debootstrap unpacks\nforce-unsafe-io\n",
        "etc/initramfs-tools/conf.d/rsttrace-rig": "MODULES=list\nCOMPRESS=gzip\n",
        "usr/share/initramfs-tools/modules.d/rsttrace-rig": "\n".join(INITRD_MODULES) + "\n",
        # sid's kernel depends on "dracut | initramfs-tools", so debootstrap installs dracut:
        # the same small initrd from it (drivers= is the exclusive list; deps come along).
        "etc/dracut.conf.d/rsttrace-rig.conf": (
            "hostonly=\"no\"\ndrivers=\" %s \"\ncompress=\"gzip\"\n" % (" ".join(INITRD_MODULES),)
        ),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def build_image(image: Image, cfg: BuildConfig) -> None:
    release = image.release
    logs = cfg.cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / ("%s-build.log" % (release.slug,))
    say(release.label, "building the %s image (log: %s)" % (release.slug, log_path))
    start = time.monotonic()
    packages = release_packages(release, cfg.packages)
    work = cfg.cache / "tmp" / ("%s-%s" % (release.slug, os.getpid()))
    remove_tree(work)
    work.mkdir(parents=True)
    # The debootstrap target goes to tmpfs when there is room: dpkg's many
    # small writes and fsyncs there cost nothing, and mke2fs -d copies it out.
    root = scratch_dir(cfg.cache) / ("rsttrace-rig-%s-%s" % (release.slug, os.getpid()))
    remove_tree(root)
    debs = cfg.cache / "debs" / release.slug
    debs.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "w") as log:
            preseed_root(root)
            cmd = [
                "debootstrap",
                "--variant=minbase",
                "--components=main",
                "--cache-dir=%s" % debs.resolve(),
                "--include=" + ",".join(packages),
                release.suite,
                str(root),
            ]
            if cfg.mirror:
                cmd.append(cfg.mirror)
            t0 = time.monotonic()
            run_logged(cmd, log)
            t_debootstrap = time.monotonic() - t0
            (root / UNSAFE_IO).unlink()
            version, vmlinuz, initrd = kernel_files(root)
            python = guest_python(root)
            if python != "python%s" % (release.python,):
                # The wheels' markers were chosen for release.python: sid moved on.
                raise RigError(
                    "%s has %s, the rig expects python%s: update RELEASES in rig/riglib.py (and requirements.txt "
                    "markers)" % (release.suite, python, release.python)
                )
            t0 = time.monotonic()
            wheels = fetch_wheels(cfg, release, python, log)
            for wheel in wheels:
                made = install_wheel(wheel, root, python)
                log.write("installed %s %s\n" % (wheel.name, " ".join(made)))
            t_wheels = time.monotonic() - t0
            customize_root(root, GUEST_DIR / "rig-init")
            shutil.copy2(vmlinuz, work / "vmlinuz")
            shutil.copy2(initrd, work / "initrd.img")
            # dracut (sid) writes its initrd 0600; booting needs no root.
            (work / "initrd.img").chmod(0o644)
            t0 = time.monotonic()
            make_ext4(root, work / "root.img", "rsttrace-root", log)
            t_mke2fs = time.monotonic() - t0
        remove_tree(root)
        seconds = time.monotonic() - start
        meta: Dict[str, object] = {
            "release": release.label,
            "suite": release.suite,
            "key": image.key,
            "kernel": version,
            "python": python,
            "flavor": release.flavor or "generic",
            "packages": packages,
            "wheels": [w.name for w in wheels],
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(seconds, 1),
            "debootstrap_seconds": round(t_debootstrap, 1),
            "wheels_seconds": round(t_wheels, 1),
            "mke2fs_seconds": round(t_mke2fs, 1),
            "image_bytes_apparent": (work / "root.img").stat().st_size,
            "image_bytes_used": (work / "root.img").stat().st_blocks * 512,
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        # Publish atomically, then drop this release's older images.
        remove_tree(image.directory)
        image.directory.parent.mkdir(parents=True, exist_ok=True)
        os.rename(work, image.directory)
        # Only this slug's images: "trixie-<key>" must not take "trixie-cloud-<key>" along.
        for old in image.directory.parent.glob("%s-*" % (release.slug,)):
            if old != image.directory and re.fullmatch(re.escape(release.slug) + r"-[0-9a-f]{16}", old.name):
                remove_tree(old)
    except BaseException:
        remove_tree(root)
        remove_tree(work)
        raise
    image.meta = meta
    image.built_seconds = seconds
    say(
        release.label,
        "built %s image in %.0f s (debootstrap %.0f s, mke2fs %.0f s, %s MiB used)"
        % (version, seconds, t_debootstrap, t_mke2fs, meta["image_bytes_used"] // (1 << 20)),  # type: ignore[operator]
    )


def fetch_wheels(cfg: BuildConfig, release: Release, python: str, log: IO[str]) -> List[Path]:
    """pip download the requirements for the guest's Python, binary only."""
    wanted = release_wheels(release, cfg.wheels)
    if not wanted:
        return []
    version = python[len("python") :]
    # Per image, not per Python: two images of one Python (trixie, its cloud flavor) build at once.
    dest = cfg.cache / "wheels" / ("%s-%s" % (release.slug, python))
    # A fresh directory each build, so a wheel dropped from the list leaves.
    remove_tree(dest)
    dest.mkdir(parents=True)
    requirements = cfg.cache / "wheels" / ("%s-requirements.txt" % (release.slug,))
    requirements.write_text("".join(w + "\n" for w in wanted))
    cmd = pip_command() + [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        version,
        "--implementation",
        "cp",
        # glibc 2.17: a binary wheel this selects runs on all three releases.
        "--platform",
        "manylinux2014_x86_64",
        "--dest",
        str(dest),
        "-r",
        str(requirements),
    ]
    run_logged(cmd, log)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(wanted):
        raise RigError("pip gave %s wheels for %s requirements" % (len(wheels), len(wanted)))
    return wheels


def customize_root(root: Path, stage1: Path) -> None:
    shutil.copy2(stage1, root / "rig-init")
    (root / "rig-init").chmod(0o755)
    (root / "etc/hostname").write_text("rsttrace-rig\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost rsttrace-rig\n::1 localhost ip6-localhost\n")
    # Nothing in the guest uses apt: drop its lists and the downloaded debs.
    for sub in ("var/lib/apt/lists", "var/cache/apt/archives"):
        d = root / sub
        if d.is_dir():
            for p in d.glob("*"):
                if p.is_file():
                    p.unlink()


# -------------------------------------------------------------- run inputs ---


def project_files(project: Path, untracked: bool) -> List[str]:
    cmd = ["git", "-C", str(project), "ls-files", "-z", "--cached"]
    if untracked:
        cmd += ["--others", "--exclude-standard"]
    out = subprocess.run(cmd, capture_output=True, check=False)
    if out.returncode != 0:
        raise RigError("git ls-files failed in %s: %s" % (project, out.stderr.decode().strip()))
    names = sorted({n for n in out.stdout.decode().split("\0") if n})
    # A file deleted in the work tree but not yet in the index is skipped.
    return [n for n in names if os.path.lexists(project / n)]


def command_script(argv: Sequence[str]) -> str:
    return "exec " + " ".join(shlex.quote(a) for a in argv) + "\n"


def env_script(release: Release, extra: Dict[str, str]) -> str:
    env = {
        "RSTTRACE_RIG_KERNEL": release.label,
        "RSTTRACE_RIG_SUITE": release.suite,
        "RSTTRACE_RIG_FLAVOR": release.flavor or "generic",
    }
    env.update(extra)
    return "".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in sorted(env.items()))


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tf.addfile(info, io.BytesIO(data))


def write_project_tar(
    dest: Path, project: Path, files: Sequence[str], argv: Sequence[str], attach: Optional[Path] = None
) -> List[str]:
    """The part of the input disk that all kernels share: init.sh, cmd.sh and
    project/, and attach/ (a host directory given with --attach: e.g. wheels and
    package lists for a guest that has no network).  Made once per run, so every
    kernel sees the same snapshot of a work tree others may be editing.  Returns
    the files that vanished meanwhile."""
    vanished = []
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tf:
        if attach is not None:
            tf.add(str(attach), arcname="attach", filter=_root_owned)
        _add_bytes(tf, "init.sh", (GUEST_DIR / "init.sh").read_bytes(), 0o755)
        _add_bytes(tf, "cmd.sh", command_script(argv).encode(), 0o755)
        for name in files:
            try:
                info = tf.gettarinfo(str(project / name), arcname="project/%s" % (name,))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if info.isreg():
                    with open(project / name, "rb") as f:
                        tf.addfile(info, f)
                else:
                    tf.addfile(info)
            except FileNotFoundError:
                vanished.append(name)
    return vanished


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_input_tar(dest: Path, project_tar: Path, env_sh: str) -> None:
    """One kernel's input disk, the tar stage 1 unpacks from /dev/vdb: the
    shared project tar plus this kernel's env.sh."""
    shutil.copyfile(project_tar, dest)
    with tarfile.open(dest, "a", format=tarfile.GNU_FORMAT) as tf:
        _add_bytes(tf, "env.sh", env_sh.encode(), 0o644)
    # qemu wants whole sectors.
    size = dest.stat().st_size
    with open(dest, "ab") as padded:
        padded.truncate((size + 511) // 512 * 512)


def extract_result(disk: Path, dest: Path) -> Optional[int]:
    """Read the tar the guest wrote on the raw result disk; return its status.

    The guest is trusted no more than needed: only regular files and
    directories with relative paths inside dest are written.
    """
    status: Optional[int] = None
    try:
        with tarfile.open(disk, "r:") as tf:
            for member in tf:
                name = os.path.normpath(member.name)
                if name in (".", "") or name.startswith(("/", "..")):
                    continue
                if name == "status" and member.isreg():
                    f = tf.extractfile(member)
                    text = f.read().decode(errors="replace").strip() if f else ""
                    status = int(text) if text.isdigit() else None
                elif member.isdir():
                    (dest / name).mkdir(parents=True, exist_ok=True)
                elif member.isreg():
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(member)
                    if src is not None:
                        with open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
    except tarfile.TarError:
        # An all-zero disk (the guest never wrote it) is no tar at all.
        return None
    return status


# ------------------------------------------------------------------- boot ---


@dataclass
class BootConfig:
    accel: str  # "kvm" or "tcg"
    memory_mib: int
    smp: int
    timeout: float
    out_size_mib: int
    verbose: bool
    cpu: str = ""  # "" = host under kvm, max under tcg


def qemu_command(image: Image, boot: BootConfig, input_tar: Path, result_disk: Path) -> List[str]:
    append = (
        "root=/dev/vda rw rootfstype=ext4 console=ttyS0,115200 init=/rig-init panic=-1 quiet loglevel=4 net.ifnames=0"
    )
    cpu = boot.cpu or ("host" if boot.accel == "kvm" else "max")
    return [
        "qemu-system-x86_64",
        "-accel",
        boot.accel,
        "-cpu",
        cpu,
        "-m",
        str(boot.memory_mib),
        "-smp",
        str(boot.smp),
        "-kernel",
        str(image.vmlinuz),
        "-initrd",
        str(image.initrd),
        "-append",
        append,
        # snapshot=on: the guest's writes go to a throw-away overlay, so the
        # cached image stays pristine and several boots can share it.
        "-drive",
        "file=%s,format=raw,if=virtio,snapshot=on" % (image.root_img,),
        "-drive",
        "file=%s,format=raw,if=virtio,readonly=on" % (input_tar,),
        "-drive",
        "file=%s,format=raw,if=virtio" % (result_disk,),
        "-nic",
        "none",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]


@dataclass
class Outcome:
    release: Release
    image: Image
    status: Optional[int] = None
    boot_seconds: Optional[float] = None
    note: str = ""
    out_dir: Optional[Path] = None


def boot_and_run(
    image: Image,
    boot: BootConfig,
    project_tar: Path,
    out_root: Path,
) -> Outcome:
    release = image.release
    outcome = Outcome(release, image)
    out_dir = out_root / release.label
    remove_tree(out_dir)
    out_dir.mkdir(parents=True)
    outcome.out_dir = out_dir
    scratch = Path(tempfile.mkdtemp(prefix="rig-%s-" % (release.suite,), dir=str(out_root)))
    try:
        input_tar = scratch / "input.tar"
        extra = {"RSTTRACE_RIG_GUEST_KERNEL": str(image.meta.get("kernel", ""))}
        write_input_tar(input_tar, project_tar, env_script(release, extra))
        result_disk = scratch / "result.disk"
        with open(result_disk, "wb") as f:
            f.truncate(boot.out_size_mib << 20)  # sparse
        cmd = qemu_command(image, boot, input_tar, result_disk)
        log_path = out_dir / "console.log"
        marker_status, seconds, note = _run_qemu(cmd, release, boot, log_path)
        outcome.boot_seconds = seconds
        disk_status = extract_result(result_disk, out_dir)
        # The status on the result disk is authoritative; the console line is
        # the fallback for a guest that could not write the disk.
        outcome.status = disk_status if disk_status is not None else marker_status
        outcome.note = note
        if outcome.status is None:
            outcome.note = note or "the guest reported no status"
            say(
                release.label,
                "no status from the guest (%s); last console lines:" % (outcome.note,),
            )
            tail = log_path.read_text(errors="replace").splitlines()[-40:]
            say(release.label, "\n".join("  | " + t for t in tail))
        (out_dir / "status").write_text("%s\n" % (outcome.status if outcome.status is not None else "none",))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outcome


def split_marker(line: str) -> Tuple[str, Optional[str]]:
    """(console text before the rig's marker, the marker's message or None).

    The marker is looked for anywhere in the line: a command whose output
    does not end in a newline leaves it glued to the end of that output."""
    idx = line.find(MARK)
    if idx < 0:
        return line, None
    return line[:idx], line[idx + len(MARK) :].strip()


def _run_qemu(cmd: Sequence[str], release: Release, boot: BootConfig, log_path: Path
              ) -> Tuple[Optional[int], float, str]:
    """Run qemu, stream the console, return (status line, seconds, note)."""
    start = time.monotonic()
    status: Optional[int] = None
    result_at: Optional[float] = None
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        log.write("+ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(boot.timeout, kill)
        timer.start()
        in_command = False
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n").replace("\r", "")
                log.write(line + "\n")
                log.flush()
                text, msg = split_marker(line)
                if (msg is None or text.strip()) and (in_command or boot.verbose):
                    say(release.label, text)
                if msg is None:
                    continue
                if msg.startswith("begin"):
                    in_command = True
                    say(release.label, "booted in %.1f s: %s" % (time.monotonic() - start, msg[5:].strip()))
                    continue
                m = re.fullmatch(r"status (\d+)", msg)
                if m:
                    status = int(m.group(1))
                    result_at = time.monotonic()
                    in_command = False
                    continue
                say(release.label, msg)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = (result_at or time.monotonic()) - start
    note = "timed out after %.0f s" % (boot.timeout,) if timed_out.is_set() and status is None else ""
    if not note and status is None and proc.returncode not in (0, None):
        note = "qemu exited with status %s" % (proc.returncode,)
    return status, elapsed, note


# ------------------------------------------------------------ kvm or tcg ---


def kvm_usable(image: Image, cache: Path) -> bool:
    """Does qemu -accel kvm boot a kernel here?  /dev/kvm opening is not enough.

    On some nested hosts /dev/kvm opens but the guest hangs at boot; a short
    probe boot (kernel alone, which panics for want of a root, and
    panic=-1 -no-reboot ends qemu) tells.  The answer is cached per host
    kernel and qemu version, since a hang costs the whole probe timeout.
    """
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError:
        return False
    qemu_version = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    probe_key = hashlib.sha256((os.uname().release + "\0" + "".join(qemu_version)).encode()).hexdigest()[:16]
    probe_file = cache / ("kvm-probe-%s.json" % (probe_key,))
    try:
        return bool(json.loads(probe_file.read_text())["kvm"])
    except (OSError, ValueError, KeyError):
        pass
    cmd = [
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256",
        "-kernel", str(image.vmlinuz), "-append", "console=ttyS0 panic=-1",
        "-nic", "none", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        ok = out.returncode == 0 and b"Kernel panic" in out.stdout
    except subprocess.TimeoutExpired:
        ok = False
    try:
        probe_file.write_text(json.dumps({"kvm": ok}) + "\n")
    except OSError:
        pass  # a read-only shared cache: probe again next time
    return ok


# -------------------------------------------------------------------- cli ---


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rig/run",
        description="Boot Debian's 5.10/6.1/6.12/7.2 and cloud 6.12 kernels under qemu and run a command.",
        epilog="Example: rig/run --kernel 6.1 -- python3 -m pytest -q tests",
    )
    p.add_argument(
        "--kernel",
        action="append",
        default=[],
        help="5.10, 6.1, 6.12, 7.2, 6.12-cloud or all (default all); repeat or comma-separate",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the images even if cached")
    p.add_argument(
        "--build-only",
        action="store_true",
        help="build or check the images, boot nothing",
    )
    p.add_argument(
        "--cache",
        default=os.environ.get("RSTTRACE_RIG_CACHE", DEFAULT_CACHE),
        help="image cache (default $RSTTRACE_RIG_CACHE or %(default)s)",
    )
    p.add_argument("--project", help="git work tree to copy in (default: the one holding rig/)")
    p.add_argument(
        "--untracked",
        action="store_true",
        help="also copy untracked files git does not ignore",
    )
    p.add_argument("--out", help="where results land (default: PROJECT/build/rig)")
    p.add_argument(
        "--attach",
        metavar="DIR",
        help="a host directory copied to /rig/attach in the guest ($RSTTRACE_RIG_ATTACH)",
    )
    p.add_argument("--requirements", default=str(RIG_DIR / "requirements.txt"))
    p.add_argument("--packages", default=str(RIG_DIR / "packages.txt"))
    p.add_argument(
        "--mirror",
        default=os.environ.get("RSTTRACE_RIG_MIRROR", ""),
        help="Debian mirror for debootstrap (default $RSTTRACE_RIG_MIRROR or debootstrap's own)",
    )
    p.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default=os.environ.get("RSTTRACE_RIG_ACCEL", "auto"),
        help="auto: kvm when a probe boot works, else tcg",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds per boot (default %(default)s)",
    )
    p.add_argument("--memory", type=int, default=2048, help="guest MiB (default %(default)s)")
    p.add_argument("--cpu", default="", help="qemu -cpu model (default: host under kvm, max under tcg)")
    p.add_argument("--smp", type=int, default=2, help="guest CPUs (default %(default)s)")
    p.add_argument(
        "--out-size",
        type=int,
        default=512,
        help="MiB the output dir may take (default %(default)s)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="kernels booted at once (default %(default)s)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also stream the boot's console lines",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(list(argv))
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command and not args.build_only:
        p.error("no command given (rig/run [options] -- COMMAND ...)")
    return args


def select_releases(specs: Sequence[str]) -> List[Release]:
    labels: List[str] = []
    for spec in specs or ["all"]:
        for item in spec.split(","):
            item = item.strip()
            if item == "all":
                labels.extend(r.label for r in RELEASES)
            elif item in BY_LABEL:
                labels.append(item)
            else:
                # Also take suite names and release numbers: bookworm, 12.
                match = [r for r in RELEASES if not r.flavor and item == r.suite or item in r.aliases]
                if not match:
                    known = ", ".join(r.label for r in RELEASES)
                    raise RigError("unknown kernel %r: use %s or all" % (item, known))
                labels.append(match[0].label)
    return [BY_LABEL[label] for label in dict.fromkeys(labels)]


def require_tools(names: Iterable[str]) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RigError("missing host tools: " + ", ".join(missing) + " (see rig/README.md)")


def human_bytes(n: object) -> str:
    return "%.2f GiB" % (int(n) / (1 << 30),) if isinstance(n, int) else "?"


def main(argv: Sequence[str]) -> int:
    try:
        return _main(parse_args(argv))
    except (RigError, OSError, subprocess.CalledProcessError) as e:
        print("rig: %s" % (e,), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    releases = select_releases(args.kernel)
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    requirements = Path(args.requirements).resolve()
    cfg = BuildConfig(
        cache=cache,
        packages=read_list(Path(args.packages)),
        wheels=read_list(requirements),
        requirements=requirements,
        mirror=args.mirror,
        rebuild=args.rebuild,
    )
    need_build = args.rebuild or not all(load_meta(image_for(r, cfg)) for r in releases)
    if need_build:
        require_tools(["debootstrap", "mke2fs"])
        if os.geteuid() != 0:
            raise RigError("building an image needs root (debootstrap chroots)")

    # Builds run in parallel: debootstrap mostly waits on the network and on
    # dpkg's fsyncs, so three at once finish sooner than one after another.
    images: Dict[str, Image] = {}
    errors: Dict[str, BaseException] = {}

    def build(r: Release) -> None:
        try:
            images[r.label] = ensure_image(r, cfg)
        except BaseException as e:  # noqa: BLE001 - reported below, per release
            errors[r.label] = e

    threads = [threading.Thread(target=build, args=(r,)) for r in releases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for label, err in errors.items():
        say(label, "image build failed: %s" % (err,), sys.stderr)
        log = cache / "logs" / ("%s-build.log" % (BY_LABEL[label].slug,))
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-25:]
            say(label, "\n".join("  | " + t for t in tail), sys.stderr)
    if errors:
        raise RigError("image build failed for " + ", ".join(errors))
    if args.build_only:
        for r in releases:
            im = images[r.label]
            how = "cached" if im.built_seconds is None else "built in %.0f s" % (im.built_seconds,)
            say(r.label, "%s image %s: %s" % (im.meta.get("kernel"), how, im.directory))
        return 0

    require_tools(["qemu-system-x86_64", "git"])
    project = Path(args.project).resolve() if args.project else RIG_DIR.parent
    files = project_files(project, args.untracked)
    out_root = Path(args.out).resolve() if args.out else project / "build" / "rig"
    out_root.mkdir(parents=True, exist_ok=True)

    accel = args.accel
    if accel == "auto":
        accel = "kvm" if kvm_usable(images[releases[0].label], cache) else "tcg"
    boot = BootConfig(accel, args.memory, args.smp, args.timeout, args.out_size, args.verbose, args.cpu)
    scratch = Path(tempfile.mkdtemp(prefix="rig-project-", dir=str(out_root)))
    try:
        project_tar = scratch / "project.tar"
        attach = Path(args.attach).resolve() if args.attach else None
        if attach is not None and not attach.is_dir():
            raise RigError("--attach %s: not a directory" % (args.attach,))
        vanished = write_project_tar(project_tar, project, files, args.command, attach)
        if vanished:
            say("rig", "skipped %s files deleted while copying: %s" % (len(vanished), " ".join(vanished[:5])))
        say("rig", "%s project files from %s; accel %s; results in %s"
            % (len(files) - len(vanished), project, accel, out_root))
        outcomes = boot_all(releases, images, boot, project_tar, out_root, args.jobs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_summary([outcomes[r.label] for r in releases], out_root)
    return 0 if all(o.status == 0 for o in outcomes.values()) else 1


def boot_all(
    releases: Sequence[Release],
    images: Dict[str, Image],
    boot: BootConfig,
    project_tar: Path,
    out_root: Path,
    jobs: int,
) -> Dict[str, Outcome]:
    """Boot each release, `jobs` at a time (default one: under TCG on two
    cores, concurrent guests mostly slow each other down)."""
    outcomes: Dict[str, Outcome] = {}
    pending = list(releases)
    pending_lock = threading.Lock()

    def worker() -> None:
        while True:
            with pending_lock:
                if not pending:
                    return
                r = pending.pop(0)
            try:
                outcomes[r.label] = boot_and_run(images[r.label], boot, project_tar, out_root)
            except Exception as e:  # noqa: BLE001 - one kernel's failure must not hide the others
                outcomes[r.label] = Outcome(r, images[r.label], note="rig error: %s" % (e,))
                say(r.label, "rig error: %s" % (e,), sys.stderr)

    workers = [threading.Thread(target=worker) for _ in range(max(1, min(jobs, len(releases))))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return outcomes


def print_summary(outcomes: Sequence[Outcome], out_root: Path) -> None:
    rows = [("kernel", "guest kernel", "image", "size", "boot-to-result", "status")]
    summary = []
    for o in outcomes:
        im = o.image
        built = "cached" if im.built_seconds is None else "built %.0f s" % (im.built_seconds,)
        boot_s = "%.1f s" % (o.boot_seconds,) if o.boot_seconds is not None else "-"
        status = str(o.status) if o.status is not None else "none (%s)" % (o.note,)
        rows.append(
            (
                o.release.label,
                str(im.meta.get("kernel", "?")),
                built,
                human_bytes(im.meta.get("image_bytes_used")),
                boot_s,
                status,
            )
        )
        summary.append(
            {
                "kernel": o.release.label,
                "suite": o.release.suite,
                "guest_kernel": im.meta.get("kernel"),
                "image": "cached" if im.built_seconds is None else "built",
                "build_seconds": im.built_seconds,
                "boot_to_result_seconds": o.boot_seconds,
                "status": o.status,
                "note": o.note,
                "results": str(o.out_dir) if o.out_dir else None,
            }
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    with _print_lock:
        print()
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        sys.stdout.flush()
    (out_root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
