"""SSE parser and writer: both twins against a plain reference parser of the whole stream."""
from __future__ import annotations

import re
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwnative import _sse_py
from gwnative.errors import SSEError

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

Event = tuple[str, str, "str | None", "int | None"]


# -- an independent reference: decode everything, split lines, follow the spec -------

def reference_parse(stream: bytes) -> tuple[list[Event], bool]:
    """Events and ``truncated`` for a whole stream, per the WHATWG steps, done the obvious
    way: decode it all, drop one BOM, split at CRLF/CR/LF, interpret line by line."""
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    *lines, partial = re.split("\r\n|\r|\n", text)
    events: list[Event] = []
    event, data, last_id, retry, pending = "", None, None, None, False
    for line in lines:
        if line == "":
            if data is not None:
                events.append((event, "\n".join(data), last_id, retry))
            event, data, last_id, retry, pending = "", None, None, None, False
            continue
        pending = True
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data = [value] if data is None else data + [value]
        elif name == "event":
            event = value
        elif name == "id":
            if "\x00" not in value:
                last_id = value
        elif name == "retry":
            if value and all("0" <= c <= "9" for c in value):
                retry = int(value)
    return events, bool(partial) or pending


def reference_block_sizes(stream: bytes) -> list[int]:
    """Bytes of each event block (its lines, line ends not counted), the unterminated
    one included: what max_event_bytes limits."""
    if stream.startswith(b"\xef\xbb\xbf"):
        stream = stream[3:]
    *lines, partial = re.split(rb"\r\n|\r|\n", stream)
    sizes, size = [], 0
    for line in lines:
        if line:
            size += len(line)
        else:
            sizes.append(size)
            size = 0
    sizes.append(size + len(partial))
    return sizes


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def parse_pieces(impl: ModuleType, pieces: list[bytes], **kw: int) -> tuple[list[Event], bool]:
    parser = impl.SSEParser(**kw)
    events = [e.astuple() for piece in pieces for e in parser.feed(piece)]
    events += [e.astuple() for e in parser.close()]
    return events, parser.truncated


# -- strategies -----------------------------------------------------------------------

EOLS = [b"\n", b"\r", b"\r\n"]
texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=12,
)
raw_values = st.one_of(
    texts.map(lambda t: t.encode("utf-8")),
    st.binary(max_size=8).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"", b" ", b"  x", b"123", b"007", b"12a", b"\x00", b"\xff", b"\xc3",
                     b"\xe2\x82\xac", b"\xef\xbb\xbf", b"{\"a\":1}"]),
)
names = st.sampled_from([b"data", b"event", b"id", b"retry", b"foo", b"", b"dat", b"DATA",
                         b"data ", b"\xef\xbb\xbfdata"])
separators = st.sampled_from([b":", b": ", b":  ", b""])
field_lines = st.builds(lambda n, s, v: n + s + v, names, separators, raw_values)
comment_lines = raw_values.map(lambda v: b":" + v)
lines = st.one_of(field_lines, field_lines, comment_lines)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    out = [b"\xef\xbb\xbf"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 5))):
        for line in draw(st.lists(lines, max_size=5)):
            out.append(line + draw(st.sampled_from(EOLS)))
        out.append(draw(st.sampled_from(EOLS)))  # the blank line that dispatches
    # maybe an unterminated block, maybe a partial line at the very end
    for line in draw(st.lists(lines, max_size=2)):
        out.append(line + draw(st.sampled_from(EOLS)))
    out.append(draw(st.sampled_from([b"", b"data: cut", b"\xe2\x82", b"\r"])))
    return b"".join(out)


# Raw fuzz: the interesting bytes of the format in any order.
fuzz_streams = st.lists(
    st.sampled_from([b"data:", b"data: x", b"event: e", b"id: 1", b"id", b"retry: 5",
                     b":", b" ", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xef", b"\xbb",
                     b"\xff", b"\xc3", b"\xa9", b"x", b"\x00"]),
    max_size=40,
).map(b"".join)


# -- parsing ----------------------------------------------------------------------------

