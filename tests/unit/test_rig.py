"""Unit tests of the kernel test rig's host-side helpers (rig/riglib.py).

No qemu, no debootstrap, no root: only the pure parts (lists, cache key,
wheel unpacking, the input and result tars, command quoting).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

RIG = Path(__file__).resolve().parents[2] / "rig"
sys.path.insert(0, str(RIG))

import riglib  # noqa: E402


def test_read_list_drops_comments_and_blanks(tmp_path: Path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("# head\nfoo   # why\n\n  bar==1.0\n#x\n")
    assert riglib.read_list(p) == ["foo", "bar==1.0"]


def test_shipped_lists_parse() -> None:
    pkgs = riglib.read_list(RIG / "packages.txt")
    assert {"linux-image-amd64", "linux-headers-amd64", "python3-bpfcc"} <= set(pkgs)
    wheels = riglib.read_list(RIG / "requirements.txt")
    assert all("==" in w for w in wheels), "pin every wheel: the list is part of the cache key"


def test_cache_key_changes_with_inputs() -> None:
    r = riglib.BY_LABEL["6.1"]
    base = riglib.cache_key(r, ["a", "b"], ["x==1"], "default", b"init")
    assert base == riglib.cache_key(r, ["b", "a"], ["X==1"], "default", b"init")
    assert base != riglib.cache_key(r, ["a", "b", "c"], ["x==1"], "default", b"init")
    assert base != riglib.cache_key(r, ["a", "b"], ["x==2"], "default", b"init")
    assert base != riglib.cache_key(r, ["a", "b"], ["x==1"], "http://m/debian", b"init")
    assert base != riglib.cache_key(r, ["a", "b"], ["x==1"], "default", b"init2")
    assert base != riglib.cache_key(riglib.BY_LABEL["6.12"], ["a", "b"], ["x==1"], "default", b"init")


def test_select_releases() -> None:
    labels = [r.label for r in riglib.select_releases([])]
    assert labels == ["5.10", "6.1", "6.12", "7.2", "6.12-cloud"]
    assert [r.suite for r in riglib.select_releases(["6.12,5.10", "6.12"])] == ["trixie", "bullseye"]
    assert [r.label for r in riglib.select_releases(["bookworm"])] == ["6.1"]
    assert [r.label for r in riglib.select_releases(["12"])] == ["6.1"]
    # The suite name means the generic kernel; the cloud flavor has its own names.
    assert [r.label for r in riglib.select_releases(["trixie"])] == ["6.12"]
    assert [r.label for r in riglib.select_releases(["cloud", "unstable,sid"])] == ["6.12-cloud", "7.2"]
    with pytest.raises(riglib.RigError):
        riglib.select_releases(["4.19"])


def test_a_flavor_is_its_own_image() -> None:
    generic, cloud = riglib.BY_LABEL["6.12"], riglib.BY_LABEL["6.12-cloud"]
    assert (generic.slug, cloud.slug) == ("trixie", "trixie-cloud")
    pkgs = ["linux-image-amd64", "linux-headers-amd64", "python3-bpfcc"]
    assert riglib.release_packages(generic, pkgs) == pkgs
    cloud_pkgs = ["linux-image-cloud-amd64", "linux-headers-cloud-amd64", "python3-bpfcc"]
    assert riglib.release_packages(cloud, pkgs) == cloud_pkgs
    key = riglib.cache_key(generic, pkgs, [], "default", b"")
    assert key != riglib.cache_key(cloud, pkgs, [], "default", b"")


def test_release_wheels_reads_python_version_markers() -> None:
    lines = ["a==1", 'y==6.0.2; python_version < "3.14"', "y==6.0.3 ; python_version>='3.14'",
             'z==1; python_version >= "3.10" and python_version < "3.14"']
    assert riglib.release_wheels(riglib.BY_LABEL["5.10"], lines) == ["a==1", "y==6.0.2"]
    assert riglib.release_wheels(riglib.BY_LABEL["6.12"], lines) == ["a==1", "y==6.0.2", "z==1"]
    assert riglib.release_wheels(riglib.BY_LABEL["7.2"], lines) == ["a==1", "y==6.0.3"]
    with pytest.raises(riglib.RigError):
        riglib.release_wheels(riglib.BY_LABEL["7.2"], ['x==1; sys_platform == "linux"'])


def test_shipped_requirements_give_one_pin_per_wheel_everywhere() -> None:
    lines = riglib.read_list(RIG / "requirements.txt")
    for release in riglib.RELEASES:
        names = [w.split("==")[0].lower() for w in riglib.release_wheels(release, lines)]
        assert len(names) == len(set(names)), release.label
        assert "pyyaml" in names, release.label


def test_parse_args_takes_command_after_dashes() -> None:
    args = riglib.parse_args(["--kernel", "6.1", "--", "sh", "-c", "echo --kernel"])
    assert args.kernel == ["6.1"]
    assert args.command == ["sh", "-c", "echo --kernel"]


def test_command_script_quotes_for_sh(tmp_path: Path) -> None:
    argv = ["printf", "%s|", "a b", "it's", "$HOME", "`x`", ""]
    script = tmp_path / "cmd.sh"
    script.write_text(riglib.command_script(argv))
    out = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True, check=True)
    assert out.stdout == "a b|it's|$HOME|`x`||"


def test_console_scripts_and_script_text() -> None:
    eps = "[console_scripts]\npytest = pytest:console_main\npy.test = pytest:console_main\n[other]\nx = y:z\n"
    scripts = riglib.console_scripts(eps)
    assert scripts == {"pytest": "pytest:console_main", "py.test": "pytest:console_main"}
    text = riglib.script_text("pkg.mod:obj.run")
    assert text.startswith("#!/usr/bin/python3\n")
    assert "from pkg.mod import obj\n" in text and "sys.exit(obj.run())" in text


def _wheel(path: Path, files: Dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_install_wheel_unpacks_into_usr_local(tmp_path: Path) -> None:
    whl = _wheel(
        tmp_path / "demo-1.0-py3-none-any.whl",
        {
            "demo/__init__.py": "X = 1\n",
            "demo-1.0.dist-info/METADATA": "Name: demo\n",
            "demo-1.0.dist-info/entry_points.txt": "[console_scripts]\ndemo = demo:main\n",
            "demo-1.0.data/scripts/demo-sh": "#!/bin/sh\n",
            "demo-1.0.data/purelib/demo_extra.py": "",
        },
    )
    root = tmp_path / "root"
    made = riglib.install_wheel(whl, root, "python3.11")
    site = root / "usr/local/lib/python3.11/dist-packages"
    assert (site / "demo/__init__.py").read_text() == "X = 1\n"
    assert (site / "demo_extra.py").exists()
    assert (site / "demo-1.0.dist-info/INSTALLER").exists()
    assert made == ["demo"]
    assert (root / "usr/local/bin/demo").stat().st_mode & 0o111
    assert (root / "usr/local/bin/demo-sh").stat().st_mode & 0o111


def test_install_wheel_rejects_escaping_paths(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "bad-1.0-py3-none-any.whl", {"bad-1.0.dist-info/METADATA": "", "../evil.py": ""})
    with pytest.raises(riglib.RigError):
        riglib.install_wheel(whl, tmp_path / "root", "python3.9")


def test_input_tar_layout(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg/a.py").write_text("A\n")
    (project / "link").symlink_to("pkg/a.py")
    shared = tmp_path / "project.tar"
    vanished = riglib.write_project_tar(shared, project, ["pkg/a.py", "link", "gone.py"], ["true"])
    assert vanished == ["gone.py"]
    tar = tmp_path / "in.tar"
    riglib.write_input_tar(tar, shared, "export A=1\n")
    assert tar.stat().st_size % 512 == 0
    with tarfile.open(tar) as tf:
        names = set(tf.getnames())
        assert {"init.sh", "cmd.sh", "env.sh", "project/pkg/a.py", "project/link"} <= names
        assert tf.getmember("project/link").issym()
        assert tf.getmember("project/pkg/a.py").uid == 0
        env = tf.extractfile("env.sh")
        assert env is not None and env.read() == b"export A=1\n"


def test_attach_dir_goes_to_rig_attach(tmp_path: Path) -> None:
    project, attach = tmp_path / "proj", tmp_path / "att"
    project.mkdir()
    (attach / "wheels").mkdir(parents=True)
    (attach / "wheels/x-1-py3-none-any.whl").write_bytes(b"zip")
    shared = tmp_path / "project.tar"
    riglib.write_project_tar(shared, project, [], ["true"], attach)
    with tarfile.open(shared) as tf:
        member = tf.getmember("attach/wheels/x-1-py3-none-any.whl")
        assert member.uid == 0 and member.uname == "root"


def _result_disk(path: Path, members: List[Tuple[str, Optional[bytes]]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with open(path, "ab") as f:  # the rest of the raw disk is zeros
        f.truncate(1 << 20)
    return path


def test_extract_result_status_and_files(tmp_path: Path) -> None:
    disk = _result_disk(
        tmp_path / "r.disk",
        [("./status", b"3\n"), ("./out", None), ("./out/junit.xml", b"<x/>"), ("../escape", b"no")],
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    assert riglib.extract_result(disk, dest) == 3
    assert (dest / "out/junit.xml").read_bytes() == b"<x/>"
    assert not (tmp_path / "escape").exists()


def test_extract_result_of_blank_disk_is_none(tmp_path: Path) -> None:
    disk = tmp_path / "blank.disk"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    assert riglib.extract_result(disk, tmp_path) is None


def test_env_script_is_sourceable(tmp_path: Path) -> None:
    script = tmp_path / "env.sh"
    script.write_text(riglib.env_script(riglib.BY_LABEL["5.10"], {"X": "a 'b'"}))
    out = subprocess.run(
        ["/bin/sh", "-c", ". %s; echo \"$RSTTRACE_RIG_KERNEL $RSTTRACE_RIG_SUITE $X\"" % (script,)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "5.10 bullseye a 'b'\n"


def test_split_marker() -> None:
    assert riglib.split_marker("plain output") == ("plain output", None)
    assert riglib.split_marker("") == ("", None)
    assert riglib.split_marker("RSTTRACE-RIG: status 3") == ("", "status 3")
    # output without a trailing newline glued to the marker line
    assert riglib.split_marker("no newlineRSTTRACE-RIG: status 0") == ("no newline", "status 0")


def test_summary_table_prints_sizes_and_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rig's closing table (every CI run prints it): sizes in GiB, build and boot times."""
    release = riglib.RELEASES[0]
    built = riglib.Image(release, "k", tmp_path, {"kernel": "5.10.0-32-amd64", "image_bytes_used": 983 << 20}, 299.4)
    cached = riglib.Image(release, "k", tmp_path, {"kernel": "5.10.0-32-amd64"})
    outcomes = [riglib.Outcome(release, built, 0, 594.6), riglib.Outcome(release, cached, None, None, "no status")]
    riglib.print_summary(outcomes, tmp_path)
    out = capsys.readouterr().out
    assert "0.96 GiB" in out and "built 299 s" in out and "594.6 s" in out, out
    assert "cached" in out and "none (no status)" in out and "?" in out, out
    assert riglib.human_bytes("983") == "?"
