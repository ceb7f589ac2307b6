"""Evaluators' personal links: an unguessable token per evaluator, of which the store keeps only the sha256.

A token is shown once, when it is made; a leaked database does not open anyone's study. A new link
replaces the stored hash, which is what kills the old link; revoking marks the row, keeping the votes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from proxy.store.schema import evaluators

_TOKEN_MAX = 256  # a token is 32 characters; anything much longer is not one


@dataclass(frozen=True, slots=True)
class Evaluator:
    study: str
    name: str


def evaluator_for(engine: Engine, token: str) -> Evaluator | None:
    """The evaluator a link's token belongs to; None when unknown or revoked."""
    if not token or len(token) > _TOKEN_MAX:
        return None
    wanted = hash_token(token)
    links = evaluators.c
    with engine.connect() as conn:
        row = conn.execute(
            select(links.study, links.name, links.token_hash, links.revoked_at).where(links.token_hash == wanted)
        ).first()
    # The lookup is by an index; comparing the hashes again in constant time keeps a timing side channel
    # from telling how much of a guessed hash matched, whatever the database does.
    if row is None or not hmac.compare_digest(row.token_hash, wanted) or row.revoked_at is not None:
        return None
    return Evaluator(study=row.study, name=row.name)


def revoke(engine: Engine, study: str, evaluator: str, *, now: float) -> bool:
    """Close an evaluator's link; True when it was open (False: no such evaluator, or already revoked)."""
    with engine.begin() as conn:
        result = conn.execute(
            update(evaluators)
            .where(evaluators.c.study == study, evaluators.c.name == evaluator)
            .where(evaluators.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    return result.rowcount > 0


def new_link(engine: Engine, study: str, evaluator: str) -> str:
    """A fresh token for the evaluator, which also reopens a revoked link; KeyError if no such evaluator."""
    token = new_token()
    with engine.begin() as conn:
        result = conn.execute(
            update(evaluators)
            .where(evaluators.c.study == study, evaluators.c.name == evaluator)
            .values(token_hash=hash_token(token), revoked_at=None)
        )
    if result.rowcount == 0:
        raise KeyError(f"no evaluator {evaluator!r} in study {study!r}")
    return token


def new_token() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits, 32 URL-safe characters


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
