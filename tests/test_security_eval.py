"""Security of the blind comparison pages (/eval) against hostile input, over a real proxy process and store.

What tests/test_eval_web.py, test_eval_browser.py, test_studies.py and test_humaneval_cli.py already
cover is not repeated here (the report lists their node ids): revoking through the admin page, the
one 404 for every miss, the blindness walk, the strict admin cookie, only the token's hash stored.
This file adds: the links' format and uniqueness, a revoked link on every evaluator URL, stored XSS on
every page and export that shows a prompt, an answer, a reason or a model name, cross-site form
posts (httpx and a real chromium on another origin), one evaluator's link against another's tasks,
blindness for pairs sampled from production, and the security headers on every kind of answer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from proxy.cli import main
from proxy.humaneval import studies
from proxy.humaneval.links import new_token
from proxy.store.db import engine_for, pair_row
from proxy.store.schema import comparisons, tasks
from tests.eval_site import RUBRIC, Study, new_study, prepared_store, proxy_with_store, votes_of
from tests.harness import ADMIN_TOKEN, MockUpstream, ProxyServer, RedisServer
from tests.test_eval_browser import CHROMIUM, CHROMIUM_ARGS
from tests.test_eval_web import BlindnessWalk

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog

BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
URLSAFE = re.compile(r"[A-Za-z0-9_-]{32}")

# Each breaks out of a different context: element text, a quoted or unquoted attribute, <textarea>,
# <title>, a comment, a URL; and template syntax, which must stay text.
PAYLOADS = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "'><svg/onload=alert(3)>",
    "javascript:alert(4)",
    "</textarea><script>alert(5)</script>",
    "</title><iframe src=javascript:alert(6)></iframe>",
    '<a href="javascript:alert(7)">click me</a>',
    "<style>body{display:none}</style>",
    "{{ 7 * 7 }}{% raw %}",
    "<!--",
)
HOSTILE = " ".join(PAYLOADS)
# Model names reach the admin pages, the CSV and the CLI report: markup, CSV quoting, a formula, a
# newline, rich's markup and an ANSI escape (clear screen).
HOSTILE_MODELS = (
    '<script>alert("model")</script> [/] [bold]',
    '"><img src=x onerror=alert(8)>\n=HYPERLINK("http://evil.example"),x \x1b[2J',
)
WHY = "because </textarea><script>alert(9)</script> " + PAYLOADS[1]


def hostile_pairs(path: Path) -> Path:
    lines = []
    for i in range(6):
        prompt: object = (
            f"Q{i}: {HOSTILE}" if i % 2 else
            [{"role": "<script>alert('role')</script>", "content": f"system {i}: {HOSTILE}"},
             {"role": "user", "content": f"Q{i}: {HOSTILE}"}]
        )  # fmt: skip
        responses = {HOSTILE_MODELS[0]: f"A{i}: {HOSTILE}", HOSTILE_MODELS[1]: f"B{i}: {HOSTILE} {PAYLOADS[0]}"}
        lines.append(json.dumps({"prompt": prompt, "responses": responses}))
    path.write_text("\n".join(lines) + "\n")
    return path


# -- what a page may hold ------------------------------------------------------------------------------------------

_URL_ATTRIBUTES = frozenset({"href", "src", "action", "formaction", "xlink:href", "data", "poster", "srcdoc"})
_NEVER = frozenset({"img", "iframe", "object", "embed", "base", "style", "math", "frame", "frameset"})
_SVG = frozenset({"svg", "title", "line", "text", "circle", "g", "path", "rect"})


class _Html(HTMLParser):
    """The page's tags with their attributes, and its text as a reader sees it (entities decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.script_bodies: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        (self.script_bodies if self._in_script else self.text).append(data)


