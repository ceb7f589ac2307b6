"""proxy.assignment: the public bucketing contract, its vectors, its properties and its spread."""

from __future__ import annotations

import json
import math

import httpx
import mmh3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.assignment import BUCKETS, bucket, choose_variant, threshold
from tests.harness import ProxyServer
from tests.vectors import make_assignment_vectors as vectors_script
from tests.vectors.make_assignment_vectors import murmur3_x86_32, reference_bucket

VECTORS = json.loads(vectors_script.PATH.read_text(encoding="utf-8"))

# Lone surrogates cannot reach `bucket`: JSON bodies reject them and headers are bytes.
ids = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)
two_decimal_percents = st.integers(0, 10_000).map(lambda hundredths: hundredths / 100)

N_USERS = 20_000
SIGMAS = 4.5


def _within_binomial(hits: int, n: int, p: float) -> bool:
    sigma = math.sqrt(p * (1 - p) / n)
    return abs(hits / n - p) <= SIGMAS * sigma


class TestVectors:
    def test_file_has_the_promised_coverage(self) -> None:
        """The shipped vectors cover ascii, unicode, ':' in ids, empty and long ids, several salts."""
        users = [v["user"] for v in VECTORS]
        assert 180 <= len(VECTORS) <= 260
        assert "" in users
        assert any(":" in u for u in users)
        assert any(len(u) >= 200 for u in users)
        assert any(any(ord(c) > 0xFFFF for c in u) for u in users)  # emoji: 4-byte UTF-8
        assert any(any("\u4e00" <= c <= "\u9fff" for c in u) for u in users)  # CJK
        assert any("é" in u for u in users)
        assert len({v["salt"] for v in VECTORS}) >= 4

    def test_file_is_what_the_script_generates(self) -> None:
        """assignment.json is current: regenerating it from the reference changes nothing."""
        assert vectors_script.PATH.read_text(encoding="utf-8") == vectors_script.render()

    @pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['salt']}:{v['user']}"[:40])
    def test_proxy_bucket_matches_vector(self, vector: dict[str, object]) -> None:
        """proxy.assignment.bucket reproduces every shipped (salt, user, bucket) vector."""
        assert bucket(str(vector["salt"]), str(vector["user"])) == vector["bucket"]


class TestReferenceHash:
    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            # Widely published MurmurHash3_x86_32 answers, seed 0.
            (b"", 0),
            (b"\x00\x00\x00\x00", 0x2362F9DE),
            (b"\xff\xff\xff\xff", 0x76293B50),
            (b"\x21\x43\x65\x87", 0xF55B516B),
            (b"\x21\x43\x65", 0x7E4A8634),  # tails of 3, 2 and 1 bytes
            (b"\x21\x43", 0xA0F7B07A),
            (b"\x21", 0x72661CF4),
            (b"abc", 0xB3DD93FA),
            (b"Hello, world!", 0xC0363E43),
            (b"The quick brown fox jumps over the lazy dog", 0x2E4FF723),
        ],
    )
    def test_known_answers(self, data: bytes, expected: int) -> None:
        """The independent pure-Python MurmurHash3 gives the published answers."""
        assert murmur3_x86_32(data) == expected

    @given(salt=ids, user=ids)
    def test_agrees_with_mmh3_on_the_spec_formula(self, salt: str, user: str) -> None:
        """The reference equals mmh3.hash(f"{salt}:{user_id}", seed=0, signed=False) % 10000."""
        spec = mmh3.hash(f"{salt}:{user}", seed=0, signed=False) % 10_000
        assert reference_bucket(salt, user) == spec

    @given(data=st.binary(max_size=64), seed=st.integers(0, 2**32 - 1))
    def test_agrees_with_mmh3_on_bytes_and_seeds(self, data: bytes, seed: int) -> None:
        """The reference equals mmh3 for any bytes and seed, every tail length included."""
        assert murmur3_x86_32(data, seed) == mmh3.hash(data, seed=seed, signed=False)


class TestBucket:
    @given(salt=ids, user=ids)
    def test_in_range(self, salt: str, user: str) -> None:
        """A bucket is always in 0..9999."""
        assert 0 <= bucket(salt, user) < BUCKETS == 10_000

    @given(salt=ids, user=ids)
    def test_matches_reference(self, salt: str, user: str) -> None:
        """The proxy's bucket equals the independent reference for any salt and user."""
        assert bucket(salt, user) == reference_bucket(salt, user)


class TestThreshold:
    def test_end_points_and_smallest_step(self) -> None:
        """0 % is no bucket, 100 % is all 10,000, and 0.01 % is exactly one bucket."""
        assert threshold(0) == 0
        assert threshold(100) == 10_000
        assert threshold(0.01) == 1
        assert threshold(99.99) == 9_999

    def test_every_two_decimal_percent_is_exact(self) -> None:
        """Each of the 10,001 two-decimal percents maps to its own bucket count (no float drift)."""
        assert [threshold(k / 100) for k in range(10_001)] == list(range(10_001))


