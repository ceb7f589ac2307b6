"""The two identifiers the proxy derives with a key: request ids it issues, and user hashes.

Request id (40 hex characters, issued for every request):

    issued_at (4 bytes, unix seconds) | random (8 bytes) | tag (8 bytes)
    tag = blake2b(issued_at | random, key=ABPROXY_SIGNING_KEY, person="abproxy-request")

Feedback names a request by this id. The tag lets any instance tell an id it issued from a
made-up or mistyped one, and the embedded time tells its age, without a lookup: no shared
table to fill on the hot path, and no race with the request's own event, which reaches the
store later. With no key set the tag is a checksum, not a signature (start-up warns).

User hash: blake2b(user id, key=ABPROXY_USER_HASH_KEY), 16 hex characters, so a dictionary of
e-mail addresses cannot reverse the ids in events and the store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from enum import Enum

_REQUEST_PERSON = b"abproxy-request"
_ID_BYTES = 20
_SIGNED_BYTES = 12


def _blake2b_key(secret: str) -> bytes:
    # blake2b keys are at most 64 bytes; longer secrets are folded to fit.
    key = secret.encode()
    return key if len(key) <= 64 else hashlib.sha512(key).digest()


class RequestIdStatus(Enum):
    VALID = "valid"
    UNKNOWN = "unknown"  # not an id this deployment issued
    EXPIRED = "expired"  # issued, but longer ago than feedback accepts


class RequestIds:
    def __init__(self, signing_key: str) -> None:
        self._key = _blake2b_key(signing_key)

    def issue(self, now: float) -> str:
        head = struct.pack(">I", int(now)) + os.urandom(8)
        return (head + self._tag(head)).hex()

    def check(self, request_id: str, now: float, ttl_s: float) -> RequestIdStatus:
        try:
            raw = bytes.fromhex(request_id)
        except ValueError:
            return RequestIdStatus.UNKNOWN
        if len(raw) != _ID_BYTES:
            return RequestIdStatus.UNKNOWN
        head, tag = raw[:_SIGNED_BYTES], raw[_SIGNED_BYTES:]
        if not hmac.compare_digest(tag, self._tag(head)):
            return RequestIdStatus.UNKNOWN
        (issued_at,) = struct.unpack(">I", head[:4])
        if issued_at > now + 300:  # slack for instances whose clocks disagree a little
            return RequestIdStatus.UNKNOWN
        if now - issued_at > ttl_s:
            return RequestIdStatus.EXPIRED
        return RequestIdStatus.VALID

    def _tag(self, head: bytes) -> bytes:
        return hashlib.blake2b(head, digest_size=8, key=self._key, person=_REQUEST_PERSON).digest()


class UserHasher:
    def __init__(self, key: str) -> None:
        self._key = _blake2b_key(key)

    def __call__(self, user_id: str | None) -> str | None:
        if user_id is None:
            return None
        return hashlib.blake2b(user_id.encode(), digest_size=8, key=self._key).hexdigest()

    def prompt(self, data: bytes) -> str:
        """A keyed fingerprint of a prompt: equal prompts match, the text cannot be recovered."""
        return hashlib.blake2b(data, digest_size=8, key=self._key, person=b"abproxy-prompt").hexdigest()
