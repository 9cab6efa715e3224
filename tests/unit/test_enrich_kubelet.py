"""Kubelet log-dir naming and netns link parsing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

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
        pytest.param("web-7d9f-x2k_shop_nginx-%s.log" % (CID,), ("shop", "web-7d9f-x2k", "nginx", CID),
                     id="dashes in pod"),
        pytest.param(
            "coredns-5d78c9869d-abcde_kube-system_coredns-%s.log" % (CID,),
            ("kube-system", "coredns-5d78c9869d-abcde", "coredns", CID),
            id="dashes in namespace",
        ),
        pytest.param(
            "api.v2-0_team-a_log-shipper-%s.log" % (CID,),
            ("team-a", "api.v2-0", "log-shipper", CID),
            id="dashes in container, dot in pod",
        ),
        pytest.param("web_shop_nginx-%s" % (CID,), None, id="no .log suffix"),
        pytest.param("web_shop_nginx_%s.log" % (CID,), None, id="four fields"),
        pytest.param("web_shop_nginx-notanid.log", None, id="id not hex"),
        pytest.param("web_shop_-%s.log" % (CID,), None, id="empty container"),
    ],
)
def test_parse_container_log_name(name: str, expected: Optional[Tuple[str, str, str, str]]) -> None:
    assert parse_container_log_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("shop_web-7d9f_%s" % (UID,), ("shop", "web-7d9f", UID), id="regular"),
        pytest.param("shop_web_%s" % UID.upper(), ("shop", "web", UID), id="uid lower-cased"),
        pytest.param("shop_web", None, id="two fields"),
        pytest.param("shop__%s" % (UID,), None, id="empty pod"),
    ],
)
def test_split_pod_dir_name(name: str, expected: Optional[Tuple[str, str, str]]) -> None:
    assert split_pod_dir_name(name) == expected


def test_scan_pods_dir_lists_container_dirs_per_uid(tmp_path: Path) -> None:
    (tmp_path / ("shop_web-7d9f_%s" % (UID,)) / "nginx").mkdir(parents=True)
    (tmp_path / ("shop_web-7d9f_%s" % (UID,)) / "envoy").mkdir()
    (tmp_path / ("shop_web-7d9f_%s" % (UID,)) / "stray.txt").write_text("")
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
    link = tmp_path / ("web-7d9f_shop_nginx-%s.log" % (CID,))
    os.symlink("/var/log/pods/shop_web-7d9f_%s/nginx/0.log" % (UID,), link)
    other = "c2" * 32
    (tmp_path / ("web-7d9f_shop_envoy-%s.log" % (other,))).write_text("")  # a plain file: no uid
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
def test_parse_netns_link(text: str, expected: Optional[int]) -> None:
    assert parse_netns_link(text) == expected
