"""Format-file parsing against real format files saved from 5.10, 6.1, 6.12 and 6.18 kernels."""

from __future__ import annotations

import os

import pytest

from rsttrace.kernel.tracefs import Tracefs, parse_format, parse_print_symbolic
from tests.testpaths import KERNEL_FORMATS

K618 = os.path.join(KERNEL_FORMATS, "6.18.44-fc-v657")
K612 = os.path.join(KERNEL_FORMATS, "6.12.107+deb13-amd64")
K61 = os.path.join(KERNEL_FORMATS, "6.1.0-50-amd64")
K510 = os.path.join(KERNEL_FORMATS, "5.10.0-32-amd64")


def fields(root: str, system: str, name: str) -> dict:  # type: ignore[type-arg]
    fmt = Tracefs(root).format(system, name)
    assert fmt is not None
    return {f.name: (f.ctype, f.offset, f.size, f.array_len) for f in fmt.fields}


def test_send_reset_618_has_reason_and_sockaddrs() -> None:
    f = fields(K618, "tcp", "tcp_send_reset")
    assert f["reason"] == ("enum sk_rst_reason", 28, 4, None)
    assert f["saddr"] == ("__u8", 32, 28, 28) and f["daddr"] == ("__u8", 60, 28, 28)
    assert f["skaddr"][1:3] == (16, 8) and f["state"][1:3] == (24, 4)
    assert "sport" not in f and "family" not in f


def test_send_reset_pre_610_layout_without_reason() -> None:
    f = fields(K61, "tcp", "tcp_send_reset")
    assert list(f)[4:] == ["skbaddr", "skaddr", "state", "sport", "dport", "family", "saddr", "daddr",
                           "saddr_v6", "daddr_v6"]
    assert "reason" not in f
    assert f["saddr_v6"] == ("__u8", 42, 16, 16)
    f510 = fields(K510, "tcp", "tcp_send_reset")
    assert "family" not in f510 and "reason" not in f510


def test_receive_reset_cookie_and_family() -> None:
    f = fields(K618, "tcp", "tcp_receive_reset")
    assert f["sock_cookie"] == ("__u64", 64, 8, None)
    assert f["family"][1:3] == (20, 2)
    assert "family" not in fields(K510, "tcp", "tcp_receive_reset")


def test_reason_tables_follow_each_kernel() -> None:
    """Numbers are read per kernel: the same name may carry another number elsewhere."""
    t618 = dict(Tracefs(K618).format("tcp", "tcp_send_reset").symbolic("reason"))  # type: ignore[union-attr]
    t612 = dict(Tracefs(K612).format("tcp", "tcp_send_reset").symbolic("reason"))  # type: ignore[union-attr]
    assert t618["1"] == "NO_SOCKET" and t618["11"] == "TCP_ABORT_ON_CLOSE"
    assert len(t618) == 26 and len(t612) >= 20
    drop = dict(Tracefs(K618).format("skb", "kfree_skb").symbolic("reason"))  # type: ignore[union-attr]
    assert drop["40"] == "TCP_LISTEN_OVERFLOW"
    drop61 = dict(Tracefs(K61).format("skb", "kfree_skb").symbolic("reason"))  # type: ignore[union-attr]
    assert "TCP_LISTEN_OVERFLOW" not in drop61.values() and drop61["2"] == "NO_SOCKET"


def test_state_table_is_symbolic() -> None:
    states = Tracefs(K618).format("tcp", "tcp_send_reset").symbolic("state")  # type: ignore[union-attr]
    assert states[0] == ("TCP_ESTABLISHED", "TCP_ESTABLISHED") and len(states) == 12


def test_print_symbolic_edge_cases() -> None:
    fmt = ('print fmt: "%s %s", __print_symbolic(REC->a, { 1, "X(1)" }, { 2, "Y" }), '
           '__print_symbolic(REC->b, { 3, "Z" })')
    assert parse_print_symbolic(fmt, "a") == [("1", "X(1)"), ("2", "Y")]
    assert parse_print_symbolic(fmt, "b") == [("3", "Z")]
    assert parse_print_symbolic(fmt, "c") == []


def test_missing_event_and_bad_text() -> None:
    assert Tracefs(K510).format("tcp", "no_such_event") is None
    with pytest.raises(Exception, match="no fields"):
        parse_format("name: x\nID: 1\nformat:\n")


def test_mount_points_from_mountinfo(tmp_path: str) -> None:
    """How "not mounted" is told from "not readable": mountinfo is readable by anyone."""
    from rsttrace.kernel import tracefs as t

    path = os.path.join(tmp_path, "mountinfo")
    with open(path, "w") as f:
        f.write("21 45 0:13 / /sys/kernel/tracing rw,relatime - tracefs tracefs rw\n"
                "22 45 0:14 / /mnt/with\\040space rw shared:5 - ext4 /dev/sda1 rw\n"
                "23 45 0:15 / /sys/kernel/debug rw - debugfs debugfs rw\n")
    points = t._mount_points(path)
    assert points == {"/sys/kernel/tracing": "tracefs", "/mnt/with space": "ext4", "/sys/kernel/debug": "debugfs"}
    assert t.unreadable_tracefs(os.path.join(tmp_path, "missing")) is None  # nothing mounted: not "unreadable"
