"""SSEDecoder against hostile framing (openrouter-protocol.md §5) and the SSE encoder."""

from __future__ import annotations

import json
import random

import pytest

from llm_gateway.sse import SSEDecoder, SSEEvent, SSEEventTooLarge, encode_comment, encode_event


def feed_all(parts: list[bytes]) -> tuple[list[SSEEvent], bool]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for part in parts:
        events.extend(decoder.feed(part))
    return events, decoder.finish()


def datas(parts: list[bytes]) -> list[str]:
    return [event.data for event in feed_all(parts)[0]]


def every_split(stream: bytes) -> list[list[bytes]]:
    """The stream cut into two reads at every position, and fed byte by byte."""
    splits = [[stream[:i], stream[i:]] for i in range(len(stream) + 1)]
    splits.append([stream[i:i + 1] for i in range(len(stream))])
    return splits


def test_single_event() -> None:
    events, pending = feed_all([b"data: hello\n\n"])
    assert events == [SSEEvent(data="hello", event="message", id="", retry=None)]
    assert pending is False


def test_comments_before_and_between_events_are_ignored() -> None:
    stream = b": OPENROUTER PROCESSING\n\ndata: a\n\n: keep-alive\n:\ndata: b\n\n"
    assert datas([stream]) == ["a", "b"]


def test_several_events_in_one_write() -> None:
    assert datas([b"data: 1\n\ndata: 2\n\ndata: 3\n\n"]) == ["1", "2", "3"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings_at_every_split(eol: bytes) -> None:
    stream = eol.join([b": c", b"data: {\"x\": 1}", b"", b"data: two", b"", b""])
    for parts in every_split(stream):
        assert datas(parts) == ['{"x": 1}', "two"], parts


def test_crlf_split_across_reads_is_one_line_end() -> None:
    # "\r" ends the first read: the "\n" that follows must not count as a blank line.
    assert datas([b"data: a\r", b"\ndata: b\r\n\r\n"]) == ["a\nb"]


def test_lone_cr_at_end_of_read_followed_by_data() -> None:
    # A CR-only stream: the next read starts with data, not LF.
    assert datas([b"data: a\r", b"data: b\r", b"\r"]) == ["a\nb"]


def test_mixed_line_endings() -> None:
    assert datas([b"data: a\r\ndata: b\rdata: c\n\r\n"]) == ["a\nb\nc"]


def test_split_mid_utf8_code_point() -> None:
    text = "héllo → 世界 🎉"
    stream = f'data: {{"content": "{text}"}}\n\n'.encode()
    for parts in every_split(stream):
        events = feed_all(parts)[0]
        assert [json.loads(e.data)["content"] for e in events] == [text]


def test_u2028_and_other_unicode_breaks_do_not_split_lines() -> None:
    # str.splitlines() (and httpx aiter_lines) would cut all of these.
    payload = json.dumps({"c": "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"}, ensure_ascii=False)
    assert "\u2028" in payload
    for parts in every_split(f"data: {payload}\n\n".encode()):
        events = feed_all(parts)[0]
        assert len(events) == 1
        assert json.loads(events[0].data) == {"c": "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg"}


def test_multiline_data_is_joined_with_newline() -> None:
    stream = b'data: {"a":\ndata: 1,\ndata:  "b": 2}\n\n'
    events = feed_all([stream])[0]
    assert events[0].data == '{"a":\n1,\n "b": 2}'
    assert json.loads(events[0].data) == {"a": 1, "b": 2}


def test_data_without_space_and_only_one_space_stripped() -> None:
    assert datas([b"data:x\n\n", b"data:  y\n\n", b"data:\tz\n\n"]) == ["x", " y", "\tz"]


def test_field_without_colon_and_unknown_fields() -> None:
    # "data" alone is a data line with an empty value; unknown fields are ignored.
    events = feed_all([b"foo: bar\ndata\ndata: x\nbaz\n\n"])[0]
    assert [e.data for e in events] == ["\nx"]


def test_event_id_and_retry_fields() -> None:
    stream = (b"event: chunk\nid: 7\nretry: 1500\ndata: a\n\n"
              b"data: b\n\n"  # event type resets; id persists
              b"id: 8\x009\nretry: 15x\ndata: c\n\n")  # NUL id and non-digit retry ignored
    events = feed_all([stream])[0]
    assert [(e.event, e.id, e.data, e.retry) for e in events] == [
        ("chunk", "7", "a", 1500), ("message", "7", "b", 1500), ("message", "7", "c", 1500)]


def test_empty_data_and_blank_lines_dispatch_nothing() -> None:
    assert datas([b"\n\n\r\n\r\r", b"event: x\n\n", b"id: 3\n\n", b": c\n\n"]) == []


def test_leading_bom_is_stripped_even_when_split() -> None:
    assert datas([b"\xef\xbb", b"\xbfdata: a\n\n"]) == ["a"]


def test_finish_reports_an_unterminated_event() -> None:
    assert feed_all([b"data: a\n\ndata: [DONE]"]) == ([SSEEvent(data="a")], True)
    assert feed_all([b"data: a\n\ndata: b\n"])[1] is True  # line ended, event not dispatched
    assert feed_all([b"data: a\n\n"])[1] is False
    assert feed_all([b"data: a\n\n: trailing comment"])[1] is False


def test_random_splits_of_a_hostile_stream_match_one_read() -> None:
    stream = (
        b"\xef\xbb\xbf: OPENROUTER PROCESSING\r\n\r\n"
        + 'data: {"c": "h\u00e9\u2028\U0001f389"}\r\n\r\n'.encode()
        + b"data:{\"c\":\r\ndata: \"x\"}\r\r"
        + b"unknown: field\nevent: e\ndata: y\n\n"
        + b"data: [DONE]\n\n"
    )
    expected = feed_all([stream])
    assert [e.data for e in expected[0]] == ['{"c": "h\u00e9\u2028\U0001f389"}', '{"c":\n"x"}', "y", "[DONE]"]
    rng = random.Random(2028)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 12)))
        parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert feed_all(parts) == expected


