"""Bad input and hostile environments on the real kernel: the cases the unit table cannot judge.

Every rejected run here happens under a seccomp filter that kills the process on its first
bpf(2) call: exit 2 (not SIGSYS) proves the input was refused before any map or program was
created, so nothing can have been loaded. A positive control shows the filter bites.
Header-cache and tracefs cases run in private mount namespaces (`unshare -m`), so the host's
/var/cache/rsttrace and tracefs are never touched.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shlex
import shutil
import signal
import struct
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from tests.real.netlab import Netns
from tests.real.realkernel import require_real_kernel

PY = sys.executable
NOBODY = 65534

# seccomp: kill the process on bpf(2). (audit arch, syscall number) per machine.
BPF_SYSCALL = {"x86_64": (0xC000003E, 321), "aarch64": (0xC00000B7, 280)}


def forbid_bpf() -> None:
    """preexec_fn: from here on, any bpf(2) call kills the process (SIGSYS)."""
    arch, nr = BPF_SYSCALL[platform.machine()]
    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    prog = [(ld_abs, 0, 0, 4), (jeq, 0, 3, arch),  # another arch: allow
            (ld_abs, 0, 0, 0), (jeq, 0, 1, nr),
            (ret, 0, 0, 0x80000000),  # SECCOMP_RET_KILL_PROCESS
            (ret, 0, 0, 0x7FFF0000)]  # SECCOMP_RET_ALLOW
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
        os._exit(99)


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def run(argv: List[str], preexec: Callable[[], None] = forbid_bpf,
        env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """``python -m rsttrace ARGV`` as a user runs it (bpf(2) forbidden unless ``preexec`` says otherwise)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **(env or {}))
    return subprocess.run([PY, "-m", "rsttrace", *argv], capture_output=True, text=True, preexec_fn=preexec,
                          env=env, cwd="/", timeout=120)


def assert_one_error(p: subprocess.CompletedProcess, piece: str) -> str:  # type: ignore[type-arg]
    assert p.returncode != -signal.SIGSYS, "bpf(2) was called before the input was refused: %s" % p.stderr
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == "", p.stdout
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("rsttrace: error: "), p.stderr
    assert piece in p.stderr, p.stderr
    return p.stderr.rstrip("\n")


def gone_netns() -> int:
    n = Netns()
    ino = n.inode
    n.delete()
    return ino


# (argv, a piece of the error line); a callable argv is built when the test runs
KERNEL_CASES = [
    (["trace", "--reason", "NOPE"], "--reason: unknown reason 'NOPE' on this kernel (one of: "),
    (["trace", "--reason", "no_socket,NOPE"], "unknown reason 'NOPE'"),
    (["trace", "--reason", ""], "--reason '': an empty name"),
    (["trace", "--reason", ","], "--reason ',': an empty name"),
    (["trace", "--netns", "4294967295"], "--netns 4294967295: no network namespace has that inode now"),
    (["summary", "--netns", "net:[4294967295]"], "no network namespace has that inode now"),
    (lambda: ["trace", "--netns", str(gone_netns())], "no network namespace has that inode now"),
    (["trace", "--proc-root", "/nonexistent/proc"], "--proc-root /nonexistent/proc: no such directory"),
    (["trace", "--overflow-interval", "nan"], "not a number of seconds from 0.1 to 3600"),
    (["trace", "--netns", "99999999999999999999999"], "is not a netns inode"),
    (["summary", "--interval", "1e-9"], "not a number of seconds"),
    (["export", "--ring-pages", "3"], "must be a power of 2"),
    (["export", "--ring-pages", "2147483648"], "not a power of 2 from 1 to 16384"),
    (["export", "--log-interval", "nan"], "not a number of seconds"),
    ([], "no command given"),
]


@pytest.mark.parametrize("argv,piece", KERNEL_CASES, ids=[
    " ".join(a) if isinstance(a, list) else "trace --netns <deleted>" for a, _ in KERNEL_CASES])
def test_refused_before_bpf(argv: object, piece: str) -> None:
    require_real_kernel()
    args = argv() if callable(argv) else argv
    assert_one_error(run(list(args)), piece)  # type: ignore[arg-type]


