"""Kubelet log-dir naming and netns link parsing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rsttrace.enrich import parse_netns_link
from rsttrace.enrich.kubelet import (
    ContainerLog,
    PodDir,
    parse_container_log_name,
    scan_containers_dir,
    scan_pods_dir,
    split_pod_dir_name,
)

UID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
CID = "b1" * 32


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(f"web-7d9f-x2k_shop_nginx-{CID}.log", ("shop", "web-7d9f-x2k", "nginx", CID), id="dashes in pod"),
        pytest.param(
            f"coredns-5d78c9869d-abcde_kube-system_coredns-{CID}.log",
            ("kube-system", "coredns-5d78c9869d-abcde", "coredns", CID),
            id="dashes in namespace",
        ),
        pytest.param(
            f"api.v2-0_team-a_log-shipper-{CID}.log",
            ("team-a", "api.v2-0", "log-shipper", CID),
            id="dashes in container, dot in pod",
        ),
        pytest.param(f"web_shop_nginx-{CID}", None, id="no .log suffix"),
        pytest.param(f"web_shop_nginx_{CID}.log", None, id="four fields"),
        pytest.param("web_shop_nginx-notanid.log", None, id="id not hex"),
        pytest.param(f"web_shop_-{CID}.log", None, id="empty container"),
    ],
)
def test_parse_container_log_name(name: str, expected: tuple[str, str, str, str] | None) -> None:
    assert parse_container_log_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param(f"shop_web-7d9f_{UID}", ("shop", "web-7d9f", UID), id="regular"),
        pytest.param(f"shop_web_{UID.upper()}", ("shop", "web", UID), id="uid lower-cased"),
        pytest.param("shop_web", None, id="two fields"),
        pytest.param(f"shop__{UID}", None, id="empty pod"),
    ],
)
def test_split_pod_dir_name(name: str, expected: tuple[str, str, str] | None) -> None:
    assert split_pod_dir_name(name) == expected


def test_scan_pods_dir_lists_container_dirs_per_uid(tmp_path: Path) -> None:
    (tmp_path / f"shop_web-7d9f_{UID}" / "nginx").mkdir(parents=True)
    (tmp_path / f"shop_web-7d9f_{UID}" / "envoy").mkdir()
    (tmp_path / f"shop_web-7d9f_{UID}" / "stray.txt").write_text("")
    (tmp_path / "not-a-pod-dir").mkdir()
    (tmp_path / "shop_file_0000.log").write_text("")
    assert scan_pods_dir(str(tmp_path)) == {
        UID: PodDir(namespace="shop", pod="web-7d9f", uid=UID, containers=frozenset({"nginx", "envoy"}))
    }


def test_scan_pods_dir_missing_is_empty(tmp_path: Path) -> None:
    assert scan_pods_dir(str(tmp_path / "absent")) == {}


def test_scan_containers_dir_reads_uid_from_link_text_only(tmp_path: Path) -> None:
    # The link points into a pods dir that is not mounted here: its text is
    # enough, it is never followed.
    link = tmp_path / f"web-7d9f_shop_nginx-{CID}.log"
    os.symlink(f"/var/log/pods/shop_web-7d9f_{UID}/nginx/0.log", link)
    other = "c2" * 32
    (tmp_path / f"web-7d9f_shop_envoy-{other}.log").write_text("")  # a plain file: no uid
    (tmp_path / "README").write_text("")
    assert scan_containers_dir(str(tmp_path)) == {
        CID: ContainerLog("shop", "web-7d9f", "nginx", CID, UID),
        other: ContainerLog("shop", "web-7d9f", "envoy", other, None),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("net:[4026531840]", 4026531840),
        ("net:[4026532000]\n", 4026532000),
        ("mnt:[4026531841]", None),
        ("net:[]", None),
        ("/proc/1/ns/net", None),
    ],
)
def test_parse_netns_link(text: str, expected: int | None) -> None:
    assert parse_netns_link(text) == expected
