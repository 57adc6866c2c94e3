"""CONNECT request building and server-side validation (pure)."""

from __future__ import annotations

import ipaddress
import re

import pytest

from ztunnel import connect
from ztunnel.events import Cause

LOCAL = ipaddress.ip_address("10.1.2.3")


@pytest.mark.parametrize(("authority", "want"), [
    ("10.1.2.3:8080", (ipaddress.ip_address("10.1.2.3"), 8080)),
    ("[fd00::1]:443", (ipaddress.ip_address("fd00::1"), 443)),
    ("10.1.2.3:65535", (ipaddress.ip_address("10.1.2.3"), 65535)),
])
def test_parse_authority_accepts_ip_and_port(authority: str, want: object) -> None:
    assert connect.parse_authority(authority) == want


@pytest.mark.parametrize("authority", [
    "", "10.1.2.3", ":80", "10.1.2.3:", "10.1.2.3:0", "10.1.2.3:65536", "10.1.2.3:+80",
    "example.com:80", "fd00::1:80", "10.1.2.3:80x", "[10.1.2.3:80",
])
def test_parse_authority_rejects_everything_else(authority: str) -> None:
    with pytest.raises(connect.AuthorityError):
        connect.parse_authority(authority)


def test_request_headers_as_ztunnel_sends_them() -> None:
    h = dict(connect.request_headers(ipaddress.ip_address("10.1.2.3"), 8080,
                                     ipaddress.ip_address("10.9.9.9"), 41000))
    assert h[":method"] == "CONNECT"
    assert h[":authority"] == "10.1.2.3:8080"
    assert h["forwarded"] == 'for="10.9.9.9:41000"'
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", h["traceparent"])
    assert connect.parse_forwarded_for(h["forwarded"]) == "10.9.9.9:41000"
    # A fresh trace id per connection.
    assert len({connect.new_traceparent() for _ in range(50)}) == 50


def test_validation_order_and_statuses() -> None:
    def v(method: str, authority: str) -> connect.ConnectVerdict:
        return connect.validate_request({":method": method, ":authority": authority}, LOCAL)

    # Method first: even a bad authority is reported as a bad method.
    bad_method = v("GET", "nonsense")
    assert bad_method.status == 400 and "not CONNECT" in bad_method.reason
    assert v("CONNECT", "nonsense").status == 400
    mismatch = v("CONNECT", "10.1.2.4:8080")
    assert mismatch.status == 400 and "wrong pod" in mismatch.reason
    # Address check comes before the port check.
    assert "wrong pod" in v("CONNECT", "10.1.2.4:15008").reason
    for port in (15001, 15006, 15008):
        illegal = v("CONNECT", f"10.1.2.3:{port}")
        assert illegal.status == 400 and "tunnel port" in illegal.reason
    ok = v("CONNECT", "10.1.2.3:8080")
    assert ok.ok and ok.target == (LOCAL, 8080)
    assert connect.validate_request({}, LOCAL).status == 400


@pytest.mark.parametrize("authority", [
    "10.251.0.11:\u0668\u0660\u0668\u0660",  # Arabic-Indic "8080": int() reads it as 8080
    "10.1.2.3:\uff18\uff10",  # fullwidth "80"
    "10.1.2.3:\uff180",
    "\u0661\u0660.1.2.3:80",
    "10.1.2.3: 80", "10.1.2.3:8_0", "10.1.2.3:-80", "10.1.2.3:080000",
    "[10.1.2.3]:80",  # brackets are for IPv6 only
    "[fe80::1%eth0]:80",  # scoped addresses name an interface, not a pod
    "10.1.2.3:" + "1" * 5000,  # int() would raise its own ValueError past 4300 digits
])
def test_authority_ports_and_addresses_are_ascii_only(authority: str) -> None:
    with pytest.raises(connect.AuthorityError):
        connect.parse_authority(authority)
    verdict = connect.validate_request({":method": "CONNECT", ":authority": authority}, LOCAL)
    assert verdict.status == 400 and verdict.cause is Cause.BAD_AUTHORITY
    assert len(verdict.reason) < 200  # the reason goes into a log line: bounded


@pytest.mark.parametrize(("text", "want"), [("1", 1), ("8080", 8080), ("65535", 65535),
                                            ("00080", 80)])
def test_parse_port_takes_ascii_digits(text: str, want: int) -> None:
    assert connect.parse_port(text) == want


@pytest.mark.parametrize("text", ["", "0", "65536", "\u0668\u0660\u0668\u0660", "+80", " 80",
                                  "8_0", "99999", "123456"])
def test_parse_port_refuses_everything_else(text: str) -> None:
    with pytest.raises(ValueError, match="ASCII digits"):
        connect.parse_port(text)


def test_each_rejection_names_its_cause() -> None:
    def cause(method: str, authority: str) -> Cause | None:
        return connect.validate_request({":method": method, ":authority": authority},
                                        LOCAL).cause

    assert cause("GET", "10.1.2.3:80") is Cause.BAD_METHOD
    assert cause("CONNECT", "nope") is Cause.BAD_AUTHORITY
    assert cause("CONNECT", "10.1.2.4:80") is Cause.WRONG_DESTINATION
    assert cause("CONNECT", "10.1.2.3:15008") is Cause.ILLEGAL_PORT
    assert cause("CONNECT", "10.1.2.3:80") is None
