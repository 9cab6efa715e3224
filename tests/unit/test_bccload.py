"""Finding headers for bcc without touching /lib/modules, and bcc from another interpreter."""

from __future__ import annotations

import builtins
import os
import sys
from typing import Iterator

import pytest

from rsttrace.capture import bccload
from rsttrace.capture import headers as hdrs


def headers_tree(src: str, version: str, flavour: str) -> None:
    common = os.path.join(src, "linux-headers-%s-common" % version)
    arch = os.path.join(src, "linux-headers-%s-%s" % (version, flavour))
    for d in ("include/linux", "arch/x86/include/asm", "scripts"):
        os.makedirs(os.path.join(common, d), exist_ok=True)
    with open(os.path.join(common, "include/linux/types.h"), "w") as f:
        f.write("/* common */\n")
    with open(os.path.join(common, "Makefile"), "w") as f:
        f.write("# common\n")
    os.makedirs(os.path.join(arch, "include/generated"), exist_ok=True)
    with open(os.path.join(arch, "include/generated/autoconf.h"), "w") as f:
        f.write("#define CONFIG_X 1\n")
    with open(os.path.join(arch, "Makefile"), "w") as f:
        f.write("include %s/Makefile\n" % common)


def test_merges_common_and_arch_newest_first(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    src, cache = os.path.join(tmp_path, "src"), os.path.join(tmp_path, "cache")
    headers_tree(src, "6.1.0-9", "amd64")
    headers_tree(src, "6.1.0-56", "amd64")
    where, why = hdrs.kernel_headers("6.18.44", cache=cache, src=src, modules=str(tmp_path),
                                        kheaders="/nonexistent")
    assert where is not None and where.startswith(cache) and "6.1.0-56" in where
    assert "not the running kernel's version" in why
    with open(os.path.join(where, "include/generated/autoconf.h")) as f:
        assert "CONFIG_X" in f.read()
    with open(os.path.join(where, "include/linux/types.h")) as f:
        assert "common" in f.read()
    with open(os.path.join(where, "Makefile")) as f:
        assert f.read().startswith("include")  # the arch tree wins where both have a file
    assert not os.path.exists(os.path.join(where, "scripts"))
    assert hdrs.kernel_headers("6.18.44", cache=cache, src=src, modules=str(tmp_path),
                                  kheaders="/nonexistent")[0] == where  # reused


def test_matching_modules_build_dir_wins(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    os.makedirs(os.path.join(tmp_path, "6.18.44", "build", "include"))
    where, why = hdrs.kernel_headers("6.18.44", src=str(tmp_path), modules=str(tmp_path), kheaders="/x")
    assert where is None and "matching headers" in why


def test_no_headers_is_one_clear_error(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    with pytest.raises(bccload.BccMissing, match="apt-get install linux-headers"):
        hdrs.kernel_headers("6.18.44", src=str(tmp_path), modules=str(tmp_path), kheaders="/x")


def test_environment_override(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    os.makedirs(os.path.join(tmp_path, "include"))
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    assert hdrs.kernel_headers("6.18.44")[0] == str(tmp_path)


def test_environment_override_without_headers_is_refused(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", os.path.join(tmp_path, "nothing"))
    with pytest.raises(bccload.BccMissing, match="no include/ directory.*unset it"):
        hdrs.kernel_headers("6.18.44")


@pytest.fixture()
def bcc_not_importable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This interpreter cannot `import bcc` (as under pyenv); any bcc already loaded is put back."""
    saved = {m: sys.modules.pop(m) for m in ("bcc", "bcc.version") if m in sys.modules}
    real_import = builtins.__import__

    def no_bcc(name: str, *a: object, **kw: object) -> object:
        if name == "bcc":
            raise ImportError("simulated: not on this interpreter's path")
        return real_import(name, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_bcc)
    try:
        yield
    finally:
        monkeypatch.undo()
        for m in ("bcc", "bcc.version"):
            sys.modules.pop(m, None)
        sys.modules.update(saved)


def test_bcc_loaded_by_path_from_a_distro_dir(tmp_path: str, monkeypatch: pytest.MonkeyPatch,
                                              bcc_not_importable: None) -> None:
    pkg = os.path.join(tmp_path, "bcc")
    os.makedirs(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("from .version import __version__\nclass BPF: pass\n")
    with open(os.path.join(pkg, "version.py"), "w") as f:
        f.write("__version__ = '0.99.0'\n")
    monkeypatch.setattr(bccload, "DIST_DIRS", (str(tmp_path),))
    monkeypatch.setattr(bccload, "DIST_GLOBS", ())
    mod = bccload.import_bcc()
    assert bccload.bcc_version(mod) == "0.99.0" and hasattr(mod, "BPF")
    assert os.path.dirname(mod.__file__) == pkg  # type: ignore[arg-type]


def test_bcc_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch, bcc_not_importable: None) -> None:
    monkeypatch.setattr(bccload, "DIST_DIRS", ())
    monkeypatch.setattr(bccload, "DIST_GLOBS", ())
    with pytest.raises(bccload.BccMissing, match="python3-bpfcc"):
        bccload.import_bcc()


def merged_tree(tmp_path: str) -> tuple:  # type: ignore[type-arg]
    src, cache = os.path.join(tmp_path, "src"), os.path.join(tmp_path, "cache")
    headers_tree(src, "6.1.0-56", "amd64")
    return src, cache


def headers(src: str, cache: str, tmp_path: str) -> str:
    where, _why = hdrs.kernel_headers("6.18.44", cache=cache, src=src, modules=str(tmp_path),
                                         kheaders="/nonexistent")
    assert where is not None
    return where


def test_cache_is_0755_whatever_the_umask(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under umask 000 the cache was 537 world-writable directories and a world-writable marker."""
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    src, cache = merged_tree(tmp_path)
    old = os.umask(0)
    try:
        where = headers(src, cache, tmp_path)
    finally:
        os.umask(old)
    seen = 0
    for root, dirs, files in os.walk(cache):
        for name in [*dirs, *files]:
            st = os.lstat(os.path.join(root, name))
            if not os.path.islink(os.path.join(root, name)):
                assert st.st_mode & 0o022 == 0, (os.path.join(root, name), oct(st.st_mode))
                seen += 1
    assert oct(os.stat(cache).st_mode & 0o777) == "0o755" and seen >= 5
    assert oct(os.stat(os.path.join(where, hdrs.MARKER)).st_mode & 0o777) == "0o644"


def test_marker_without_its_tree_is_rebuilt(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    src, cache = merged_tree(tmp_path)
    where = headers(src, cache, tmp_path)
    import shutil

    shutil.rmtree(os.path.join(where, "include"))  # the marker stays
    assert os.path.exists(os.path.join(where, hdrs.MARKER))
    assert headers(src, cache, tmp_path) == where
    assert os.path.isfile(os.path.join(where, "include/generated/autoconf.h"))
    with open(os.path.join(where, hdrs.MARKER), "w") as f:
        f.write("/somewhere/else\n/and/another\n")  # a marker for other trees: rebuilt too
    headers(src, cache, tmp_path)
    with open(os.path.join(where, hdrs.MARKER)) as f:
        assert "linux-headers-6.1.0-56-amd64" in f.read()


@pytest.mark.parametrize("victim", ["", "headers", "headers/linux-headers-6.1.0-56-amd64/include/linux"])
def test_writable_by_others_is_refused_naming_the_path(victim: str, tmp_path: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    src, cache = merged_tree(tmp_path)
    headers(src, cache, tmp_path)
    path = os.path.join(cache, victim).rstrip("/")
    os.chmod(path, 0o775)
    with pytest.raises(hdrs.CacheError) as e:
        headers(src, cache, tmp_path)
    assert "%s is group- or world-writable (mode 0775)" % path in str(e.value)
    assert e.value.fix == "chmod go-w %s, or remove it: rm -rf %s" % (path, path)


def test_an_empty_cache_root_of_ours_is_tightened(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubelet emptyDir is created 0777: empty and ours, it is made 0755 rather than refused."""
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    src, cache = merged_tree(tmp_path)
    os.mkdir(cache)
    os.chmod(cache, 0o777)
    headers(src, cache, tmp_path)
    assert os.stat(cache).st_mode & 0o777 == 0o755


@pytest.mark.parametrize("value", ["", "relative/cache"])
def test_cache_variable_must_be_absolute(value: str, tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setenv("RSTTRACE_CACHE", value)
    src, _cache = merged_tree(tmp_path)
    with pytest.raises(hdrs.CacheError, match="RSTTRACE_CACHE=.* is not an absolute path"):
        hdrs.kernel_headers("6.18.44", src=src, modules=str(tmp_path), kheaders="/nonexistent")


def test_unwritable_cache_names_the_fix(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    src, _cache = merged_tree(tmp_path)
    blocker = os.path.join(tmp_path, "file")
    with open(blocker, "w"):
        pass
    with pytest.raises(hdrs.CacheError) as e:
        headers(src, os.path.join(blocker, "cache"), tmp_path)
    assert blocker in str(e.value) and "RSTTRACE_CACHE" in e.value.fix


def test_captured_output_keeps_c_level_writes_off_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    """What bcc and clang write to fds 1 and 2 during a compile becomes one log line on stderr."""
    from rsttrace import log

    log.configure("info", "json")
    print("before", flush=True)
    with bccload.captured_output("bcc compile"):
        os.write(1, b"Unable to find kernel headers. Try rebuilding kernel\n")
        os.write(2, b"warning: clang said\nsecond line\n")
        print("python-level print")  # buffered: must not escape after the block either
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "before\nafter\n"
    lines = err.splitlines()
    assert len(lines) == 1 and '"bcc compile output"' in lines[0] and '"lines": 4' in lines[0]
    assert "Unable to find kernel headers" in lines[0] and "python-level print" in lines[0]


def test_captured_output_restores_fds_when_the_body_fails(capfd: pytest.CaptureFixture[str]) -> None:
    from rsttrace import log

    log.configure("info", "json")
    with pytest.raises(RuntimeError), bccload.captured_output("bcc compile"):
        os.write(2, b"error: no such file\n")
        raise RuntimeError("compile failed")
    os.write(1, b"out again\n")
    out, err = capfd.readouterr()
    assert out == "out again\n" and '"level": "warning"' in err and "no such file" in err


def test_a_writable_directory_above_the_cache_is_refused(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever may rename entries above the cache root could swap the whole cache (a sticky
    directory such as /tmp is fine); the fix is another RSTTRACE_CACHE, never removing the parent."""
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    src, _cache = merged_tree(tmp_path)
    above = os.path.join(tmp_path, "shared")
    os.mkdir(above)
    os.chmod(above, 0o777)
    with pytest.raises(hdrs.CacheError) as e:
        headers(src, os.path.join(above, "cache"), tmp_path)
    assert str(e.value).startswith("header cache: %s, above %s/cache, is group- or world-writable (mode 0777)"
                                   % (above, above))
    assert e.value.fix == "set RSTTRACE_CACHE to a path whose every directory is root's"
    os.chmod(above, 0o1777)  # sticky: entries can be renamed only by their owner
    assert headers(src, os.path.join(above, "cache"), tmp_path).startswith(above)
