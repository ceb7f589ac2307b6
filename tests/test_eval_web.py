"""The /eval pages served by a real proxy process over a real SQLite store: the evaluator's flow, the
admin pages, `abproxy humaneval serve`, and the blindness walk over everything an evaluator can reach."""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from proxy.humaneval.rubric import Rubric
from proxy.humaneval.web import VoteFormError, parse_vote_form
from tests.eval_site import (
    MODELS,
    RUBRIC,
    Study,
    comparison_ids,
    new_study,
    prepared_store,
    proxy_with_store,
    votes_of,
)
from tests.harness import (
    ADMIN_TOKEN,
    MockUpstream,
    Process,
    ProxyServer,
    RedisServer,
    free_port,
    proxy_config,
    wait_until,
)

TASK_URL = re.compile(r"/eval/s/[^/]+/t/(t_[0-9a-f]+)$")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return prepared_store(tmp_path_factory.mktemp("eval-store"))


@pytest.fixture(scope="module")
def server(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, store: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyServer]:  # fmt: skip
    with proxy_with_store(upstreams, redis_server.url, tmp_path_factory.mktemp("eval-proxy"), store) as proxy:
        yield proxy


@pytest.fixture()
def study(store: str) -> Study:
    """A fresh study of 4 tasks each for alice and bob, sharing the module's store and proxy."""
    return new_study(store, f"study-{uuid.uuid4().hex[:8]}", ("alice", "bob"), per_evaluator=4, overlap=0.5)


@pytest.fixture()
def client(server: ProxyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10, follow_redirects=False) as c:
        yield c


def link(study: Study, who: str = "alice") -> str:
    return f"/eval/s/{study.links[who]}"


def current_task_url(client: httpx.Client, study: Study, who: str = "alice") -> str:
    response = client.get(link(study, who))
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert TASK_URL.search(location), location
    return str(location)


def vote(client: httpx.Client, task_url: str, choice: str = "A", **fields: str) -> httpx.Response:
    return client.post(f"{task_url}/vote", data={"choice": choice, "shown_at": str(int(time.time() * 1000)), **fields})


