"""proxy.sse.UsageTap: SSE pass-through that reads usage and can hide the usage-only chunk."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import UsageTap

USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
DONE = b"data: [DONE]\n\n"


def _event(obj: dict[str, Any], *, compact: bool) -> bytes:
    # Providers differ: OpenAI writes compact JSON, others json.dumps' default ", " / ": ".
    text = json.dumps(obj, separators=(",", ":") if compact else None, ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


def openai_stream(
    contents: list[str], *, null_usage: bool = True, compact: bool = True, usage: dict[str, int] | None = None
) -> tuple[bytes, bytes]:
    """A chat.completion.chunk stream as OpenAI sends it with include_usage; returns (stream, usage event)."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    extra: dict[str, Any] = {"usage": None} if null_usage else {}
    events = [_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], **extra},
                     compact=compact)]  # fmt: skip
    for text in contents:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        events.append(_event({**base, "choices": [choice], **extra}, compact=compact))
    events.append(_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra},
                         compact=compact))  # fmt: skip
    usage_event = _event({**base, "choices": [], "usage": usage or USAGE}, compact=compact)
    return b"".join(events) + usage_event + DONE, usage_event


def run(tap: UsageTap, stream: bytes, cuts: list[int]) -> bytes:
    """Feed `stream` split at `cuts`, then finish; returns everything the client would get."""
    out = []
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        out.append(tap.feed(stream[start:cut]))
        start = cut
    out.append(tap.finish())
    return b"".join(out)


# Content that looks like the things the tap searches for, plus unicode and JSON escapes.
contents = st.lists(
    st.one_of(
        st.text(max_size=30),
        st.sampled_from(['"usage"', "usage: null", '{"error": 1}', "data: [DONE]", "\n\n", "\r\n", "é😀用"]),
    ),
    max_size=8,
)


@st.composite
def stream_and_cuts(draw: st.DrawFn) -> tuple[bytes, bytes, list[int], bool]:
    crlf = draw(st.booleans())
    stream, usage_event = openai_stream(draw(contents), null_usage=draw(st.booleans()), compact=draw(st.booleans()))
    if crlf:
        stream, usage_event = stream.replace(b"\n", b"\r\n"), usage_event.replace(b"\n", b"\r\n")
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12))
    return stream, usage_event, cuts, crlf


class TestSplitAnywhere:
    @settings(deadline=None)  # a loaded CI box must not turn a slow example into a failure
    @given(case=stream_and_cuts())
    def test_dropping_removes_only_the_usage_chunk(self, case: tuple[bytes, bytes, list[int], bool]) -> None:
        """However the stream is cut, the client gets the stream minus the usage chunk, and usage is read."""
        stream, usage_event, cuts, crlf = case
        tap = UsageTap(drop_usage_chunk=True)
        expected = stream.replace(usage_event, b"")
        if crlf:
            expected = expected.replace(b"\r\n", b"\n")
        assert run(tap, stream, cuts) == expected
        assert tap.usage == USAGE
        assert tap.error is None

    @settings(deadline=None)
    @given(case=stream_and_cuts())
    def test_keeping_passes_everything(self, case: tuple[bytes, bytes, list[int], bool]) -> None:
        """However the stream is cut, a client that asked for usage gets every byte, and usage is read."""
        stream, _, cuts, crlf = case
        tap = UsageTap(drop_usage_chunk=False)
        assert run(tap, stream, cuts) == (stream.replace(b"\r\n", b"\n") if crlf else stream)
        assert tap.usage == USAGE

    @settings(deadline=None)
    @given(cuts=st.lists(st.integers(0, 200), max_size=20))
    def test_byte_at_a_time_and_random_cuts_agree(self, cuts: list[int]) -> None:
        """One byte per feed gives the same output as any other split."""
        stream, _ = openai_stream(["Hel", "lo ", "wörld"])
        one_by_one = UsageTap(drop_usage_chunk=True)
        assert run(one_by_one, stream, list(range(len(stream)))) == run(UsageTap(drop_usage_chunk=True), stream, cuts)
        assert one_by_one.usage == USAGE


