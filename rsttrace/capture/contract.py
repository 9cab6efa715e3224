"""ctypes mirror of bpf/rsttrace.h. tests/unit/test_contract.py checks it against the C header."""

from __future__ import annotations

import ctypes

KIND_SENT = 1
KIND_RECEIVED = 2
KIND_LISTEN_OVERFLOW_SYN = 3
KIND_LISTEN_OVERFLOW_ACK = 4
KIND_SYN_QUEUE_OVERFLOW = 5
KIND_LISTEN_DROP = 6
KIND_MAX = 7

KIND_NAMES = {
    KIND_SENT: "sent",
    KIND_RECEIVED: "received",
    KIND_LISTEN_OVERFLOW_SYN: "listen_overflow_syn",
    KIND_LISTEN_OVERFLOW_ACK: "listen_overflow_ack",
    KIND_SYN_QUEUE_OVERFLOW: "syn_queue_overflow",
    KIND_LISTEN_DROP: "listen_drop",
}
KIND_BY_NAME = {v: k for k, v in KIND_NAMES.items()}

REASON_NONE = 0xFFFFFFFF
AF_INET = 2
AF_INET6 = 10

F_PROCESS = 1 << 0
F_ACTIVE = 1 << 1
F_PEER_FROM_SKB = 1 << 2
F_NETNS_FROM_DEV = 1 << 3
F_KPROBE = 1 << 4
F_LOCAL_ABORT = 1 << 5
F_REQUEST_SOCK = 1 << 6
F_SYNCOOKIE = 1 << 7

STAT_EVENTS = 0
STAT_BUFFER_FULL = 1
STAT_COUNTER_FULL = 2
STAT_SUPPRESSED = 3
STAT_MAX = 4


class RawEvent(ctypes.Structure):
    _fields_ = [
        ("ktime_ns", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("netns", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("reason", ctypes.c_uint32),
        ("backlog", ctypes.c_uint32),
        ("max_backlog", ctypes.c_uint32),
        ("netns_gen", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("lport", ctypes.c_uint16),
        ("rport", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 6),
        ("laddr", ctypes.c_uint8 * 16),
        ("raddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


class CounterKey(ctypes.Structure):
    _fields_ = [
        ("netns", ctypes.c_uint32),
        ("netns_gen", ctypes.c_uint32),
        ("reason", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("port", ctypes.c_uint16),
        ("state", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]