def assert_inert(html: str, shown: list[str], *, svg: bool = False) -> str:
    """The page shows every string of `shown` as text, and nothing in it became markup; its text."""
    page = _Html()
    page.feed(html)
    page.close()
    svg_tags = [tag for tag, _ in page.tags if tag == "svg"]
    for tag, attrs in page.tags:
        assert tag not in _NEVER, f"<{tag}> in the page"
        assert tag not in _SVG - {"title"} or svg, f"<{tag}> on a page without charts"
        for name, value in attrs.items():
            assert not name.startswith("on"), f"event handler {name}={value!r} on <{tag}>"
            assert name != "style", f"inline style on <{tag}>: the CSP forbids it"
            if name in _URL_ATTRIBUTES:
                scheme = re.sub(r"[\x00-\x20]", "", value).lower()
                assert not scheme.startswith(("javascript:", "data:", "vbscript:")), f"{name}={value!r} on <{tag}>"
                assert value.startswith("/eval/") or value == "", f"{name}={value!r} leads off the site"
        if tag == "meta":
            assert attrs.get("http-equiv", "").lower() != "refresh"
    scripts = [attrs for tag, attrs in page.tags if tag == "script"]
    assert all(attrs.get("src") == "/eval/static/eval.js" for attrs in scripts), scripts
    assert not "".join(page.script_bodies).strip(), "an inline script"
    assert svg or not svg_tags
    text = "".join(page.text)
    for item in shown:
        assert item in text, f"{item!r} is not shown as text"
    for payload in PAYLOADS:
        if any(ch in payload for ch in "<>\"'"):
            assert payload not in html, f"{payload!r} reached the HTML unescaped"
    return text


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("security-store")
    url = prepared_store(directory)
    engine = engine_for(url)
    try:
        result = studies.import_jsonl(engine, hostile_pairs(directory / "hostile.jsonl"), source="hostile",
                                      now=time.time())  # fmt: skip
    finally:
        engine.dispose()
    assert result.added == 6 and not result.flagged and not result.errors, result
    return url


@pytest.fixture(scope="module")
def server(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, store: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyServer]:  # fmt: skip
    with proxy_with_store(upstreams, redis_server.url, tmp_path_factory.mktemp("security-proxy"), store) as proxy:
        yield proxy


