"""Property tests for the CONNECT request parser (unit tier; `make fuzz` runs them longer).

For any input the parser returns a result or raises its own error with a bounded message; it
never raises anything else, never accepts a non-ASCII digit, and its work is linear in an input
it caps at 64 characters (so no input can make it hang). Runs with or without the fuzz
profiles in tests/unit/fuzz/conftest.py; examples have no deadline, the guest clock is slow.
"""

from __future__ import annotations

import ipaddress

import h2.config
import h2.connection
import h2.events
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ztunnel import connect, hbone
from ztunnel.events import Cause

LOCAL = ipaddress.ip_address("10.251.0.11")
MAX_REASON = 200  # a rejection's reason ends up in one log line

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that matter to the parser, digits of other scripts (Arabic-Indic, fullwidth,
# Devanagari, mathematical...) and anything else.
_interesting = st.sampled_from(list("0123456789abcdefABCDEF.:[]%+-_ \t\n\x00"))
_unicode_digits = st.characters(categories=["Nd"])
_chars = st.one_of(_interesting, _interesting, _unicode_digits, st.characters())
_texts = st.text(_chars, max_size=80)


@st.composite
def _near_valid(draw: st.DrawFn) -> str:
    """An ip:port with some characters swapped for other scripts' digits or junk."""
    ip = draw(st.ip_addresses())
    port = draw(st.integers(0, 70000))
    text = connect.format_hostport(ip, port) if port <= 65535 else f"{ip}:{port}"
    chars = list(text)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(chars) - 1))
        chars[i] = draw(st.one_of(_unicode_digits, _interesting))
    return "".join(chars)


_authorities = st.one_of(_texts, _near_valid())


def _check_parse(authority: str) -> None:
    try:
        ip, port = connect.parse_authority(authority)
    except connect.AuthorityError as exc:
        assert 0 < len(str(exc)) <= MAX_REASON
        return
    # Accepted: plain ASCII, a real port, and it reads back as written.
    assert authority.isascii()
    assert 0 < port < 65536
    assert connect.parse_authority(connect.format_hostport(ip, port)) == (ip, port)
    port_text = authority.rpartition(":")[2]
    assert port_text.isascii() and port_text.isdigit() and int(port_text) == port


@SETTINGS
@given(_authorities)
@example("10.251.0.11:\u0668\u0660\u0668\u0660")  # the "٨٠٨٠"
@example("10.251.0.11:\uff18\uff10\uff18\uff10")
@example("10.251.0.11:" + "9" * 5000)
@example("[fe80::1%\u0661]:80")
def test_parse_authority_returns_or_rejects_clearly(authority: str) -> None:
    _check_parse(authority)


@SETTINGS
@given(st.text(_chars, min_size=1000, max_size=20000))
def test_huge_authorities_are_rejected_by_length(authority: str) -> None:
    try:
        connect.parse_authority(authority)
    except connect.AuthorityError as exc:
        assert "longer than" in str(exc) and len(str(exc)) <= MAX_REASON
    else:
        raise AssertionError("a 1000+ character authority was accepted")


_header_names = st.one_of(st.sampled_from([":method", ":authority", "forwarded", "traceparent",
                                           ":scheme", ":path"]), st.text(max_size=20))
_methods = st.one_of(st.just("CONNECT"), st.sampled_from(["GET", "connect", "CONNECT "]),
                     st.text(max_size=20))


@SETTINGS
@given(method=_methods, authority=_authorities,
       extra=st.dictionaries(_header_names, st.text(max_size=40), max_size=6))
def test_validate_request_gives_a_status_and_a_cause(
        method: str, authority: str, extra: dict[str, str]) -> None:
    headers = {**extra, ":method": method, ":authority": authority}
    verdict = connect.validate_request(headers, LOCAL)
    if verdict.ok:
        assert verdict.target is not None and verdict.cause is None
        ip, port = verdict.target
        assert ip == LOCAL and port not in connect.ILLEGAL_PORTS
        assert method == "CONNECT" and authority.isascii()
    else:
        assert verdict.status == connect.BAD_REQUEST and verdict.target is None
        assert isinstance(verdict.cause, Cause)
        assert 0 < len(verdict.reason) <= MAX_REASON


@SETTINGS
@given(authority=_authorities,
       extra=st.lists(st.tuples(st.text(max_size=16), st.text(max_size=40)), max_size=4))
@example(authority="10.251.0.11:8080", extra=[])  # accepted: 200
@example(authority="10.251.0.11:\u0668\u0660\u0668\u0660", extra=[])  # 400
@example(authority="10.251.0.11:8080", extra=[("Bad Name", "x")])  # h2 refuses the block
@example(authority="\ud800", extra=[])  # a lone surrogate: not UTF-8 on the wire
def test_requests_over_hbone_are_answered_or_refused_cleanly(
        authority: str, extra: list[tuple[str, str]]) -> None:
    """The whole server path without sockets: a client that validates nothing (a raw h2
    connection) sends any header block; the real HBONE core decodes it and the request is
    validated. Every request is answered 200 or 400, or the core reports a protocol error and
    closes the connection; nothing raises."""
    raw = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
        normalize_outbound_headers=False))
    server = hbone.Core(client=False)
    server.start()
    raw.initiate_connection()
    server.receive(raw.data_to_send())
    raw.receive_data(server.outbound())
    sid = raw.get_next_available_stream_id()
    # As bytes: a lone surrogate is still some bytes on the wire for the server to refuse.
    block = [(":method", "CONNECT"), (":authority", authority), *extra]
    raw.send_headers(sid, [(k.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass"))
                           for k, v in block])
    events = server.receive(raw.data_to_send())
    requests = [e for e in events if isinstance(e, hbone.Request)]
    if not requests:
        failures = [e for e in events if isinstance(e, hbone.ConnectionFailed)]
        assert failures and server.terminated and failures[0].reason
        return
    (req,) = requests
    verdict = connect.validate_request(req.headers, LOCAL)
    server.respond(req.stream_id, verdict.status)
    answers = [e for e in raw.receive_data(server.outbound())
               if isinstance(e, h2.events.ResponseReceived)]
    statuses = [str(v) for a in answers for k, v in a.headers if str(k) == ":status"]
    assert statuses == [str(verdict.status)]
