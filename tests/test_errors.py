"""proxy.errors: every error the proxy makes renders in OpenAI's shape, in-process and on the wire."""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any

import httpx
import orjson
import pytest

import proxy
from proxy import errors
from proxy.errors import ProxyError, error_body
from tests.harness import ADMIN_TOKEN, ProxyServer

ERROR_KEYS = {"message", "type", "param", "code"}


def _all_subclasses() -> list[type[ProxyError]]:
    # Import every module first, so a subclass defined outside errors.py is walked too.
    for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[ProxyError]] = []
    stack = [ProxyError]
    while stack:
        for sub in stack.pop().__subclasses__():
            found.append(sub)
            stack.append(sub)
    return found


SUBCLASSES = _all_subclasses()
_TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*?)(?P<name>[A-Z]\w+)\s+(?P<status>\d{3})\s+(?P<type>\w+)")


def _docstring_tree() -> dict[str, tuple[str, int, str]]:
    """name -> (parent, status, type), read from the tree drawn in errors.py's docstring."""
    tree: dict[str, tuple[str, int, str]] = {}
    parents = ["ProxyError"]
    lines = (errors.__doc__ or "").splitlines()
    root = next(i for i, line in enumerate(lines) if line.strip().startswith("ProxyError"))
    margin = len(lines[root]) - len(lines[root].lstrip())
    for line in lines[root + 1 :]:
        match = _TREE_LINE.match(line[margin:])
        if match is None:
            break
        depth = len(match["indent"]) // 4  # each level is drawn four characters wide
        del parents[depth:]
        tree[match["name"]] = (parents[-1], int(match["status"]), match["type"])
        parents.append(match["name"])
    return tree


class TestErrorTree:
    def test_tree_is_not_empty(self) -> None:
        """The walk finds the known subclasses (guards the walk itself)."""
        names = {cls.__name__ for cls in SUBCLASSES}
        assert {"InvalidRequest", "UnknownModel", "StateUnavailable", "UpstreamTimeout"} <= names

    @pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
    def test_renders_openai_shape(self, cls: type[ProxyError]) -> None:
        """Each subclass renders {"error": {message, type, param, code}} with exactly those keys."""
        body = orjson.loads(cls("something went wrong").to_json())
        assert set(body) == {"error"}
        assert set(body["error"]) == ERROR_KEYS
        assert body["error"]["message"] == "something went wrong"
        assert body["error"]["type"] == cls.openai_type
        assert body["error"]["param"] is None
        assert body["error"]["code"] == cls.default_code
        assert body == cls("something went wrong").to_dict()

    @pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
    def test_status_is_an_error_status(self, cls: type[ProxyError]) -> None:
        """Each subclass answers with a 4xx or 5xx status."""
        assert 400 <= cls.status_code <= 599

    @pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
    def test_declares_its_own_openai_type(self, cls: type[ProxyError]) -> None:
        """No subclass falls back to the base's generic "api_error": clients branch on `type`."""
        assert isinstance(cls.openai_type, str) and cls.openai_type
        assert cls.openai_type != ProxyError.openai_type

    @pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda c: c.__name__)
    def test_drawn_in_the_module_docstring(self, cls: type[ProxyError]) -> None:
        """errors.py's docstring tree lists every subclass with its parent, status and type."""
        tree = _docstring_tree()
        assert cls.__name__ in tree, f"add {cls.__name__} to the tree in proxy/errors.py's docstring"
        parent, status, type_ = tree[cls.__name__]
        assert (cls.__base__.__name__, cls.status_code, cls.openai_type) == (parent, status, type_)

    def test_docstring_tree_lists_nothing_extra(self) -> None:
        """Every node drawn in errors.py's docstring is a real class there (no stale entries)."""
        assert set(_docstring_tree()) == {cls.__name__ for cls in SUBCLASSES if cls.__module__ == "proxy.errors"}

    def test_param_and_code_override(self) -> None:
        """An explicit param and code replace the defaults; message stays as given."""
        error = errors.UnknownModel("no such model", param="model", code="custom")
        assert error.to_dict() == {"error": {"message": "no such model", "type": "invalid_request_error",
                                             "param": "model", "code": "custom"}}  # fmt: skip

    def test_error_body_is_the_one_shape(self) -> None:
        """error_body builds the same four-key object the exceptions use."""
        assert error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}

    def test_is_an_exception_with_the_message(self) -> None:
        """str(error) is its message, so logs read the same as the response."""
        assert str(errors.UpstreamTimeout("upstream took too long")) == "upstream took too long"


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