@pytest.fixture()
def client(server: ProxyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as c:
        yield c


@pytest.fixture()
def study(store: str) -> Study:
    """A fresh benign study: alice and bob, 3 tasks each."""
    return new_study(store, f"sec-{uuid.uuid4().hex[:8]}", ("alice", "bob"), per_evaluator=3, overlap=0.0)


def create(store: str, name: str, evaluators: tuple[str, ...], per_evaluator: int, source: str) -> Study:
    engine = engine_for(store)
    try:
        created = studies.create_study(engine, name, evaluators=evaluators, per_evaluator=per_evaluator, overlap=0.0,
                                       source=source, rubric=RUBRIC, now=time.time())  # fmt: skip
    finally:
        engine.dispose()
    return Study(name, created.links)


def task_ids(store: str, study: str, evaluator: str) -> list[str]:
    engine = engine_for(store)
    try:
        with engine.connect() as conn:
            query = sa.select(tasks.c.id).where(tasks.c.study == study, tasks.c.evaluator == evaluator)
            return [row.id for row in conn.execute(query.order_by(tasks.c.position))]
    finally:
        engine.dispose()


def post_vote(client: httpx.Client, url: str, choice: str = "A", headers: dict[str, str] | None = None,
              **fields: str) -> httpx.Response:  # fmt: skip
    data = {"choice": choice, "shown_at": str(int(time.time() * 1000)), **fields}
    return client.post(f"{url}/vote", data=data, headers=headers)


def task_url(study: Study, who: str, task_id: str) -> str:
    return f"/eval/s/{study.links[who]}/t/{task_id}"


# -- links ---------------------------------------------------------------------------------------------------------


class TestLinks:
    def test_tokens_are_192_random_bits_and_never_repeat(self) -> None:
        """A token is 32 URL-safe characters (24 bytes from `secrets`): 10,000 are distinct and use all 64 symbols."""
        made = [new_token() for _ in range(10_000)]
        assert all(URLSAFE.fullmatch(t) for t in made)
        assert len(set(made)) == len(made)
        assert set("".join(made)) == set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        # No position is stuck: every one of the 32 takes many values (a counter or a timestamp would not).
        assert all(len({t[i] for t in made}) > 60 for i in range(32))

    def test_study_links_and_task_ids_are_unguessable(self, store: str, study: Study) -> None:
        """create_study hands out one distinct 32-character token per evaluator and 128-bit random task ids."""
        assert set(study.links) == {"alice", "bob"}
        assert all(URLSAFE.fullmatch(t) for t in study.links.values()) and len(set(study.links.values())) == 2
        ids = task_ids(store, study.name, "alice") + task_ids(store, study.name, "bob")
        assert len(ids) == 6 == len(set(ids)) and all(re.fullmatch(r"t_[0-9a-f]{32}", i) for i in ids)

    def test_revoked_link_is_dead_on_every_url(self, client: httpx.Client, store: str, study: Study) -> None:
        """After revoking: the start, a task, a vote and undo all answer the unknown-link 404; nothing is stored.
        A new link works; the revoked token stays dead."""
        first = task_ids(store, study.name, "alice")[0]
        assert post_vote(client, task_url(study, "alice", first)).status_code == 303
        engine = engine_for(store)
        try:
            assert studies.revoke(engine, study.name, "alice", now=time.time())
        finally:
            engine.dispose()
        unknown = client.get(f"/eval/s/{new_token()}").text
        second = task_ids(store, study.name, "alice")[1]
        misses = [
            client.get(f"/eval/s/{study.links['alice']}"),
            client.get(task_url(study, "alice", second)),
            post_vote(client, task_url(study, "alice", second)),
            client.post(f"/eval/s/{study.links['alice']}/undo"),
        ]
        assert [r.status_code for r in misses] == [404] * 4
        assert {r.text for r in misses} == {unknown}
        assert len(votes_of(store, study.name)) == 1  # the undo undid nothing, the vote stored nothing
        engine = engine_for(store)
        try:
            fresh = studies.new_link(engine, study.name, "alice")
        finally:
            engine.dispose()
        assert client.get(f"/eval/s/{fresh}").status_code == 303
        assert client.get(f"/eval/s/{study.links['alice']}").status_code == 404


# -- another evaluator's tasks -------------------------------------------------------------------------------------


class TestIsolation:
    def test_a_link_cannot_vote_on_another_evaluators_task(self, client: httpx.Client, store: str,
                                                          study: Study) -> None:  # fmt: skip
        """alice's link with bob's task id: 404 for the page and the vote, and no vote is stored for either."""
        bobs = task_ids(store, study.name, "bob")[0]
        assert client.get(f"/eval/s/{study.links['alice']}/t/{bobs}").status_code == 404
        assert post_vote(client, f"/eval/s/{study.links['alice']}/t/{bobs}").status_code == 404
        assert votes_of(store, study.name) == []

    def test_a_link_cannot_reach_the_same_evaluator_name_in_another_study(
        self, client: httpx.Client, store: str, study: Study
    ) -> None:
        """alice of study A cannot read, vote on or undo alice of study B's tasks: the link names one study."""
        other = new_study(store, f"sec-{uuid.uuid4().hex[:8]}", ("alice",), per_evaluator=3)
        theirs = task_ids(store, other.name, "alice")
        assert client.get(f"/eval/s/{study.links['alice']}/t/{theirs[0]}").status_code == 404
        assert post_vote(client, f"/eval/s/{study.links['alice']}/t/{theirs[0]}").status_code == 404
        assert votes_of(store, other.name) == [] and votes_of(store, study.name) == []
        assert post_vote(client, task_url(other, "alice", theirs[0]), "B").status_code == 303
        undone = client.post(f"/eval/s/{study.links['alice']}/undo")  # A's undo, with nothing of A's to undo
        assert undone.status_code == 303
        assert [v.choice for v in votes_of(store, other.name)] == ["B"]

    def test_a_vote_needs_the_links_token(self, client: httpx.Client, store: str, study: Study) -> None:
        """A real task id under a well-formed token that is not the link's (or a prefix of it) stores nothing."""
        task = task_ids(store, study.name, "alice")[0]
        token = study.links["alice"]
        for guess in (new_token(), token[:-1], token + "A", token.upper() if token.upper() != token else token[::-1]):
            response = post_vote(client, f"/eval/s/{guess}/t/{task}")
            assert response.status_code == 404, guess
        assert votes_of(store, study.name) == []


# -- cross-site forms ----------------------------------------------------------------------------------------------

CROSS_SITE = [
    pytest.param({"Origin": "https://evil.example"}, id="foreign-origin"),
    pytest.param({"Origin": "null"}, id="null-origin"),
    pytest.param({"Sec-Fetch-Site": "cross-site"}, id="fetch-cross-site"),
    pytest.param({"Sec-Fetch-Site": "same-site", "Origin": "http://sub.127.0.0.1"}, id="fetch-same-site"),
    pytest.param({"Origin": "http://127.0.0.1.evil.example"}, id="lookalike-origin"),
    pytest.param({"Origin": "http://[::1"}, id="garbled-origin"),
]


class TestCrossSite:
    @pytest.mark.parametrize("headers", CROSS_SITE)
    def test_cross_site_vote_is_refused(self, client: httpx.Client, store: str, study: Study,
                                        headers: dict[str, str]) -> None:  # fmt: skip
        """A vote another site's page sends (by the browser's Origin / Sec-Fetch-Site) is a 403 and stores nothing."""
        task = task_ids(store, study.name, "alice")[0]
        response = post_vote(client, task_url(study, "alice", task), headers=headers)
        assert response.status_code == 403 and "Form sent from another site" in response.text
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert votes_of(store, study.name) == []

    @pytest.mark.parametrize(
        "same",
        [{"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"origin": "SERVER"},
         {"Sec-Fetch-Site": "same-origin", "origin": "SERVER"}],
        ids=["fetch-same-origin", "fetch-none", "own-origin", "both"],
    )  # fmt: skip
    def test_same_origin_vote_is_stored(self, server: ProxyServer, client: httpx.Client, store: str, study: Study,
                                        same: dict[str, str]) -> None:  # fmt: skip
        """The evaluator's own page (same origin, or typed in: Sec-Fetch-Site none) votes as before."""
        headers = {k: server.url if v == "SERVER" else v for k, v in same.items()}
        task = task_ids(store, study.name, "alice")[0]
        assert post_vote(client, task_url(study, "alice", task), headers=headers).status_code == 303
        assert [v.evaluator for v in votes_of(store, study.name)] == ["alice"]

    def test_cross_site_undo_is_refused(self, client: httpx.Client, store: str, study: Study) -> None:
        """Undo from another site: 403, and the vote stays."""
        task = task_ids(store, study.name, "alice")[0]
        assert post_vote(client, task_url(study, "alice", task)).status_code == 303
        refused = client.post(f"/eval/s/{study.links['alice']}/undo", headers={"Sec-Fetch-Site": "cross-site"})
        assert refused.status_code == 403
        assert len(votes_of(store, study.name)) == 1

    def test_cross_site_admin_forms_are_refused(self, client: httpx.Client, study: Study) -> None:
        """Login, and revoke with a valid session cookie, from another site: 403, no cookie set, the link still open."""
        login = client.post("/eval/admin/login", data={"token": ADMIN_TOKEN}, headers={"Origin": "https://evil.example"})
        assert login.status_code == 403 and "set-cookie" not in login.headers
        assert client.post("/eval/admin/login", data={"token": ADMIN_TOKEN}).status_code == 303  # signed in
        revoke = client.post(f"/eval/admin/studies/{study.name}/evaluators/alice/revoke",
                             headers={"Sec-Fetch-Site": "cross-site"})  # fmt: skip
        assert revoke.status_code == 403
        assert client.get(f"/eval/s/{study.links['alice']}").status_code == 303
        logout = client.post("/eval/admin/logout", headers={"Origin": "https://evil.example"})
        assert logout.status_code == 403 and client.get("/eval/admin").status_code == 200  # still signed in


# -- stored XSS ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(store: str, server: ProxyServer) -> Study:
    """A study of the hostile pairs: eve and mal, 3 tasks each; eve voted twice (the first with a hostile
    reason), mal once."""
    made = create(store, f"hostile-{uuid.uuid4().hex[:6]}", ("eve", "mal"), 3, "hostile")
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as client:
        eve, mal = task_ids(store, made.name, "eve"), task_ids(store, made.name, "mal")
        votes = [("eve", eve[0], "A", WHY), ("eve", eve[1], "B", ""), ("mal", mal[0], "tie", "")]
        for who, task, choice, why in votes:
            assert post_vote(client, task_url(made, who, task), choice, why=why).status_code == 303
    return made


class TestStoredXss:
    def test_task_pages_show_prompts_and_answers_as_text(self, client: httpx.Client, store: str,
                                                         hostile: Study) -> None:  # fmt: skip
        """Every task page of eve's (voted or not) shows the hostile prompt, roles and answers as text only."""
        pages = 0
        for task in task_ids(store, hostile.name, "eve"):
            response = client.get(task_url(hostile, "eve", task))
            assert response.status_code == 200
            text = assert_inert(response.text, [HOSTILE])
            assert re.search(r"A\d: ", text) and re.search(r"B\d: ", text)
            pages += 1
        assert pages == 3

    def test_the_reason_is_shown_back_as_text(self, client: httpx.Client, store: str, hostile: Study) -> None:
        """The stored "why" fills the voted page's textarea escaped: it cannot close the textarea."""
        voted = client.get(task_url(hostile, "eve", task_ids(store, hostile.name, "eve")[0]))
        assert "You voted" in voted.text
        assert_inert(voted.text, [WHY])
        assert voted.text.count("</textarea>") == 1

    @pytest.mark.parametrize(
        "fields",
        [{"choice": "", "why": WHY}, {"rubric.accuracy": PAYLOADS[0], "why": WHY},
         {"rubric.accuracy": PAYLOADS[0]}, {f"rubric.{PAYLOADS[1]}": "A"}],
        ids=["kept-why", "bad-answer", "bad-answer-quoted", "bad-question"],
    )
    def test_error_pages_echo_input_as_text(self, client: httpx.Client, store: str, hostile: Study,
                                            fields: dict[str, str]) -> None:  # fmt: skip
        """A refused form comes back (400) with what was typed and the offending value escaped; nothing stored."""
        before = len(votes_of(store, hostile.name))
        task = task_ids(store, hostile.name, "eve")[2]
        data = {"choice": "A", "shown_at": str(int(time.time() * 1000)), **fields}
        response = client.post(f"{task_url(hostile, 'eve', task)}/vote", data=data)
        assert response.status_code == 400 and 'role="alert"' in response.text
        shown = [WHY] if "why" in fields else []
        text = assert_inert(response.text, shown)
        for key, value in fields.items():
            if key.startswith("rubric.") and value == "A":
                assert repr(key.removeprefix("rubric.")) in text  # the unknown question, quoted as text
            elif key.startswith("rubric."):
                assert repr(value) in text
        assert len(votes_of(store, hostile.name)) == before

    def test_admin_pages_show_model_names_as_text(self, client: httpx.Client, hostile: Study) -> None:
        """The studies list and the study page (results tables, SVG chart labels) show the hostile model names as
        text; the only markup is the page's own."""
        listing = client.get("/eval/admin", headers=BEARER)
        assert listing.status_code == 200
        assert_inert(listing.text, [", ".join(sorted(HOSTILE_MODELS))])
        page = client.get(f"/eval/admin/studies/{hostile.name}", headers=BEARER)
        assert page.status_code == 200 and page.text.count("<svg") == 2
        text = assert_inert(page.text, list(HOSTILE_MODELS), svg=True)
        assert f"{HOSTILE_MODELS[0]} vs {HOSTILE_MODELS[1]}" in text or f"{HOSTILE_MODELS[1]} vs {HOSTILE_MODELS[0]}" \
            in text  # the head-to-head table row
        svg = page.text[page.text.index("<svg") : page.text.rindex("</svg>")]
        assert "&lt;script&gt;" in svg and "<script" not in svg

    def test_admin_not_found_echoes_the_name_as_text(self, client: httpx.Client) -> None:
        """A hostile study name in the admin URL comes back escaped in the 404 page."""
        response = client.get(f"/eval/admin/studies/{quote(PAYLOADS[1], safe='')}", headers=BEARER)
        assert response.status_code == 404
        assert_inert(response.text, [repr(PAYLOADS[1])])

    def test_votes_csv_quotes_hostile_names(self, client: httpx.Client, hostile: Study) -> None:
        """votes.csv is an attachment, text/csv, nosniff; names with quotes, commas and a newline stay one cell each."""
        response = client.get(f"/eval/admin/studies/{hostile.name}/votes.csv", headers=BEARER)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert response.headers["content-disposition"].startswith("attachment;")
        assert response.headers["x-content-type-options"] == "nosniff"
        header, *rows = list(csv.reader(io.StringIO(response.text)))
        assert header[3:5] == ["model_a", "model_b"] and len(rows) == 3
        assert all(len(row) == len(header) and {row[3], row[4]} == set(HOSTILE_MODELS) for row in rows)
        assert sorted(row[1] for row in rows) == ["eve", "eve", "mal"]

    def test_cli_report_prints_hostile_names_as_text(self, store: str, hostile: Study) -> None:
        """`abproxy humaneval report`: the table shows rich markup and ANSI escapes literally (no crash, no escape
        sequence reaches the terminal); the Markdown has no HTML tag, link or broken row; CSV and JSON round-trip."""

        def report(fmt: str) -> str:
            # In process (CliRunner): four interpreters importing scipy and statsmodels took ~30 s under load.
            args = ["humaneval", "report", hostile.name, "--store", store, "--format", fmt, "--bootstrap", "20"]
            with _wide_console():
                done = CliRunner().invoke(main, args, env={"ABPROXY_CONFIG": "", "NO_COLOR": "1"})
            assert done.exit_code == 0, done.output
            return done.stdout

        table = report("table")
        assert "\x1b" not in table
        assert HOSTILE_MODELS[0] in table  # "[/] [bold]" printed as typed, not read as markup
        assert HOSTILE_MODELS[1].replace("\n", "\\x0a").replace("\x1b", "\\x1b") in table

        markdown = report("markdown")
        assert "<script" not in markdown and "<img" not in markdown and "\x1b" not in markdown
        assert "&lt;script>alert" in markdown
        for block in markdown.split("\n\n"):
            lines = block.splitlines()
            if lines and lines[0].startswith("| "):
                assert all(line.startswith("|") and line.endswith("|") for line in lines), block

        rows = list(csv.reader(io.StringIO(report("csv"))))
        # click.echo drops ANSI sequences when stdout is not a terminal: the CSV loses the name's "\x1b[2J".
        names = {re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", name) for name in HOSTILE_MODELS}
        assert {row[1] for row in rows[1:] if row[0] == "bradley_terry"} == names
        assert set(json.loads(report("json"))["models"]) == set(HOSTILE_MODELS)


# -- blindness for production pairs ----------------------------------------------------------------------------------

PRODUCTION_MODELS = ("ctl-orchid-41", "trt-heron-77")
EXPERIMENT = "exp-kestrel-9"


def test_blindness_of_production_pairs(server: ProxyServer, store: str) -> None:
    """Pairs sampled from production carry an experiment, a request id and a source: none of them, nor the
    variants' model names, reaches the evaluator (tests/test_eval_web.py's walk covers imported pairs)."""
    request_ids = [f"{uuid.uuid4().hex}{i:08x}" for i in range(4)]
    rows = [
        pair_row({"experiment": EXPERIMENT, "request_id": rid, "ts": time.time(), "prompt": f"question {i}?",
                  "responses": {PRODUCTION_MODELS[0]: f"answer {i} one", PRODUCTION_MODELS[1]: f"answer {i} two"}})
        for i, rid in enumerate(request_ids)
    ]  # fmt: skip
    engine = engine_for(store)
    try:
        with engine.begin() as conn:
            conn.execute(comparisons.insert(), rows)
    finally:
        engine.dispose()
    made = create(store, f"prod-{uuid.uuid4().hex[:6]}", ("pat",), 4, f"production:{EXPERIMENT}")
    forbidden = [*PRODUCTION_MODELS, EXPERIMENT, "production", *request_ids, *(r["id"] for r in rows), made.name]
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client:
        walk = BlindnessWalk(client, forbidden,
                             state=lambda: frozenset(v.comparison_id for v in votes_of(store, made.name)))
        walk.run(f"/eval/s/{made.links['pat']}", probes=[])
    assert any("All done, thank you!" in r.text for r in walk.responses)
    assert sum(1 for r in walk.responses if "Which answer is better?" in r.text) >= 4


# -- security headers ------------------------------------------------------------------------------------------------

EXPECTED_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def assert_security_headers(response: httpx.Response) -> None:
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    for name, value in EXPECTED_HEADERS.items():
        if name == "cache-control" and response.request.url.path.startswith("/eval/static/"):
            continue  # the shared stylesheet and script may be cached
        assert response.headers.get(name) == value, f"{name} on {where}"
    policy = {d.split()[0]: d.split()[1:] for d in response.headers["content-security-policy"].split("; ")}
    assert policy["default-src"] == ["'none'"] and policy["script-src"] == ["'self'"], where
    assert policy["style-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"], where
    assert policy["form-action"] == ["'self'"] and policy["base-uri"] == ["'none'"], where


def test_security_headers_on_every_kind_of_answer(client: httpx.Client, store: str, study: Study) -> None:
    """Pages, redirects, 400, 403 (cross-site, admin disabled is covered elsewhere), 404, 405, static files, the
    admin pages and their JSON 401 all carry the CSP (no unsafe-inline), nosniff, no-referrer and DENY framing."""
    token_link = f"/eval/s/{study.links['alice']}"
    task = task_url(study, "alice", task_ids(store, study.name, "alice")[0])
    answers = [
        client.get(token_link),  # 303
        client.get(task),  # 200
        post_vote(client, task, ""),  # 400
        post_vote(client, task, headers={"Origin": "https://evil.example"}),  # 403
        client.get("/eval/s/unknown"),  # 404
        client.get(f"{token_link}/undo"),  # 405
        client.put(task),  # 405
        client.get("/eval/static/eval.js"),
        client.get("/eval/static/eval.css"),
        client.get("/eval/static/missing.js"),
        client.get("/eval/admin"),  # the login form, 401
        client.get("/eval/admin", headers={"Authorization": "Bearer wrong"}),  # the API's JSON 401
        client.get("/eval/admin", headers=BEARER),
        client.get(f"/eval/admin/studies/{study.name}", headers=BEARER),
        client.get(f"/eval/admin/studies/{study.name}/votes.csv", headers=BEARER),
        client.post("/eval/admin/login", data={"token": ADMIN_TOKEN}),  # 303 with the cookie
    ]
    assert [r.status_code for r in answers] == [303, 200, 400, 403, 404, 405, 405, 200, 200, 404, 401, 401, 200, 200,
                                                200, 303]  # fmt: skip
    for response in answers:
        assert_security_headers(response)
    assert answers[11].json()["error"]["code"] == "invalid_admin_token"  # still the API's error shape
    assert answers[5].json()["error"]["code"] == "method_not_allowed" and answers[5].headers["allow"] == "POST"
    for response in answers:
        if response.headers.get("content-type", "").startswith("text/html"):
            assert_inert(response.text, [], svg=True)  # no inline script, handler or style for the CSP to block


# -- a real browser --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"chromium is not installed at {CHROMIUM}: apt-get install -y chromium", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_browser_refuses_another_sites_form_and_runs_no_payload(
    browser: Browser, server: ProxyServer, store: str, study: Study, hostile: Study
) -> None:
    """chromium on another origin auto-submits a vote form to alice's task: the browser names its origin, the
    server answers 403 and stores nothing. Then the hostile task page, scripts on, raises no dialog and builds
    no element from a payload."""
    task = task_ids(store, study.name, "alice")[0]
    target = urljoin(server.url, f"{task_url(study, 'alice', task)}/vote")
    attack = (f'<form method="post" action="{target}"><input name="choice" value="A">'
              '<input name="shown_at" value="0"></form><script>document.forms[0].submit()</script>')  # fmt: skip
    context = browser.new_context()
    try:
        context.route("http://evil.test/**", lambda route: route.fulfill(status=200, content_type="text/html",
                                                                          body=attack))  # fmt: skip
        page = context.new_page()
        with page.expect_response(lambda r: r.url == target) as posted:
            page.goto("http://evil.test/")
        response = posted.value
        assert response.status == 403
        sent = response.request.all_headers()
        # chromium sends Sec-Fetch-* to secure origins only; over plain http the Origin header is what refuses it.
        assert sent.get("origin") == "http://evil.test" and sent.get("sec-fetch-site") in (None, "cross-site")
        assert votes_of(store, study.name) == []

        dialogs: list[str] = []

        def on_dialog(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.goto(urljoin(server.url, task_url(hostile, "eve", task_ids(store, hostile.name, "eve")[0])))
        page.wait_for_load_state("load")
        assert page.get_by_text("You voted").is_visible()
        counts = page.evaluate("['img', 'iframe', 'svg', 'style', 'a[href^=\"javascript\"]']"
                               ".map(s => document.querySelectorAll(s).length)")  # fmt: skip
        assert counts == [0, 0, 0, 0, 0]
        assert page.locator("textarea#why").input_value() == WHY
        assert dialogs == []
    finally:
        context.close()


@contextlib.contextmanager
def _wide_console() -> Iterator[None]:
    """The CLI's shared rich console, 400 columns wide for the test, so no cell wraps."""
    from proxy.cli_common import console

    saved = console.width
    console.width = 400
    try:
        yield
    finally:
        console.width = saved