@pytest.mark.parametrize("env,piece", [
    ({"BCC_KERNEL_SOURCE": "/nonexistent"}, "BCC_KERNEL_SOURCE=/nonexistent has no include/ directory: point it at a "
                                            "kernel headers tree"),
    ({"BCC_KERNEL_SOURCE": "/"}, "BCC_KERNEL_SOURCE=/ has no include/ directory"),
])
def test_bad_environment_refused_before_bpf(env: Dict[str, str], piece: str) -> None:
    require_real_kernel()
    assert_one_error(run(["trace"], env=env), piece)


def test_unknown_reason_lists_this_kernels_names() -> None:
    require_real_kernel()
    from rsttrace.kernel import tracefs
    from rsttrace.kernel.read import gather
    from rsttrace.pipeline import names

    line = assert_one_error(run(["trace", "--reason", "NOPE"]), "one of: ")
    listed = set(line.split("(one of: ", 1)[1].rstrip(")").split(", "))
    facts = gather(tracefs.ensure_tracefs()[0])
    assert listed == set(names.valid_reasons(facts).values())
    assert set(facts.rst_reasons.values()) <= listed and "ECONNREFUSED" in listed


def test_the_guard_bites_when_input_is_good(ns: Netns) -> None:
    """Positive control: valid names and an existing netns pass validation and reach bpf(2)."""
    p = run(["trace", "--reason", "no_socket,ECONNREFUSED", "--netns", "net:[%d]" % ns.inode, "--duration", "5"])
    assert p.returncode == -signal.SIGSYS, (p.returncode, p.stderr)


# --- the header cache, in a private mount namespace ---------------------------------------
CACHE = "/var/cache/rsttrace"
PRIVATE = "mount --make-rprivate /\nmount -t tmpfs -o mode=0755 none /lib/modules\n"  # hide matching headers


def cache_merges_here() -> None:
    from rsttrace.capture import headers

    if os.path.exists("/sys/kernel/kheaders.tar.xz") or not any(c for _a, c in headers._header_pairs()):
        pytest.fail("these cache tests need split distro headers in /usr/src (-common + arch) and no "
                    "/sys/kernel/kheaders.tar.xz, so that rsttrace merges a header tree")


def run_private(setup: str, argv: List[str], after: str = "", nobody: bool = False, umask: Optional[str] = None,
                preexec: Callable[[], None] = forbid_bpf,
                env: Optional[Dict[str, str]] = None) -> Tuple[subprocess.CompletedProcess, str]:  # type: ignore[type-arg]
    """``setup`` as root in a fresh mount namespace (`unshare -m`), then rsttrace ARGV (as nobody if
    asked), then ``after``. Returns the run (stdout: rsttrace's only) and what ``after`` printed."""
    rst = " ".join(shlex.quote(a) for a in [PY, "-m", "rsttrace", *argv])
    if nobody:
        rst = "setpriv --reuid=%d --regid=%d --clear-groups %s" % (NOBODY, NOBODY, rst)
    body = "set -eu\n%s\nset +e\n%s%s\nrc=$?\necho --after--\n%s\nexit $rc\n" % (
        setup, "umask %s\n" % umask if umask else "", rst, after)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **(env or {}))
    p = subprocess.run(["unshare", "-m", "sh", "-c", body], capture_output=True, text=True, preexec_fn=preexec,
                       env=env, cwd="/", timeout=120)
    p.stdout, _, post = p.stdout.partition("--after--\n")
    return p, post


@pytest.mark.parametrize("owned_by_nobody", [CACHE, CACHE + "/headers"])
def test_cache_owned_by_another_user_is_refused(owned_by_nobody: str) -> None:
    require_real_kernel()
    cache_merges_here()
    setup = PRIVATE + "mkdir -p %(c)s\nmount -t tmpfs -o mode=0755 none %(c)s\nmkdir -m 0755 %(c)s/headers\n" \
                      "chown %(u)s %(v)s" % {"c": CACHE, "u": NOBODY, "v": owned_by_nobody}
    p, _ = run_private(setup, ["trace", "--json"])
    line = assert_one_error(p, "header cache: %s is owned by uid 65534, not root" % owned_by_nobody)
    assert line.endswith("(remove it, rm -rf %(v)s, or chown -R root: %(v)s)" % {"v": owned_by_nobody}), line