WIRE_CASES: list[Any] = [
    pytest.param("GET", "/no/such/path", {}, None, 404, "not_found", id="fastapi-unknown-path"),
    pytest.param("POST", "/healthz", {}, None, 405, "method_not_allowed", id="fastapi-wrong-method"),
    pytest.param("PUT", "/admin/experiments/sales-companion/rollout", AUTH, {"percent": "ten"}, 422, "invalid_value",
                 id="fastapi-bad-body"),
    pytest.param("PUT", "/admin/experiments/sales-companion/rollout", AUTH, {"percent": 101}, 422, "invalid_value",
                 id="fastapi-percent-out-of-range"),
    pytest.param("PUT", "/admin/experiments/sales-companion/rollout", AUTH, {}, 422, "invalid_value",
                 id="fastapi-missing-field"),
    pytest.param("GET", "/admin/experiments", {}, None, 401, "invalid_admin_token", id="admin-no-token"),
    pytest.param("GET", "/admin/experiments/nope", AUTH, None, 404, "experiment_not_found", id="admin-unknown"),
    pytest.param("GET", "/v1/no-such-endpoint", {}, None, 404, "unknown_url", id="v1-unknown-path"),
    pytest.param("POST", "/v1/chat/completions", {}, {"messages": []}, 400, "missing_model", id="v1-no-model"),
    pytest.param("POST", "/v1/chat/completions", {}, {"model": "nope"}, 404, "model_not_found", id="v1-unknown-model"),
]  # fmt: skip


class TestOnTheWire:
    @pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code"), WIRE_CASES)
    def test_same_shape_from_every_layer(
        self,
        module_proxy: ProxyServer,
        method: str,
        path: str,
        headers: dict[str, str],
        body: Any,
        status: int,
        code: str,
    ) -> None:
        """FastAPI's own 404/405/422, admin errors and /v1 errors all answer in OpenAI's error shape."""
        response = httpx.request(method, f"{module_proxy.url}{path}", headers=headers, json=body, timeout=10)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        payload = response.json()
        assert set(payload) == {"error"}
        assert set(payload["error"]) == ERROR_KEYS
        assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
        assert isinstance(payload["error"]["type"], str) and payload["error"]["type"]
        assert payload["error"]["code"] == code

    def test_validation_error_names_the_field(self, module_proxy: ProxyServer) -> None:
        """A 422 names the offending field in `param` and in the message."""
        response = httpx.put(
            f"{module_proxy.url}/admin/experiments/sales-companion/rollout", headers=AUTH, json={"percent": 12.345}
        )
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["param"] == "percent"
        assert error["message"].startswith("percent: ")
        assert "two decimals" in error["message"]

    def test_malformed_json_admin_body(self, module_proxy: ProxyServer) -> None:
        """A PUT whose body is not JSON is a 422 in the same shape, not FastAPI's default."""
        response = httpx.put(
            f"{module_proxy.url}/admin/experiments/sales-companion/rollout",
            headers={**AUTH, "content-type": "application/json"}, content=b"{not json",
        )  # fmt: skip
        assert response.status_code == 422
        assert set(response.json()["error"]) == ERROR_KEYS

    def test_405_keeps_allow_header(self, module_proxy: ProxyServer) -> None:
        """The 405 rewritten into OpenAI's shape still says which methods are allowed."""
        response = httpx.post(f"{module_proxy.url}/healthz")
        assert response.status_code == 405
        assert "GET" in response.headers["allow"]