class TestEvaluatorFlow:
    def test_link_redirects_to_first_task_with_private_headers(self, client: httpx.Client, study: Study) -> None:
        """The link 303s to a task page; pages are no-store, no-referrer, noindex."""
        task_url = current_task_url(client, study)
        page = client.get(task_url)
        assert page.status_code == 200
        assert "Response A" in page.text and "Response B" in page.text and "0 of 4 done" in page.text
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "noindex" in page.headers["x-robots-tag"]
        for label in ("A is better", "Tie", "B is better", "Why?", "Accuracy", "Company voice"):
            assert label in page.text
        assert RUBRIC.criteria[0].guidance in page.text

    def test_vote_is_stored_and_moves_on(self, client: httpx.Client, study: Study, store: str) -> None:
        """A vote with rubric and reason is stored once, with the time taken, and the next task follows."""
        first = current_task_url(client, study)
        shown_at = str(int(time.time() * 1000) - 4000)
        response = client.post(f"{first}/vote", data={
            "choice": "B", "why": "  clearer next step ", "shown_at": shown_at, "rubric.accuracy": "tie",
            "rubric.company_voice.A": "2", "rubric.company_voice.B": "5",
        })  # fmt: skip
        assert response.status_code == 303
        second = response.headers["location"]
        assert TASK_URL.search(second) and second != first
        [stored] = votes_of(store, study.name)
        assert (stored.evaluator, stored.choice) == ("alice", "B")
        assert dict(stored.rubric) == {"accuracy": "tie", "company_voice.A": 2, "company_voice.B": 5}
        assert stored.time_taken_ms is not None and stored.time_taken_ms >= 4000
        assert "1 of 4 done" in client.get(second).text

    def test_double_submit_keeps_the_first_vote(self, client: httpx.Client, study: Study, store: str) -> None:
        """Posting the same task twice (a double click, a resent form) stores one vote: the first."""
        task = current_task_url(client, study)
        first, again = vote(client, task, "A"), vote(client, task, "B")
        assert first.status_code == again.status_code == 303
        assert again.headers["location"] == first.headers["location"]
        assert [v.choice for v in votes_of(store, study.name)] == ["A"]

    def test_resume_after_reload(self, server: ProxyServer, client: httpx.Client, study: Study) -> None:
        """A fresh browser (no cookies, no state) opening the link lands on the first task without a vote."""
        voted = []
        for choice in ("A", "tie"):
            task = current_task_url(client, study)
            voted.append(task)
            assert vote(client, task, choice).status_code == 303
        with httpx.Client(base_url=server.url, follow_redirects=False) as fresh:
            resumed = current_task_url(fresh, study)
            assert resumed not in voted
            assert "2 of 4 done" in fresh.get(resumed).text
            done_page = fresh.get(voted[1])
        assert "You voted <strong>Tie</strong>" in done_page.text
        assert re.search(r'value="tie"[^>]*class="choice chosen"', done_page.text)

    def test_undo_reopens_the_last_vote(self, client: httpx.Client, study: Study, store: str) -> None:
        """Undo deletes the most recent vote and 303s to its task, which the link then resumes at."""
        first = current_task_url(client, study)
        vote(client, first, "A")
        second = current_task_url(client, study)
        vote(client, second, "B")
        undone = client.post(f"{link(study)}/undo")
        assert undone.status_code == 303 and undone.headers["location"] == second
        assert [v.choice for v in votes_of(store, study.name)] == ["A"]
        assert current_task_url(client, study) == second
        assert "Undo last vote" in client.get(second).text

    def test_undo_with_nothing_to_undo(self, client: httpx.Client, study: Study) -> None:
        """Undo before any vote goes back to the link, which shows the first task."""
        response = client.post(f"{link(study)}/undo")
        assert response.status_code == 303 and response.headers["location"] == link(study)

    def test_done_page(self, client: httpx.Client, study: Study) -> None:
        """After the last vote the link shows a thank-you page with the count, and undo."""
        for _ in range(4):
            last = vote(client, current_task_url(client, study))
        assert last.headers["location"] == link(study)
        done = client.get(link(study))
        assert done.status_code == 200
        assert "All done, thank you!" in done.text and "4 of 4 done" in done.text and "Undo last vote" in done.text

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"choice": ""}, "Choose one: A is better, Tie, or B is better."),
            ({"choice": "C"}, "Choose one"),
            ({"why": "x" * 2001}, "Keep the reason under 2000 characters"),
            ({"rubric.accuracy": "maybe"}, "Accuracy: &#39;maybe&#39; is not one of the offered answers."),
            ({"rubric.company_voice.A": "6", "rubric.company_voice.B": "3"}, "Company voice, Response A: &#39;6&#39;"),
            ({"rubric.company_voice.A": "4"}, "Company voice: score both responses, or neither."),
            ({"rubric.speed": "A"}, "has no question &#39;speed&#39;"),
        ],
    )
    def test_invalid_vote_stores_nothing(
        self, client: httpx.Client, study: Study, store: str, fields: dict[str, str], message: str
    ) -> None:
        """A bad form gets the page again with a clear message and HTTP 400; nothing is stored."""
        task = current_task_url(client, study)
        response = vote(client, task, **{"choice": "A", "why": "kept text", **fields})
        assert response.status_code == 400
        assert 'role="alert"' in response.text and message in response.text
        if "why" not in fields:
            assert "kept text</textarea>" in response.text  # what they typed survives the error
        assert votes_of(store, study.name) == []

    def test_unknown_links_and_tasks_all_get_the_same_404(self, client: httpx.Client, study: Study) -> None:
        """An unknown token, another evaluator's task and a made-up task id answer one identical page."""
        bobs_task = TASK_URL.search(current_task_url(client, study, "bob"))
        assert bobs_task is not None
        misses = [
            client.get("/eval/s/not-a-real-token"),
            client.get(f"/eval/s/{'x' * 300}"),
            client.get(f"{link(study)}/t/{bobs_task.group(1)}"),
            client.get(f"{link(study)}/t/t_0000"),
            client.post(f"{link(study)}/t/t_0000/vote", data={"choice": "A"}),
            client.post("/eval/s/not-a-real-token/undo"),
        ]
        assert {r.status_code for r in misses} == {404}
        assert len({r.text for r in misses}) == 1
        assert "Link not found" in misses[0].text


def login(client: httpx.Client, token: str = ADMIN_TOKEN) -> httpx.Response:
    return client.post("/eval/admin/login", data={"token": token})