@pytest.mark.parametrize("value", ["relative/cache", ""])
def test_cache_variable_must_be_absolute(value: str) -> None:
    require_real_kernel()
    cache_merges_here()
    p, _ = run_private(PRIVATE, ["trace"], env={"RSTTRACE_CACHE": value})
    assert_one_error(p, "RSTTRACE_CACHE=%r is not an absolute path (set it to a root-owned directory, or unset it "
                        "for /var/cache/rsttrace)" % value)


def test_group_writable_tree_is_refused_naming_the_directory() -> None:
    require_real_kernel()
    cache_merges_here()
    from rsttrace.capture import headers

    arch = os.path.basename(next(a for a, c in headers._header_pairs() if c))
    victim = "%s/headers/%s/include/linux" % (CACHE, arch)
    setup = PRIVATE + "mkdir -p %(c)s\nmount -t tmpfs -o mode=0755 none %(c)s\n%(py)s -m rsttrace doctor --no-load " \
                      ">/dev/null 2>&1 || true\nchmod g+w %(v)s" % {"c": CACHE, "py": PY, "v": victim}
    p, _ = run_private(setup, ["trace"])
    assert_one_error(p, "header cache: %s is group- or world-writable (mode 0775)" % victim)


def test_marker_without_tree_is_rebuilt_and_umask_000_still_gives_0755() -> None:
    """The issue's two reproductions: world-writable directories under umask 000 (537 of them),
    and a cache whose marker outlived its tree never healing."""
    require_real_kernel()
    cache_merges_here()
    from rsttrace.capture import headers

    arch = os.path.basename(next(a for a, c in headers._header_pairs() if c))
    merged = "%s/headers/%s" % (CACHE, arch)
    # an empty 0777 cache, as a kubelet emptyDir is; the first run under umask 000
    setup = PRIVATE + "mkdir -p %(c)s\nmount -t tmpfs -o mode=0777 none %(c)s" % {"c": CACHE}
    after = """find %(c)s ! -type l -perm /022
echo dirs=$(find %(c)s -type d | wc -l)
rm -rf %(m)s/include
echo left: $(ls -A %(m)s)
again=$(%(py)s -m rsttrace --log-format json doctor --no-load --json 2>/dev/null | tr -d '\\n')
test -f %(m)s/include/generated/autoconf.h && echo rebuilt
echo "again: $again"
""" % {"c": CACHE, "m": merged, "py": PY}
    p, post = run_private(setup, ["--log-format", "json", "doctor", "--no-load", "--json"], after=after, umask="000")
    assert p.returncode in (0, 1), p.stderr  # 1: doctor without --no-load's load test is "not ok"
    checks = {c["check"]: c for c in json.loads(p.stdout)}
    assert checks["kernel headers"]["ok"] and merged in checks["kernel headers"]["detail"], checks["kernel headers"]
    lines = post.splitlines()
    assert [ln for ln in lines if ln.startswith(CACHE)] == []  # nothing group- or world-writable
    assert int(next(ln for ln in lines if ln.startswith("dirs="))[5:]) > 100  # the whole merged tree
    left = next(ln for ln in lines if ln.startswith("left:")).split()[1:]
    assert headers.MARKER in left and "include" not in left  # the marker stayed, its tree did not
    assert "rebuilt" in lines
    again = {c["check"]: c for c in json.loads(next(ln for ln in lines if ln.startswith("again:"))[6:])}
    assert again["kernel headers"]["ok"], again["kernel headers"]


def test_bcc_chatter_never_reaches_stdout() -> None:
    """A compile against a broken header tree: clang's errors become one log line on stderr,
    stdout (the --json stream) stays empty, and the error is one line."""
    require_real_kernel()
    setup = "mount --make-rprivate /\nmount -t tmpfs -o mode=0755 none /lib/modules\n" \
            "mkdir -p /lib/modules/%s/build/include" % platform.release()  # "matching headers" that are empty
    p, _ = run_private(setup, ["--log-format", "json", "trace", "--json", "--duration", "1"], preexec=lambda: None)
    assert p.stdout == "", p.stdout
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and lines[-1].startswith("rsttrace: error: compiling the BPF program failed"), p.stderr
    logs = [json.loads(ln) for ln in lines[:-1]]  # every other line is one JSON log object
    chatter = [e for e in logs if e["event"] == "bcc compile output"]
    assert chatter and all(e["level"] == "warning" and e["lines"] >= 1 for e in chatter), logs
    assert "error" in chatter[0]["output"].lower()


