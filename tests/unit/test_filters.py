from __future__ import annotations

import pytest

from rsttrace.pipeline.events import Event
from rsttrace.pipeline.filters import EventFilter, FilterError, parse_addrs, parse_kinds, parse_ports, parse_reasons


def ev(**kw: object) -> Event:
    base = dict(time="2026-01-01T00:00:00.000000Z", ktime_ns=0, kind="sent", reason="NO_SOCKET", reason_raw=1,
                reason_source="kernel", state=None, family="ipv4", laddr="10.0.0.1", lport=80, raddr="192.168.1.9",
                rport=40000, netns=7, cookie=None, pid=None, comm=None)
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def test_each_filter() -> None:
    assert EventFilter(kinds=["sent"]).match(ev()) and not EventFilter(kinds=["received"]).match(ev())
    assert EventFilter(reasons={"NO_SOCKET"}).match(ev()) and not EventFilter(reasons={"TCP_STATE"}).match(ev())
    assert EventFilter(ports={80}).match(ev()) and EventFilter(ports={40000}).match(ev())
    assert not EventFilter(ports={443}).match(ev())
    assert EventFilter(addrs=parse_addrs(["192.168.0.0/16"])).match(ev())
    assert not EventFilter(addrs=parse_addrs(["172.16.0.0/12"])).match(ev())
    assert not EventFilter(addrs=parse_addrs(["fd00::/8"])).match(ev())
    assert EventFilter(netns=7).match(ev()) and not EventFilter(netns=8).match(ev())
    assert EventFilter(family="ipv4").match(ev()) and not EventFilter(family="ipv6").match(ev())


def test_counter_derived_events_without_addresses() -> None:
    e = ev(kind="listen_overflow_syn", laddr=None, raddr=None, lport=None, rport=None)
    assert not EventFilter(addrs=parse_addrs(["10.0.0.0/8"])).match(e)
    assert EventFilter(kinds=["listen_overflow_syn"]).match(e)


def test_parsers() -> None:
    assert parse_kinds(["sent,received"]) == ["sent", "received"]
    assert parse_ports(["80,443", "8080"]) == {80, 443, 8080}
    assert parse_reasons(["no_socket"]) == {"NO_SOCKET"}
    assert parse_kinds(None) is None and parse_ports([]) is None


@pytest.mark.parametrize("fn,arg,msg", [
    (parse_kinds, ["sendt"], "unknown kind"),
    (parse_ports, ["http"], "bad port"),
    (parse_ports, ["70000"], "bad port"),
    (parse_addrs, ["10.0.0.0/33"], "bad address"),
])
def test_bad_input_names_the_problem(fn: object, arg: list, msg: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(FilterError, match=msg):
        fn(arg)  # type: ignore[operator]


def test_summary_filters_counters_as_trace_filters_events() -> None:
    f = EventFilter(kinds=["sent"], netns=7, family="ipv4")
    assert f.match_count("sent", 7, "ipv4")
    assert f.match_count("sent", 7, None)  # a counter without a family passes a family filter
    assert not f.match_count("received", 7, "ipv4")
    assert not f.match_count("sent", 8, "ipv4")
    assert not f.match_count("sent", 7, "ipv6")
    assert EventFilter().match_count("listen_drop", None, None)
