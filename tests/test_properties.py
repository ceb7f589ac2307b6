"""Properties, with hypothesis, of what hostile or arbitrary input reaches first: the bucketing contract and the
/v1 request parser (`proxy.routes_openai._parse_body`, `_read_headers`, `_body_user`).

tests/test_assignment.py already checks the bucket's range and its equality with an independent MurmurHash3
for surrogate-free ids, and monotonicity for the one salt "sales-v2" and two-decimal percents; here: any
unicode (lone surrogates included), any salt, any float percent, the formula typed out, and the same
buckets in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import mmh3
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.assignment import BUCKETS, bucket, choose_variant, threshold
from proxy.errors import InvalidRequest
from proxy.routes_openai import _body_user, _parse_body, _read_headers
from proxy.upstream import DROPPED_REQUEST_HEADERS

FAST = settings(max_examples=200, deadline=None)

# Every code point, lone surrogates included: a header is bytes, but a mis-decoded argv or a Python
# caller can still hand `bucket` one.
any_text = st.text(max_size=60)
clean_text = st.text(st.characters(codec="utf-8"), max_size=60)  # no lone surrogate: JSON cannot carry one
percents = st.floats(0, 100, allow_nan=False)


# -- bucketing ---------------------------------------------------------------------------------------------------


class TestBucketing:
    @FAST
    @given(salt=any_text, user=any_text)
    def test_any_unicode_gets_a_bucket(self, salt: str, user: str) -> None:
        """Any salt and user id, lone surrogates included: a bucket in 0..9999, the same every time."""
        first = bucket(salt, user)
        assert isinstance(first, int) and 0 <= first < BUCKETS
        assert bucket(salt, user) == first

    @FAST
    @given(salt=clean_text, user=clean_text)
    def test_is_the_public_formula(self, salt: str, user: str) -> None:
        """bucket == mmh3.hash(f"{salt}:{user}", seed=0, signed=False) % 10000, as the README states it."""
        assert bucket(salt, user) == mmh3.hash(f"{salt}:{user}", seed=0, signed=False) % 10_000

    @FAST
    @given(salt=any_text, user=any_text, p1=percents, p2=percents)
    def test_raising_the_percent_never_moves_a_treated_user_back(
        self, salt: str, user: str, p1: float, p2: float
    ) -> None:
        """For any salt and any float percents low <= high: treatment at low implies treatment at high."""
        low, high = sorted((p1, p2))
        b = bucket(salt, user)
        assert 0 <= threshold(low) <= threshold(high) <= BUCKETS
        if choose_variant(b, threshold(low)) == "treatment":
            assert choose_variant(b, threshold(high)) == "treatment"

    @settings(max_examples=3, deadline=None)
    @given(pairs=st.lists(st.tuples(clean_text, clean_text), min_size=50, max_size=50))
    def test_same_buckets_in_a_fresh_interpreter(self, pairs: list[tuple[str, str]]) -> None:
        """Another process (another PYTHONHASHSEED) computes the same buckets: nothing depends on hash()."""
        code = ("import json, sys; from proxy.assignment import bucket; "
                "print(json.dumps([bucket(s, u) for s, u in json.load(sys.stdin)]))")  # fmt: skip
        env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", code], input=json.dumps(pairs), capture_output=True, text=True,
                              env=env, timeout=60, check=True)  # fmt: skip
        assert json.loads(done.stdout) == [bucket(s, u) for s, u in pairs]


# -- the request body ----------------------------------------------------------------------------------------------

# JSON values orjson gives back unchanged: integers within 64 bits (larger ones come back as floats),
# finite floats, strings without lone surrogates.
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | clean_text
)  # fmt: skip
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(clean_text, inner, max_size=5),
    max_leaves=30,
)  # fmt: skip
json_objects = st.dictionaries(clean_text, json_values, max_size=8)


def nested(depth: int, opener: bytes, closer: bytes) -> bytes:
    return opener * depth + b"1" + closer * depth


hostile_bodies = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=40).map(lambda b: b'{"model": "' + b + b'"}'),  # invalid UTF-8 inside a string
    st.integers(1, 3000).map(lambda d: nested(d, b"[", b"]")),
    st.integers(1, 3000).map(lambda d: nested(d, b'{"a":', b"}")),
    st.integers(1, 3000).map(lambda d: b'{"a": [' * d + b"]}" * d),  # unbalanced
    st.integers(1, 5000).map(lambda n: b'{"n": 1' + b"0" * n + b"}"),  # huge integers
    st.integers(-5000, 5000).map(lambda e: b'{"n": 1.5e' + str(e).encode() + b"}"),  # huge or tiny exponents
    st.sampled_from([b'{"n": NaN}', b'{"n": Infinity}', b'{"n": -Infinity}', b'{"s": "\\ud800"}', b"\xef\xbb\xbf{}",
                     b"", b"null", b"[]", b'"x"', b"{}{}", b'{"a":1,"a":2}', b"\x00", b'{"a":1}\x00']),
)  # fmt: skip


class TestParseBody:
    @FAST
    @given(raw=hostile_bodies)
    def test_only_invalid_request_escapes(self, raw: bytes) -> None:
        """Any bytes (invalid UTF-8, 3,000-deep nesting, 5,000-digit numbers, NaN): a dict, or InvalidRequest
        with a 400 and a code; never another exception."""
        try:
            parsed = _parse_body(raw)
        except InvalidRequest as exc:
            assert exc.status_code == 400 and exc.code in ("invalid_json", "invalid_body")
        else:
            assert isinstance(parsed, dict)

    @FAST
    @given(body=json_objects, ascii_only=st.booleans())
    def test_an_object_comes_back_unchanged(self, body: dict[str, Any], ascii_only: bool) -> None:
        """A JSON object, however it is encoded (escaped or raw UTF-8), parses to the same dict."""
        assert _parse_body(json.dumps(body, ensure_ascii=ascii_only).encode()) == body

    @FAST
    @given(value=json_values.filter(lambda v: not isinstance(v, dict)))
    def test_anything_but_an_object_is_refused(self, value: Any) -> None:
        """A valid JSON array, string, number or null is a 400 invalid_body."""
        try:
            _parse_body(json.dumps(value).encode())
        except InvalidRequest as exc:
            assert exc.code == "invalid_body"
        else:
            raise AssertionError(f"{value!r} was accepted as a request body")


# -- the request headers ---------------------------------------------------------------------------------------------

# ASGI servers hand over header names lowercased (uvicorn's h11 and httptools both do), as HTTP tokens.
TOKEN = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~"
CREDENTIALS = sorted(DROPPED_REQUEST_HEADERS)
names = st.one_of(
    st.sampled_from(CREDENTIALS),
    st.sampled_from(["x-user-id", "x-episode-id", "x-client-request-id", "x-request-id", "openai-beta", "x-trace"]),
    st.text(TOKEN, min_size=1, max_size=20),
).map(str.encode)
values = st.one_of(st.binary(max_size=60), clean_text.map(lambda t: t.encode()))
header_lists = st.lists(st.tuples(names, values), max_size=12)


def options_of(raw: list[tuple[bytes, bytes]]) -> set[str]:
    listed = ",".join(value.decode("latin-1") for name, value in raw if name == b"connection")
    return {option.strip().lower() for option in listed.split(",")}


class TestReadHeaders:
    @FAST
    @given(raw=st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=60)), max_size=12))
    def test_arbitrary_bytes_never_raise(self, raw: list[tuple[bytes, bytes]]) -> None:
        """Any header names and values, invalid UTF-8 included: parsed, every forwarded item a str pair."""
        headers = _read_headers(raw)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in headers.forward.items())

    @FAST
    @given(raw=header_lists, named=st.lists(names, max_size=4), upper=st.booleans())
    def test_credentials_and_hop_by_hop_never_forwarded(
        self, raw: list[tuple[bytes, bytes]], named: list[bytes], upper: bool
    ) -> None:
        """authorization, api-key, x-api-key, cookie, proxy-authorization, connection... and every header a
        Connection header names (in any case, with spaces) stay here; every other header goes on, last value kept."""
        listed = b" , ".join(n.upper() if upper else n for n in named)
        raw = [*raw, (b"connection", listed)] if named else raw
        headers = _read_headers(raw)
        forwarded = set(headers.forward)
        assert not forwarded & DROPPED_REQUEST_HEADERS
        assert not forwarded & options_of(raw)
        for key, value in headers.forward.items():
            assert value == [v for n, v in raw if n == key.encode("latin-1")][-1].decode("latin-1")
        kept = {n.decode() for n, _ in raw} - DROPPED_REQUEST_HEADERS - options_of(raw)
        kept -= {"x-client-request-id", "x-request-id", "x-user-id", "x-episode-id"}
        assert forwarded == kept
        authorization = [v for n, v in raw if n == b"authorization"]
        assert headers.authorization == (authorization[-1].decode("latin-1") if authorization else None)

    @FAST
    @given(value=values)
    def test_user_id_is_utf8(self, value: bytes) -> None:
        """X-User-Id is read as UTF-8 (the bytes the bucket hashes), latin-1 only when not UTF-8; empty is none."""
        user_id = _read_headers([(b"x-user-id", value)]).user_id
        try:
            expected = value.decode("utf-8")
        except UnicodeDecodeError:
            expected = value.decode("latin-1")
        assert user_id == (expected or None)
        if user_id is not None:
            assert 0 <= bucket("salt", user_id) < BUCKETS


class TestBodyUser:
    @FAST
    @given(body=json_objects, user=json_values, safety=json_values, which=st.sampled_from(["both", "user", "safety"]))
    def test_user_then_safety_identifier(self, body: dict[str, Any], user: Any, safety: Any, which: str) -> None:
        """body "user" if a non-empty string, else "safety_identifier" if one, else None; never raises."""
        body = {k: v for k, v in body.items() if k not in ("user", "safety_identifier")}
        if which in ("both", "user"):
            body["user"] = user
        if which in ("both", "safety"):
            body["safety_identifier"] = safety
        found = _body_user(body)
        candidates = [body.get("user"), body.get("safety_identifier")]
        expected = next((c for c in candidates if isinstance(c, str) and c), None)
        assert found == expected

    @FAST
    @given(user=clean_text.filter(bool), safety=clean_text)
    def test_user_wins_over_safety_identifier(self, user: str, safety: str) -> None:
        """A non-empty "user" is the id, whatever "safety_identifier" says."""
        assert _body_user({"user": user, "safety_identifier": safety}) == user