# --- tracefs without root --------------------------------------------------------------------
def nobody_without_bpf() -> None:
    as_nobody()
    forbid_bpf()


def test_reasons_as_nobody_says_what_it_needs() -> None:
    require_real_kernel()
    p = run(["reasons"], preexec=nobody_without_bpf)
    assert_one_error(p, "tracefs is mounted on /sys/kernel/tracing but uid 65534 may not read it: run as root "
                        "(sudo), or let readers in with `mount -o remount,mode=0755 /sys/kernel/tracing` as root")


def test_doctor_as_nobody_tells_not_readable_from_not_mounted() -> None:
    require_real_kernel()
    p = run(["doctor", "--no-load"], preexec=nobody_without_bpf)
    assert p.returncode == 1, p.stderr
    row = next(ln for ln in p.stdout.splitlines() if "] tracefs" in ln)
    assert row.startswith("[FAIL]") and "mounted on /sys/kernel/tracing but not readable by uid 65534" in row
    # tracefs unmounted in a private mount namespace: "not mounted", and reasons says how to mount it
    setup = "mount --make-rprivate /\numount -l /sys/kernel/tracing"
    if os.path.ismount("/sys/kernel/debug/tracing"):
        setup += "\numount -l /sys/kernel/debug/tracing"
    doc, _ = run_private(setup, ["doctor", "--no-load"], nobody=True)
    row = next(ln for ln in doc.stdout.splitlines() if "] tracefs" in ln)
    assert row.startswith("[FAIL]") and row.split(None, 2)[2].strip() == "not mounted", row
    rsn, _ = run_private(setup, ["reasons"], nobody=True)
    assert_one_error(rsn, "tracefs is not mounted and mounting it on /sys/kernel/tracing failed (Operation not "
                          "permitted): as root, mount -t tracefs nodev /sys/kernel/tracing")


def test_reasons_works_without_root_where_tracefs_is_readable(tmp_path: str) -> None:
    """The kernel's own format files, made readable (a bind mount in a private namespace): the same
    table as root's, read by nobody."""
    require_real_kernel()
    from rsttrace.kernel import tracefs

    root = tracefs.ensure_tracefs()[0]
    copy = os.path.join(tmp_path, "tracing")
    for system, name in (("tcp", "tcp_send_reset"), ("tcp", "tcp_receive_reset"), ("skb", "kfree_skb")):
        src = os.path.join(root, "events", system, name, "format")
        if os.path.exists(src):
            os.makedirs(os.path.join(copy, "events", system, name), exist_ok=True)
            shutil.copy(src, os.path.join(copy, "events", system, name, "format"))
    for d, _dirs, files in os.walk(copy):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    as_root = subprocess.run([PY, "-m", "rsttrace", "reasons", "--json"], capture_output=True, text=True, check=True)
    setup = "mount --make-rprivate /\nmount --bind %s %s" % (shlex.quote(copy), root)
    p, _ = run_private(setup, ["reasons", "--json"], nobody=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == json.loads(as_root.stdout)


# --- a hostile process name on the operator's terminal -----------------------------------------
HOSTILE_COMM = "\x1b[31mEVIL\r\x07"  # colour, carriage return, bell: 11 bytes, within comm's 15

ABORT_AS = r"""
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: this thread's comm
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
cl = socket.create_connection(srv.getsockname()); acc, _ = srv.accept()
cl.sendall(b"never read"); time.sleep(0.2)
acc.close()  # unread data: the kernel aborts with a RST, in this process's close()
"""


def test_hostile_comm_is_escaped_in_human_output(ns: Netns) -> None:
    from tests.real.test_cli import run_rsttrace

    rc, out, err, _ = run_rsttrace(
        ("--log-format", "json", "trace", "--netns", str(ns.inode), "--reason", "tcp_abort_on_close", "--count", "1",
         "--duration", "60"),
        lambda _proc: subprocess.run(["ip", "netns", "exec", ns.name, PY, "-c", ABORT_AS, HOSTILE_COMM],
                                     check=True, timeout=30))
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and "TCP_ABORT_ON_CLOSE" in lines[1], out
    assert lines[1].endswith("/\\x1b[31mEVIL\\x0d\\x07"), repr(lines[1])  # what the process called itself
    assert not any(c in out for c in "\x1b\r\x07"), repr(out)  # and nothing the terminal would act on