class TestRelease:
    def test_complete_event_is_released_at_once(self) -> None:
        """An event is passed on as soon as its blank line arrives: the stream is never buffered."""
        tap = UsageTap(drop_usage_chunk=True)
        first = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        assert tap.feed(first + b'data: {"cho') == first
        assert tap.feed(b'ices":[]}\n') == b""
        assert tap.feed(b"\n") == b'data: {"choices":[]}\n\n'

    def test_partial_event_is_held_then_flushed_by_finish(self) -> None:
        """Bytes after the last blank line wait for it, and finish() hands them over at the end."""
        tap = UsageTap(drop_usage_chunk=False)
        assert tap.feed(b"data: [DONE]") == b""
        assert tap.finish() == b"data: [DONE]"
        assert tap.finish() == b""

    def test_done_passes_through(self) -> None:
        """`data: [DONE]` reaches the client in both modes."""
        stream, _ = openai_stream(["hi"])
        for drop in (True, False):
            assert run(UsageTap(drop_usage_chunk=drop), stream, []).endswith(DONE)

    def test_comments_and_event_fields_pass_through(self) -> None:
        """Keep-alive comments and `event:`/`id:` lines are not touched."""
        stream = b': keep-alive\n\nevent: message\nid: 7\ndata: {"choices":[]}\n\n' + DONE
        assert run(UsageTap(drop_usage_chunk=True), stream, [5, 20]) == stream


class TestUsage:
    def test_usage_in_a_content_chunk_is_read_but_kept(self) -> None:
        """Usage riding on a chunk that still has choices is counted and never dropped."""
        event = _event({"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": USAGE}, compact=True)
        tap = UsageTap(drop_usage_chunk=True)
        assert tap.feed(event + DONE) == event + DONE
        assert tap.usage == USAGE

    def test_null_usage_is_not_usage(self) -> None:
        """`"usage": null` on ordinary chunks leaves usage unset."""
        stream = _event({"choices": [{"delta": {"content": "x"}}], "usage": None}, compact=False) + DONE
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, stream, []) == stream
        assert tap.usage is None

    def test_multiline_data_event(self) -> None:
        """A usage chunk whose JSON spans several `data:` lines is still read and dropped."""
        usage_event = b'data: {"choices": [],\ndata: "usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\n'
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, usage_event + DONE, [10]) == DONE
        assert tap.usage == {"prompt_tokens": 3, "completion_tokens": 4}

    def test_last_usage_wins(self) -> None:
        """If usage arrives twice, the later one is the one counted."""
        first = _event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}, compact=True)
        second = _event({"choices": [], "usage": USAGE}, compact=True)
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, first + second + DONE, []) == DONE
        assert tap.usage == USAGE

    def test_non_json_data_passes(self) -> None:
        """A data line that mentions usage but is not JSON is passed on untouched."""
        stream = b'data: "usage" is not json {\n\n' + DONE
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, stream, [3]) == stream
        assert tap.usage is None


class TestCRLF:
    def test_crlf_stream_is_normalised_and_tapped(self) -> None:
        """A CRLF stream is split into events, the usage chunk dropped, and the rest passed as LF."""
        stream, usage_event = openai_stream(["a", "b"])
        crlf = stream.replace(b"\n", b"\r\n")
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, crlf, []) == stream.replace(usage_event, b"")
        assert tap.usage == USAGE

    def test_cut_between_cr_and_lf(self) -> None:
        """A chunk boundary between \\r and \\n of the blank line still ends the event."""
        tap = UsageTap(drop_usage_chunk=False)
        assert tap.feed(b"data: [DONE]\r\n\r") == b""
        assert tap.feed(b"\n") == DONE


class TestErrors:
    def test_in_band_error_is_captured_and_passed(self) -> None:
        """An error event mid-stream is recorded on the tap and still reaches the client."""
        error = {"message": "The server is overloaded", "type": "server_error", "param": None, "code": None}
        stream, _ = openai_stream(["partial"])
        head = stream[: stream.index(b"data: ", 10)]
        error_event = _event({"error": error}, compact=False)
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, head + error_event, [7, len(head) + 3]) == head + error_event
        assert tap.error == error
        assert tap.usage is None

    def test_text_mentioning_error_is_not_an_error(self) -> None:
        """Content containing the word "error" does not set the tap's error."""
        stream = _event({"choices": [{"delta": {"content": '"error": oops'}}], "usage": None}, compact=True)
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, stream, []) == stream
        assert tap.error is None
