"""Write tests/vectors/assignment.json: (salt, user, bucket) triples for the assignment contract.

    python -m tests.vectors.make_assignment_vectors

The buckets are computed with the pure-Python MurmurHash3 x86_32 below, written from the
reference algorithm (Austin Appleby's MurmurHash3.cpp), not with the `mmh3` package the proxy
uses. If the vectors were produced by the same library they test, they would only restate it:
a wrong seed, a signed/unsigned mix-up or a different string encoding in the proxy would be
copied straight into the file. Two independent implementations agreeing is the evidence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("assignment.json")
BUCKETS = 10_000

_MASK = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _mix_k(k: int) -> int:
    k = (k * _C1) & _MASK
    k = _rotl32(k, 15)
    return (k * _C2) & _MASK


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 of `data` as an unsigned 32-bit integer."""
    h = seed & _MASK
    n_blocks = len(data) // 4
    for i in range(n_blocks):
        h ^= _mix_k(int.from_bytes(data[4 * i : 4 * i + 4], "little"))
        h = _rotl32(h, 13)
        h = (h * 5 + 0xE6546B64) & _MASK
    tail = data[4 * n_blocks :]
    if tail:
        h ^= _mix_k(int.from_bytes(tail, "little"))  # the switch-fallthrough over 1..3 tail bytes
    h ^= len(data)
    # fmix32: the finaliser that spreads every input bit over the output.
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h


def reference_bucket(salt: str, user_id: str) -> int:
    """The spec's formula: mmh3.hash(f"{salt}:{user_id}", seed=0, signed=False) % 10000 (UTF-8 bytes)."""
    return murmur3_x86_32(f"{salt}:{user_id}".encode(), seed=0) % BUCKETS


SALTS = ["sales-v2", "sales-companion", "exp", "", "ünïcödé-salt", "a:b"]

USERS = [
    # ascii: the common case, including ids of every tail length 0..3 mod 4
    "alice", "bob", "carol", "dave", "user-1", "user-2", "user-42", "12345", "0", "00",
    "a", "ab", "abc", "abcd", "abcde", "UPPER", "mixed_Case-09", "alice@example.com",
    "550e8400-e29b-41d4-a716-446655440000", "with space", "tab\there", "quote\"d", "back\\slash",
    # empty-ish: the proxy never hashes a missing id, but "" and blanks are valid strings
    "", " ", "  ", "\n", "-",
    # ':' inside the id: the join is plain concatenation, never escaped
    ":", "::", "a:b", ":leading", "trailing:", "org:42:user:7", "sales-v2:alice",
    # unicode: accents, CJK, emoji (4-byte UTF-8), combining marks, RTL
    "josé", "José", "zoë", "Ærøskøbing", "müller", "straße", "naïve", "e\u0301", "ñ",
    "用户", "山田太郎", "사용자", "ユーザー", "пользователь", "χρήστης", "مستخدم", "משתמש",
    "😀", "👩‍💻", "🇫🇷", "user-🚀-1", "∑∫√", "\u00a0nbsp",
    # long ids
    "x" * 64, "y" * 255, "long-" + "0123456789" * 50, "長" * 100, "🙂" * 40,
]  # fmt: skip


def vectors() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # Every user under the production salt, then a rotating subset under the others, so the
    # file stays ~200 rows while each salt meets ascii, unicode, ':' and long ids.
    for user in USERS:
        rows.append({"salt": "sales-v2", "user": user})
    for i, salt in enumerate(SALTS[1:]):
        for user in USERS[i % 2 :: 2]:
            rows.append({"salt": salt, "user": user})
    for row in rows:
        row["bucket"] = reference_bucket(row["salt"], row["user"])
    return rows


def render() -> str:
    # One vector a line: readable in a diff, and still plain JSON for any other language.
    return "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in vectors()) + "\n]\n"


if __name__ == "__main__":
    PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {len(vectors())} vectors to {PATH}")
