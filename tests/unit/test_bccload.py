"""Finding headers for bcc without touching /lib/modules, and bcc from another interpreter."""

from __future__ import annotations

import builtins
import os
import sys
from typing import Iterator

import pytest

from rsttrace import bccload


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
    where, why = bccload.kernel_headers("6.18.44", cache=cache, src=src, modules=str(tmp_path),
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
    assert bccload.kernel_headers("6.18.44", cache=cache, src=src, modules=str(tmp_path),
                                  kheaders="/nonexistent")[0] == where  # reused


def test_matching_modules_build_dir_wins(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    os.makedirs(os.path.join(tmp_path, "6.18.44", "build", "include"))
    where, why = bccload.kernel_headers("6.18.44", src=str(tmp_path), modules=str(tmp_path), kheaders="/x")
    assert where is None and "matching headers" in why


def test_no_headers_is_one_clear_error(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    with pytest.raises(bccload.BccMissing, match="apt-get install linux-headers"):
        bccload.kernel_headers("6.18.44", src=str(tmp_path), modules=str(tmp_path), kheaders="/x")


def test_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/somewhere")
    assert bccload.kernel_headers("6.18.44")[0] == "/somewhere"


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