@SETTINGS
@given(stream=sse_streams(), data=st.data())
def test_any_chunking_yields_the_reference_events(
    sse_impl: ModuleType, stream: bytes, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert parse_pieces(sse_impl, split_at(stream, cuts)) == reference_parse(stream)


@SETTINGS
@given(stream=fuzz_streams, data=st.data())
def test_any_bytes_in_any_chunking_match_the_reference(
    sse_impl: ModuleType, stream: bytes, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert parse_pieces(sse_impl, split_at(stream, cuts)) == reference_parse(stream)


@settings(max_examples=100, deadline=None)
@given(stream=sse_streams())
def test_byte_by_byte_feeding_matches_the_reference(sse_impl: ModuleType, stream: bytes) -> None:
    pieces = [stream[i:i + 1] for i in range(len(stream))]
    assert parse_pieces(sse_impl, pieces) == reference_parse(stream)


@pytest.mark.parametrize(
    "pieces, events",
    [
        ([b"data: a\r", b"\ndata: b\r\n\r\n"], [("", "a\nb", None, None)]),
        ([b"data: a\r", b"", b"\n", b"\r\n"], [("", "a", None, None)]),
        ([b"data: a\r", b"\r"], [("", "a", None, None)]),
        ([b"data: a\r\n\r", b"\n"], [("", "a", None, None)]),
        ([b"data: a\r\r", b"\ndata: b\n\n"], [("", "a", None, None), ("", "b", None, None)]),
    ],
)
def test_a_cr_ending_a_chunk_and_a_lf_opening_the_next_are_one_line_end(
    sse_impl: ModuleType, pieces: list[bytes], events: list[Event]
) -> None:
    assert parse_pieces(sse_impl, pieces) == (events, False)


@pytest.mark.parametrize(
    "pieces",
    [
        [b"\xef\xbb\xbfdata: x\n\n"],
        [b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"],
        [b"\xef\xbb", b"\xbfdata: x\n", b"\n"],
    ],
)
def test_a_leading_bom_is_skipped_even_when_split(
    sse_impl: ModuleType, pieces: list[bytes]
) -> None:
    assert parse_pieces(sse_impl, pieces) == ([("", "x", None, None)], False)


def test_only_the_first_bom_is_skipped(sse_impl: ModuleType) -> None:
    # The second BOM is part of the field name, which is then unknown.
    stream = b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n"
    assert parse_pieces(sse_impl, [stream]) == ([("", "y", None, None)], False)


def test_a_character_split_across_chunks_is_decoded_whole(sse_impl: ModuleType) -> None:
    raw = "data: é€😀\n\n".encode()
    for cut in range(len(raw) + 1):
        assert parse_pieces(sse_impl, [raw[:cut], raw[cut:]]) == (
            [("", "é€😀", None, None)], False)


def test_invalid_utf8_becomes_replacement_characters(sse_impl: ModuleType) -> None:
    assert parse_pieces(sse_impl, [b"data: a\xffb\xe2\x82\n\n"]) == (
        [("", "a\ufffdb\ufffd", None, None)], False)


# Examples from the WHATWG HTML standard, section 9.2.6.
@pytest.mark.parametrize(
    "stream, events, truncated",
    [
        (b"data: YHOO\ndata: +2\ndata: 10\n\n", [("", "YHOO\n+2\n10", None, None)], False),
        (
            b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
            b"data:  third event\n\n",
            [("", "first event", "1", None), ("", "second event", "", None),
             ("", " third event", None, None)],
            False,
        ),
        (b"data\n\ndata\ndata\n\ndata:", [("", "", None, None), ("", "\n", None, None)], True),
        (b"data:test\n\ndata: test\n\n", [("", "test", None, None)] * 2, False),
        (b"event: add\ndata: 73857293\n\n", [("add", "73857293", None, None)], False),
    ],
)
def test_examples_from_the_spec(
    sse_impl: ModuleType, stream: bytes, events: list[Event], truncated: bool
) -> None:
    assert parse_pieces(sse_impl, [stream]) == (events, truncated)


@pytest.mark.parametrize(
    "stream, events",
    [
        (b"event: x\nid: 5\nretry: 10\n\n", []),  # no data field: not dispatched
        (b"data:\n\n", [("", "", None, None)]),  # an empty data field is
        (b"data\n\n", [("", "", None, None)]),
        (b"data: x\nretry: 007\n\n", [("", "x", None, 7)]),
        (b"data: x\nretry: 12a\n\n", [("", "x", None, None)]),
        (b"data: x\nretry:\n\n", [("", "x", None, None)]),
        (b"data: x\nretry: 5\nretry: x\n\n", [("", "x", None, 5)]),
        (b"data: x\nid: a\x00b\n\n", [("", "x", None, None)]),
        (b"data: x\nid: 1\nid: a\x00b\n\n", [("", "x", "1", None)]),
        (b"data: x\nid:\n\n", [("", "x", "", None)]),
        (b"id: 1\n\ndata: x\n\n", [("", "x", None, None)]),  # fields are per block
        (b"data: x\nevent: a\nevent: b\n\n", [("b", "x", None, None)]),
        (b"data:  two spaces\n\n", [("", " two spaces", None, None)]),
        (b"data:a:b\n\n", [("", "a:b", None, None)]),
        (b"Data: x\n\n", []),
        (b": just a comment\n\n", []),
    ],
)
def test_fields(sse_impl: ModuleType, stream: bytes, events: list[Event]) -> None:
    assert parse_pieces(sse_impl, [stream]) == (events, False)


def test_a_huge_retry_is_an_int(sse_impl: ModuleType) -> None:
    stream = b"data: x\nretry: " + b"9" * 40 + b"\n\n"
    assert parse_pieces(sse_impl, [stream]) == ([("", "x", None, int("9" * 40))], False)


@pytest.mark.parametrize(
    "stream, truncated",
    [
        (b"", False),
        (b"data: x\n\n", False),
        (b": ping\n\n", False),
        (b"\xef\xbb\xbf", False),
        (b"data: x", True),  # a partial line
        (b"data: x\n", True),  # a block without its blank line
        (b"data: x\r\n\r", False),
        (b": ping\n", True),
        (b"\xef\xbb", True),
        (b"\n\n\n", False),
    ],
)
def test_close_reports_whether_anything_was_pending(
    sse_impl: ModuleType, stream: bytes, truncated: bool
) -> None:
    parser = sse_impl.SSEParser()
    assert parser.truncated is False
    parser.feed(stream)
    assert parser.close() == []
    assert parser.truncated is truncated
    assert parser.close() == []  # again: no change
    assert parser.truncated is truncated


def test_feed_after_close_raises(sse_impl: ModuleType) -> None:
    parser = sse_impl.SSEParser()
    parser.close()
    with pytest.raises(SSEError):
        parser.feed(b"data: x\n\n")


def test_feed_accepts_bytes_like_and_refuses_str(sse_impl: ModuleType) -> None:
    parser = sse_impl.SSEParser()
    assert [e.astuple() for e in parser.feed(bytearray(b"data: a\n\n"))] == [
        ("", "a", None, None)]
    assert [e.astuple() for e in parser.feed(memoryview(b"data: b\n\n"))] == [
        ("", "b", None, None)]
    strided = memoryview(b"dxaxtxax:x xcx\nx\nx")[::2]  # not contiguous
    assert [e.astuple() for e in parser.feed(strided)] == [("", "c", None, None)]
    with pytest.raises(TypeError):
        parser.feed("data: c\n\n")  # type: ignore[arg-type]
    assert sse_impl.encode_event(memoryview(b"a-b")[::2]) == b"data: ab\n\n"


# -- the size limit -------------------------------------------------------------------

@SETTINGS
@given(stream=sse_streams(), limit=st.integers(1, 40), data=st.data())
def test_max_event_bytes_raises_exactly_when_a_block_exceeds_it(
    sse_impl: ModuleType, stream: bytes, limit: int, data: st.DataObject
) -> None:
    pieces = split_at(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    expect_error = max(reference_block_sizes(stream)) > limit

    def run(impl: ModuleType) -> tuple[list[Event], int | None]:
        parser = impl.SSEParser(max_event_bytes=limit)
        events: list[Event] = []
        for i, piece in enumerate(pieces):
            try:
                events += [e.astuple() for e in parser.feed(piece)]
            except SSEError:
                with pytest.raises(SSEError):
                    parser.feed(b"data: more\n\n")  # the parser stays failed
                assert parser.close() == []
                assert parser.truncated is True
                return events, i
        parser.close()
        return events, None

    events, failed_at = run(sse_impl)
    assert (failed_at is not None) == expect_error
    # Which feed raises, and what came before, is the same in both twins.
    assert (events, failed_at) == run(_sse_py)
    if not expect_error:
        assert events == reference_parse(stream)[0]


def test_memory_stays_bounded_against_an_endless_line(sse_impl: ModuleType) -> None:
    parser = sse_impl.SSEParser(max_event_bytes=1 << 20)
    chunk = b"data: " + b"x" * 65536
    with pytest.raises(SSEError):
        for _ in range(100):
            parser.feed(chunk)
    with pytest.raises(SSEError):
        parser.feed(b"\n\n")


def test_the_limit_counts_the_whole_block_not_each_line(sse_impl: ModuleType) -> None:
    parser = sse_impl.SSEParser(max_event_bytes=20)
    assert parser.feed(b"data: 123456789\n\n") != []  # 15 bytes: fine
    assert parser.feed(b"data: 12345\n") == []  # 11 bytes
    with pytest.raises(SSEError):
        parser.feed(b"data: 12345\n")  # 22 in the block


def test_max_event_bytes_must_be_positive(sse_impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        sse_impl.SSEParser(max_event_bytes=0)
    assert sse_impl.SSEParser(max_event_bytes=5).max_event_bytes == 5
    assert sse_impl.SSEParser().max_event_bytes == 16 * 1024 * 1024


# -- events ---------------------------------------------------------------------------

def test_events_are_immutable_values(sse_impl: ModuleType) -> None:
    a = sse_impl.SSEEvent("e", "d", "1", 5)
    b = sse_impl.SSEEvent(event="e", data="d", id="1", retry=5)
    assert a == b and hash(a) == hash(b) and not a != b
    assert a != sse_impl.SSEEvent("e", "d", "1", None)
    assert a != ("e", "d", "1", 5)
    assert a.astuple() == ("e", "d", "1", 5)
    assert (a.event, a.data, a.id, a.retry) == ("e", "d", "1", 5)
    assert repr(a) == "SSEEvent(event='e', data='d', id='1', retry=5)"
    assert sse_impl.SSEEvent().astuple() == ("", "", None, None)
    with pytest.raises(AttributeError):
        a.data = "x"  # type: ignore[misc]


def test_event_fields_are_plain_str(sse_impl: ModuleType) -> None:
    class Text(str):
        pass

    event = sse_impl.SSEEvent(Text("e"), Text("d"), Text("i"))
    assert [type(v) for v in event.astuple()[:3]] == [str, str, str]
    for bad in [{"event": None}, {"data": b"d"}, {"id": 1}]:
        with pytest.raises(TypeError):
            sse_impl.SSEEvent(**bad)


# -- writing --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args, kwargs, wire",
    [
        (("hi",), {}, b"data: hi\n\n"),
        ((b"hi",), {}, b"data: hi\n\n"),
        (("",), {}, b"data: \n\n"),
        (("a\nb\r\nc\rd",), {}, b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
        (("a\n",), {}, b"data: a\ndata: \n\n"),
        (("{}",), {"event": "x", "id": "7", "retry": 1000},
         b"event: x\nid: 7\nretry: 1000\ndata: {}\n\n"),
        (("é",), {"event": ""}, "event: \ndata: é\n\n".encode()),
    ],
)
def test_encode_event_frames_one_event(
    sse_impl: ModuleType, args: tuple, kwargs: dict, wire: bytes
) -> None:
    assert sse_impl.encode_event(*args, **kwargs) == wire


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"event": "a\nb"}, ValueError),
        ({"event": "a\rb"}, ValueError),
        ({"id": "a\r\nb"}, ValueError),
        ({"id": "a\x00b"}, ValueError),
        ({"retry": -1}, ValueError),
        ({"retry": 1.5}, TypeError),
        ({"retry": True}, TypeError),
        ({"event": 5}, TypeError),
        ({"data": 5}, TypeError),
    ],
)
def test_encode_event_refuses_what_cannot_round_trip(
    sse_impl: ModuleType, kwargs: dict, error: type[Exception]
) -> None:
    kwargs = {"data": "x", **kwargs}
    with pytest.raises(error):
        sse_impl.encode_event(**kwargs)


field_texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
    max_size=10,
)


@SETTINGS
@given(
    data=st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",))),
                   st.binary().map(lambda b: b.decode("utf-8", "replace"))),
    event=st.none() | field_texts,
    event_id=st.none() | field_texts,
    retry=st.none() | st.integers(0, 10**12),
)
def test_encode_then_parse_gives_the_same_event(
    sse_impl: ModuleType, data: str, event: str | None, event_id: str | None,
    retry: int | None,
) -> None:
    wire = sse_impl.encode_event(data, event=event, id=event_id, retry=retry)
    assert wire == _sse_py.encode_event(data, event=event, id=event_id, retry=retry)
    normalized = data.replace("\r\n", "\n").replace("\r", "\n")
    assert parse_pieces(sse_impl, [wire]) == (
        [(event or "", normalized, event_id, retry)], False)


def test_encode_comment(sse_impl: ModuleType) -> None:
    assert sse_impl.encode_comment("ping") == b": ping\n\n"
    assert sse_impl.encode_comment() == b": \n\n"
    # a line break cannot end the comment and inject a field
    wire = sse_impl.encode_comment("a\ndata: injected\r\nb")
    assert wire == b": a\n: data: injected\n: b\n\n"
    assert parse_pieces(sse_impl, [wire]) == ([], False)
