"""Scoring one answer against the expected one: exact match, format, similarity.

Normalisation, applied to both texts before exact match and similarity: Unicode NFC (the same
characters typed or copied differently compare equal), surrounding whitespace stripped, and with
`casefold` the case folded (`str.casefold`, which also folds "ß" to "ss"). Nothing else: inner
whitespace, punctuation and line order count, because a format is part of the answer.

Similarity is `difflib.SequenceMatcher(None, expected, prediction).ratio()` on the normalised texts, the
reference figure of the practice. rapidfuzz's `fuzz.ratio` is faster but is the Indel distance
(2·LCS / total length), which differs from Ratcliff/Obershelp whenever its greedy longest-block matching
misses the LCS, so it is not used: the figure must be the reference's.
"""

from __future__ import annotations

import difflib
import unicodedata
from dataclasses import dataclass

from proxy.offline_eval.checks import FormatChecks


@dataclass(frozen=True, slots=True)
class Score:
    exact: bool
    format_ok: bool | None  # None when no format check is declared
    format_failures: list[str]  # names of the failed checks
    similarity: float  # 0..1


def normalise(text: str, *, casefold: bool = False) -> str:
    text = unicodedata.normalize("NFC", text).strip()
    return text.casefold() if casefold else text


def similarity(expected: str, prediction: str) -> float:
    # autojunk stays on, as in the reference call: the figure must be the one the practice quotes.
    return difflib.SequenceMatcher(None, expected, prediction).ratio()


def score(prediction: str, expected: str, *, checks: FormatChecks | None, casefold: bool = False) -> Score:
    got, want = normalise(prediction, casefold=casefold), normalise(expected, casefold=casefold)
    failures = checks.failures(prediction) if checks is not None else []
    return Score(exact=got == want, format_ok=None if checks is None else not failures,
                 format_failures=failures, similarity=similarity(want, got))  # fmt: skip