# -- encoder ---------------------------------------------------------------------------------


def test_encode_event_format() -> None:
    frame = encode_event("chunk", {"delta": "Hé\n"}, 3)
    assert frame == 'id: 3\nevent: chunk\ndata: {"delta": "Hé\\n"}\n\n'.encode()


def test_encode_event_round_trips_through_the_decoder() -> None:
    payload = {"delta": "line1\nline2\r\u2028 ✓", "n": 1}
    events = feed_all([encode_event("chunk", payload, 42)])[0]
    assert len(events) == 1
    assert (events[0].event, events[0].id) == ("chunk", "42")
    assert json.loads(events[0].data) == payload


def test_encode_event_rejects_line_breaks_in_the_name() -> None:
    with pytest.raises(ValueError):
        encode_event("a\nb", {}, 1)


def test_encode_comment() -> None:
    assert encode_comment("ping") == b": ping\n\n"
    assert encode_comment() == b": ping\n\n"
    assert feed_all([encode_comment("a\nb")]) == ([], False)


def test_lf_only_reads_decode_as_the_general_path_does() -> None:
    # A read without CR takes a faster path (split once); one with a CR the line-by-line
    # one. Any stream, cut anywhere, must give the same events either way.
    rng = random.Random(2029)
    pieces = [b"data: a", b"data:b", b"data:  two spaces", b": comment", b"", b"event: e", b"id: 7",
              b"id: x\x00", b"retry: 15", b"data", b"unknown: f", b"data: \xe4\xb8\x96\xe7",
              b"\xef\xbb\xbfdata: bom", b"data: [DONE]"]
    for _ in range(300):
        stream = b"\n".join(rng.choice(pieces) for _ in range(rng.randint(1, 25))) + b"\n" * rng.randint(0, 2)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8))))
        parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        # The same stream with CRLF, cut at the same places: its reads have CRs (the general
        # path), and must give the same events, and refuse an event too large at the same read.
        crlf = stream.replace(b"\n", b"\r\n")
        at = [cut + stream[:cut].count(b"\n") for cut in cuts]
        general = [crlf[a:b] for a, b in zip([0, *at], [*at, len(crlf)], strict=True)]
        fast_decoder, general_decoder = SSEDecoder(max_event_bytes=64), SSEDecoder(max_event_bytes=64)

        def run(decoder: SSEDecoder, reads: list[bytes]) -> tuple[list[SSEEvent], bool, bool]:
            events: list[SSEEvent] = []
            try:
                for read in reads:
                    events.extend(decoder.feed(read))
            except SSEEventTooLarge as exc:
                return events + exc.events, True, False
            return events, False, decoder.finish()

        assert run(fast_decoder, parts) == run(general_decoder, general), stream