class TestAdmin:
    def test_pages_need_the_admin_token(self, client: httpx.Client, study: Study) -> None:
        """No credentials: the login form (401); a wrong Bearer: the admin API's 401; the right one: 200."""
        for path in ("/eval/admin", f"/eval/admin/studies/{study.name}", f"/eval/admin/studies/{study.name}/votes.csv"):
            anonymous = client.get(path)
            assert anonymous.status_code == 401 and 'name="token"' in anonymous.text
            wrong = client.get(path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_token"
            assert client.get(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 200
        revoke = client.post(f"/eval/admin/studies/{study.name}/evaluators/alice/revoke")
        assert revoke.status_code == 401
        assert client.get(link(study)).status_code == 303  # the unauthenticated revoke changed nothing

    def test_login_sets_a_strict_cookie(self, client: httpx.Client, study: Study) -> None:
        """The login form's cookie opens the pages; it is HttpOnly, SameSite=Strict, scoped to /eval/admin."""
        refused = login(client, "wrong")
        assert refused.status_code == 401 and "That is not the admin token." in refused.text
        response = login(client)
        assert response.status_code == 303 and response.headers["location"] == "/eval/admin"
        cookie = response.headers["set-cookie"]
        assert ADMIN_TOKEN not in cookie
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/eval/admin"):
            assert attribute.lower() in cookie.lower()
        listing = client.get("/eval/admin")
        assert listing.status_code == 200 and study.name in listing.text
        assert "alice" in listing.text and "0 of 4" in listing.text
        assert client.post("/eval/admin/logout").status_code == 303
        assert client.get("/eval/admin").status_code == 401

    def test_revoke_closes_the_link(self, client: httpx.Client, study: Study) -> None:
        """Revoking an evaluator's link makes it a 404 indistinguishable from a link that never existed."""
        login(client)
        response = client.post(f"/eval/admin/studies/{study.name}/evaluators/alice/revoke")
        assert response.status_code == 303 and response.headers["location"] == f"/eval/admin/studies/{study.name}"
        revoked = client.get(link(study))
        assert revoked.status_code == 404
        assert revoked.text == client.get("/eval/s/never-issued").text
        assert client.get(link(study, "bob")).status_code == 303
        assert "revoked" in client.get(f"/eval/admin/studies/{study.name}").text

    def test_study_page_shows_progress_and_results(self, client: httpx.Client, study: Study) -> None:
        """The study page shows each evaluator's progress, the CSV link and the ratings as a table and a chart."""
        login(client)
        assert "No votes yet" in client.get(f"/eval/admin/studies/{study.name}").text
        for who, choice in (("alice", "B"), ("alice", "B"), ("bob", "A"), ("bob", "tie")):
            vote(client, current_task_url(client, study, who), choice)
        page = client.get(f"/eval/admin/studies/{study.name}")
        assert page.status_code == 200
        assert "2 of 4" in page.text and "Revoke link" in page.text and "votes.csv" in page.text
        assert page.text.count("<svg") == 2 and "Bradley-Terry" in page.text
        for model in MODELS:
            assert model in page.text  # the admin sees which model is which
        assert client.get("/eval/admin/studies/no-such-study").status_code == 404

    def test_votes_csv(self, client: httpx.Client, study: Study, store: str) -> None:
        """The CSV export has every vote with both model names, the winner and the rubric answers."""
        vote(client, current_task_url(client, study), "A", **{"rubric.accuracy": "A"})
        vote(client, current_task_url(client, study, "bob"), "tie")
        login(client)
        response = client.get(f"/eval/admin/studies/{study.name}/votes.csv")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        assert f'filename="{study.name}-votes.csv"' in response.headers["content-disposition"]
        header, *rows = response.text.strip().split("\n")
        assert header == "created_at,evaluator,comparison_id,model_a,model_b,choice,winner,time_taken_ms,rubric"
        assert len(rows) == 2
        first = rows[0].split(",")
        assert first[1] == "alice" and set(first[3:5]) == set(MODELS) and first[5] == "A" and first[6] == first[3]
        assert rows[0].endswith('"{""accuracy"":""A""}"')
        assert rows[1].split(",")[6] == "tie"

    def test_disabled_without_an_admin_token(
        self, upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, store: str, tmp_path: Path,
        study: Study,
    ) -> None:  # fmt: skip
        """With no admin token configured the admin pages answer 403, like the admin API; evaluators still vote."""
        proxy = ProxyServer(
            proxy_config(*upstreams), tmp_path, redis_server.url, admin_token=None,
            extra_env={"ABPROXY_STORE_URL": store},
        )  # fmt: skip
        proxy.start()
        try:
            with httpx.Client(base_url=proxy.url, follow_redirects=False) as client:
                for response in (client.get("/eval/admin"), login(client, "anything"),
                                 client.get("/eval/admin", headers={"Authorization": "Bearer x"})):  # fmt: skip
                    assert response.status_code == 403
                    assert response.json()["error"]["code"] == "admin_disabled"
                assert client.get(link(study)).status_code == 303
        finally:
            proxy.stop()


class TestServe:
    def test_humaneval_serve(self, store: str, study: Study, tmp_path: Path) -> None:
        """`abproxy humaneval serve --store URL` serves the same pages without a config, Redis or upstreams."""
        port = free_port()
        argv = [sys.executable, "-m", "proxy", "humaneval", "serve", "--store", store, "--port", str(port)]
        process = Process("eval-serve", argv, tmp_path, {"ABPROXY_ADMIN_TOKEN": "serve-token", "ABPROXY_CONFIG": ""})
        process.start()
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, timeout=20, what=process.logs())
            with httpx.Client(base_url=url, follow_redirects=False) as client:
                task = current_task_url(client, study)
                assert vote(client, task, "B").status_code == 303
                assert client.get("/eval/admin", headers={"Authorization": "Bearer serve-token"}).status_code == 200
                assert client.get("/eval/admin/studies/x", headers={"Authorization": "Bearer no"}).status_code == 401
                assert client.get("/v1/models").status_code == 404
        finally:
            process.stop()
        assert study.links["alice"] not in process.logs()  # no access log: the token never reaches a log


# -- blindness ---------------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Every URL a page can lead to: links, scripts, styles, images, and each form with its fields."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.forms: list[dict[str, object]] = []
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for attribute in ("href", "src"):
            if attribute in a:
                self.urls.append(a[attribute])
        form = self.forms[-1] if self.forms else None
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get").upper(),
                               "fields": {}, "radios": {}, "buttons": []})  # fmt: skip
        elif form is not None and tag == "input":
            kind = a.get("type", "text")
            if kind == "radio":
                form["radios"].setdefault(a["name"], []).append(a["value"])  # type: ignore[attr-defined]
            elif "name" in a:
                form["fields"][a["name"]] = a.get("value", "")  # type: ignore[index]
        elif form is not None and tag == "textarea":
            form["fields"][a["name"]] = ""  # type: ignore[index]
        elif form is not None and tag == "button" and "disabled" not in a:
            form["buttons"].append((a.get("name"), a.get("value", "")))  # type: ignore[attr-defined]