class TestChooseVariant:
    def test_boundary(self) -> None:
        """bucket == threshold is control; bucket == threshold - 1 is treatment."""
        assert choose_variant(2_500, threshold(25)) == "control"
        assert choose_variant(2_499, threshold(25)) == "treatment"
        assert choose_variant(0, threshold(0.01)) == "treatment"
        assert choose_variant(1, threshold(0.01)) == "control"

    def test_extremes(self) -> None:
        """At 0 % every bucket is control; at 100 % every bucket is treatment."""
        assert {choose_variant(b, threshold(0)) for b in range(BUCKETS)} == {"control"}
        assert {choose_variant(b, threshold(100)) for b in range(BUCKETS)} == {"treatment"}

    @given(user=ids, p1=two_decimal_percents, p2=two_decimal_percents)
    def test_raising_never_moves_treatment_back(self, user: str, p1: float, p2: float) -> None:
        """Treatment at p implies treatment at any higher p (raising the rollout only adds users)."""
        low, high = sorted((p1, p2))
        b = bucket("sales-v2", user)
        if choose_variant(b, threshold(low)) == "treatment":
            assert choose_variant(b, threshold(high)) == "treatment"

    @given(user=ids, p1=two_decimal_percents, p2=two_decimal_percents)
    def test_lowering_never_moves_control_to_treatment(self, user: str, p1: float, p2: float) -> None:
        """Control at p implies control at any lower p (lowering the rollout only removes users)."""
        low, high = sorted((p1, p2))
        b = bucket("sales-v2", user)
        if choose_variant(b, threshold(high)) == "control":
            assert choose_variant(b, threshold(low)) == "control"

    @given(b=st.integers(0, BUCKETS - 1), percent=two_decimal_percents)
    def test_rule_is_bucket_below_round_percent_times_100(self, b: int, percent: float) -> None:
        """treatment iff bucket < round(percent * 100), the spec's words."""
        expected = "treatment" if b < round(percent * 100) else "control"
        assert choose_variant(b, threshold(percent)) == expected


@pytest.fixture(scope="module")
def buckets() -> list[int]:
    return [bucket("sales-v2", f"user-{i}") for i in range(N_USERS)]


class TestDistribution:
    @pytest.mark.parametrize("percent", [0.5, 1, 10, 25, 50, 90])
    def test_treated_share_is_the_percent(self, buckets: list[int], percent: float) -> None:
        """Over 20,000 users the treated share is within 4.5 binomial sigmas of the percent."""
        cut = threshold(percent)
        treated = sum(b < cut for b in buckets)
        assert _within_binomial(treated, N_USERS, percent / 100), treated

    def test_buckets_are_spread_evenly(self, buckets: list[int]) -> None:
        """Each tenth of the bucket range holds about a tenth of the users."""
        counts = [0] * 10
        for b in buckets:
            counts[b // 1_000] += 1
        assert all(_within_binomial(c, N_USERS, 0.1) for c in counts), counts

    def test_salts_assign_independently(self, buckets: list[int]) -> None:
        """Treated at 50 % under one salt says nothing about another: both-treated share is ~25 %."""
        other = [bucket("other-experiment", f"user-{i}") for i in range(N_USERS)]
        cut = threshold(50)
        both = sum(a < cut and b < cut for a, b in zip(buckets, other, strict=True))
        assert _within_binomial(both, N_USERS, 0.25), both
        assert sum(a == b for a, b in zip(buckets, other, strict=True)) < 20  # ~2 expected by chance

    def test_salt_is_part_of_the_key(self) -> None:
        """The same user lands in different buckets under different salts (the salt reshuffles)."""
        moved = sum(bucket("a", f"u{i}") != bucket("b", f"u{i}") for i in range(1_000))
        assert moved > 990


class TestThroughTheProxy:
    def test_header_and_body_ids_get_the_bucket_anyone_can_compute(self, proxy: ProxyServer) -> None:
        """A non-ASCII user id routes by the spec's bucket whether sent in X-User-Id or in `user`."""
        proxy.set_percent(50)
        cut = threshold(50)
        # One user on each side of the cut, so a wrongly decoded id would show up as a flip.
        users = ["josé-1", "josé-2", "josé-3", "josé-4", "josé-5", "josé-6", "josé-7", "josé-8"]
        sides = {choose_variant(bucket("sales-v2", u), cut) for u in users}
        assert sides == {"control", "treatment"}
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for user in users:
                expected = choose_variant(bucket("sales-v2", user), cut)
                body = {"model": "sales-companion", "messages": [{"role": "user", "content": "hi"}]}
                by_header = client.post("/v1/chat/completions", json=body, headers={"X-User-Id": user.encode()})
                by_body = client.post("/v1/chat/completions", json={**body, "user": user})
                assert by_body.headers["x-abproxy-variant"] == expected, user
                assert by_header.headers["x-abproxy-variant"] == expected, user
