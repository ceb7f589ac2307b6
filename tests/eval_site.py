"""A store with blind comparisons and studies in it, for the /eval page tests (httpx and the browser).

The model names are distinctive strings, so a blindness check can search every byte an evaluator
receives for them without tripping over ordinary words.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from proxy.humaneval import studies
from proxy.humaneval.ratings import Vote
from proxy.humaneval.rubric import Criterion, Rubric
from proxy.store.db import engine_for, migrate
from proxy.store.schema import comparisons
from tests.harness import MockUpstream, ProxyServer, proxy_config

MODELS = ("orca-base-7b", "sales-ft-v2")
RUBRIC = Rubric(
    (
        Criterion("accuracy", "preference", "Which answer gets the facts right?"),
        Criterion("company_voice", "score", "Does it sound like us: warm, brief, no jargon?"),
    )
)

# (prompt, answer of MODELS[0], answer of MODELS[1]): realistic enough for the README's screenshots.
PAIRS: list[tuple[str | list[dict[str, str]], str, str]] = [
    (
        [
            {"role": "system", "content": "You are the sales team's writing assistant. Be concise."},
            {"role": "user", "content": "The customer says our price is 20% too high. Reply in three sentences."},
        ],
        "I understand the price feels high. Our plan includes onboarding and support that others charge extra "
        "for. Could we walk through which features matter most to you?",
        "Thanks for being upfront about the budget, Dana.\n\nMost teams your size recover the difference within "
        "a quarter through the hours saved on reporting. If it helps, I can put together a side-by-side of your "
        "current costs and ours before Thursday's call.",
    ),
    (
        "Draft a two-line follow-up to a prospect who went quiet after the demo.",
        "Hi Sam, just checking in after the demo. Let me know if you have any questions.",
        "Hi Sam, great to walk your team through the dashboard last week.\nWould a 15-minute call on Tuesday "
        "help settle the open questions on data import?",
    ),
    (
        "Summarise the call notes: budget approved, rollout in Q3, legal review pending.",
        "Budget approved. Rollout Q3. Legal review pending.",
        "Good news overall: the budget is approved and the rollout is planned for Q3. The one open item is "
        "legal's review of the contract, which gates the signature.",
    ),
    (
        [{"role": "user", "content": "Write a friendly check-in for a customer renewing next month."}],
        "Hello! Your renewal is coming up next month. Please reach out if you need anything.",
        "Hi Priya, hope the spring launch went well! Your renewal comes up on 12 June; happy to review your "
        "seat count with you beforehand so nothing is wasted.",
    ),
    (
        "Suggest a subject line for a discount offer that ends on Friday.",
        "Discount offer ending soon",
        "Your 15% renewal discount ends Friday",
    ),
    (
        "How do I explain the onboarding timeline to a nervous buyer?",
        "Tell them onboarding takes six weeks and that it usually goes fine.",
        "Break it into three two-week steps, name the owner of each, and say what they will see working at the "
        "end of each step. Nervous buyers relax when they know what happens next and who to call.",
    ),
    (
        [
            {"role": "user", "content": "Tone check: is 'Per my last email' too harsh?"},
            {"role": "assistant", "content": "It can read as impatient."},
            {"role": "user", "content": "Then what should I write instead?"},
        ],
        "You could write 'As I mentioned before'.",
        "Try 'Just resurfacing the note below' or 'Sharing this again in case it got buried'. Both point back "
        "to your earlier message without sounding annoyed.",
    ),
    (
        "Give three questions to qualify a lead in the first call.",
        "1. What is your budget?\n2. Who decides?\n3. When do you want to buy?",
        "1. What made you look for a tool like ours now?\n2. Who else will use it, and who signs off?\n"
        "3. What would make this a success for you by the end of the quarter?",
    ),
]


def write_pairs(path: Path) -> Path:
    """A JSONL file of comparisons between the two MODELS, answers that name neither."""
    lines = [
        json.dumps({"prompt": prompt, "responses": {MODELS[0]: first, MODELS[1]: second}})
        for prompt, first, second in PAIRS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepared_store(directory: Path) -> str:
    """A migrated SQLite store holding the comparisons of `write_pairs`; its URL."""
    url = f"sqlite:///{directory / 'eval.db'}"
    engine = engine_for(url)
    migrate(engine)
    result = studies.import_jsonl(engine, write_pairs(directory / "pairs.jsonl"), now=time.time())
    assert result.added == len(PAIRS) and not result.flagged and not result.errors, result
    engine.dispose()
    return url


@dataclass(frozen=True)
class Study:
    name: str
    links: dict[str, str]  # evaluator -> token


def new_study(
    url: str, name: str, evaluators: tuple[str, ...] = ("alice",), per_evaluator: int = 4, overlap: float = 0.0
) -> Study:
    engine = engine_for(url)
    try:
        created = studies.create_study(
            engine, name, evaluators=evaluators, per_evaluator=per_evaluator, overlap=overlap, rubric=RUBRIC,
            now=time.time(),
        )  # fmt: skip
    finally:
        engine.dispose()
    return Study(name, created.links)


def comparison_ids(url: str) -> list[str]:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            return [row.id for row in conn.execute(sa.select(comparisons.c.id))]
    finally:
        engine.dispose()


def votes_of(url: str, study: str) -> list[Vote]:
    engine = engine_for(url)
    try:
        return studies.study_votes(engine, study)
    finally:
        engine.dispose()


@contextmanager
def proxy_with_store(
    upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, log_dir: Path, store: str
) -> Iterator[ProxyServer]:
    """A proxy process serving /eval from `store` (the eval web and browser tests share it)."""
    proxy = ProxyServer(proxy_config(*upstreams), log_dir, redis_url, extra_env={"ABPROXY_STORE_URL": store})
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