class BlindnessWalk:
    """Follow every link, redirect and form from an evaluator's link; check each request and response.

    A form is submitted once per submit button, with each radio group's first answer, and also in the
    two wrong ways (no choice; an impossible rubric answer) that render the error page. A request is
    sent again whenever the evaluator's state (which tasks have a vote: `state()`) has changed, so the
    voted and unvoted views of each task, undo and the done page are all seen; there are finitely many
    states and requests, so the walk ends.
    """

    LIMIT = 3000  # requests: far above what the walk needs; a loop in it fails instead of hanging

    def __init__(self, client: httpx.Client, forbidden: list[str], state: Callable[[], object]) -> None:
        self.client = client
        self.forbidden = [f.lower() for f in forbidden]
        self.state = state
        self.seen: set[tuple[object, ...]] = set()
        self.responses: list[httpx.Response] = []

    def check(self, response: httpx.Response) -> None:
        request = response.request
        exposed = [str(request.url), request.content.decode(), response.text,
                   *(f"{k}: {v}" for k, v in response.headers.multi_items())]  # fmt: skip
        for text in exposed:
            lowered = text.lower()
            for word in self.forbidden:
                assert word not in lowered, f"{word!r} reaches the evaluator: {request.method} {request.url}"
            assert not re.search(r"\bc_[0-9a-f]{6,}", lowered), f"a comparison id in {request.method} {request.url}"

    def run(self, start: str, probes: list[tuple[str, str]]) -> None:
        queue: list[tuple[str, str, dict[str, str] | None]] = [("GET", start, None)]
        queue += [(method, url, {}) if method == "POST" else (method, url, None) for method, url in probes]
        while queue:
            method, url, data = queue.pop(0)
            key = (method, url, tuple(sorted((data or {}).items())), self.state())
            if key in self.seen:
                continue
            self.seen.add(key)
            assert len(self.seen) < self.LIMIT, "the walk does not end"
            response = self.client.request(method, url, data=data)
            self.responses.append(response)
            self.check(response)
            if response.is_redirect:
                queue.append(("GET", urljoin(url, response.headers["location"]), None))
            if response.headers.get("content-type", "").startswith("text/html"):
                queue += self._next(url, response.text)

    def _next(self, url: str, html: str) -> list[tuple[str, str, dict[str, str] | None]]:
        page = _Page()
        page.feed(html)
        found: list[tuple[str, str, dict[str, str] | None]] = [("GET", urljoin(url, u), None) for u in page.urls]
        for form in page.forms:
            action = urljoin(url, str(form["action"]))
            base = {k: v for k, v in form["fields"].items()}  # type: ignore[attr-defined]
            base.pop("shown_at", None)  # changes on every render: part of no request's identity
            answers = {name: values[0] for name, values in form["radios"].items()}  # type: ignore[attr-defined]
            for name, value in form["buttons"] or [(None, "")]:  # type: ignore[attr-defined]
                data = {**base, **answers, **({name: value} if name else {})}
                found.append((str(form["method"]), action, data))
            if answers:
                found.append(("POST", action, {**base, **answers}))  # no choice: the error page
                found.append(("POST", action, {**base, "choice": "A", next(iter(answers)): "nonsense"}))
        return found


def test_blindness(server: ProxyServer, store: str, study: Study) -> None:
    """No model name, comparison id or study name reaches an evaluator: in any page, URL, header or error."""
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=10) as client:
        walk = BlindnessWalk(
            client, [*MODELS, *comparison_ids(store), study.name],
            state=lambda: frozenset(v.comparison_id for v in votes_of(store, study.name) if v.evaluator == "alice"),
        )  # fmt: skip
        token_link = link(study)
        walk.run(token_link, probes=[
            ("GET", "/eval/s/unknown-token"), ("POST", "/eval/s/unknown-token/undo"),
            ("GET", f"{token_link}/t/t_0000"), ("POST", f"{token_link}/t/t_0000/vote"),
            ("GET", f"{token_link}/undo"), ("GET", f"{token_link}/t/t_0000/vote"),
            ("GET", f"{token_link}/nothing-here"), ("GET", "/eval/static/none.js"),
        ])  # fmt: skip
        # Every task page once more, now that the walk has voted on them: the "you voted" view.
        task_urls = {str(r.request.url) for r in walk.responses if r.status_code == 200
                     and TASK_URL.search(urlsplit(str(r.request.url)).path)}  # fmt: skip
        revisits = [client.get(url) for url in sorted(task_urls)]
        for response in revisits:
            walk.check(response)
        assert len(task_urls) == 4 and any("You voted" in r.text for r in revisits)
    statuses = {r.status_code for r in walk.responses}
    assert {200, 303, 400, 404, 405} <= statuses, statuses
    texts = "".join(r.text for r in walk.responses)
    assert "All done, thank you!" in texts and "You voted" in texts and 'role="alert"' in texts
    assert any(r.request.url.path == "/eval/static/eval.js" for r in walk.responses)
    assert len(votes_of(store, study.name)) >= 3  # the walk voted, and undid, as an evaluator would


class TestVoteForm:
    def test_scores_and_preferences(self) -> None:
        """Digits become scores, blanks are skipped, the time taken is now minus shown_at."""
        form = {"choice": "tie", "why": " ", "rubric.accuracy": "", "rubric.company_voice.A": "3",
                "rubric.company_voice.B": "4", "shown_at": "1000"}  # fmt: skip
        parsed = parse_vote_form(form, RUBRIC, now_ms=3500)
        assert (parsed.choice, parsed.why, parsed.time_taken_ms) == ("tie", None, 2500)
        assert parsed.rubric == {"company_voice.A": 3, "company_voice.B": 4}

    @pytest.mark.parametrize("shown_at", ["", "soon", "5000", str(-7 * 3600 * 1000)])
    def test_implausible_time_is_unknown(self, shown_at: str) -> None:
        """A missing, garbled, future or over-6-hour render time is stored as unknown, not refused."""
        assert parse_vote_form({"choice": "A", "shown_at": shown_at}, Rubric(), now_ms=1000).time_taken_ms is None

    def test_no_rubric_means_no_rubric_fields(self) -> None:
        """A study without a rubric refuses rubric fields."""
        with pytest.raises(VoteFormError, match="no question"):
            parse_vote_form({"choice": "A", "rubric.tone": "A"}, Rubric(), now_ms=0)
