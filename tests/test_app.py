"""The ASGI app assembled in-process: dispatch between the raw /v1 handler and FastAPI, and the
start-up heap freeze that keeps full garbage collections off the p99 (bench/forwarders.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from proxy.app import create_app
from proxy.config import settings_from_dict
from tests.harness import UPSTREAM_KEYS, MockUpstream, proxy_config


@pytest.fixture()
def settings_env(redis_url: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "BASE_KEY": UPSTREAM_KEYS["base"], "FT_KEY": UPSTREAM_KEYS["finetuned"]}


@pytest.fixture()
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()


class TestApp:
    def test_dispatch(self, upstreams: tuple[MockUpstream, MockUpstream], settings_env: dict[str, str]) -> None:
        """/v1 goes to the raw handler, the rest to FastAPI; both answers carry x-request-id."""
        app = create_app(settings_from_dict(proxy_config(*upstreams), settings_env))
        with TestClient(app) as client:
            models = client.get("/v1/models")
            health = client.get("/healthz")
        assert {m["id"] for m in models.json()["data"]} == {"sales-companion", "gpt-4o-mini"}
        assert health.json() == {"status": "ok"}
        assert models.headers["x-request-id"] and health.headers["x-request-id"]

    def test_serving_app_freezes_startup_heap(
        self, upstreams: tuple[MockUpstream, MockUpstream], settings_env: dict[str, str], unfreeze: None
    ) -> None:
        """With freeze_gc the lifespan moves the start-up heap out of the collector's reach."""
        gc.unfreeze()
        app = create_app(settings_from_dict(proxy_config(*upstreams), settings_env), freeze_gc=True)
        with TestClient(app):
            assert gc.get_freeze_count() > 10_000

    def test_test_apps_do_not_freeze(
        self, upstreams: tuple[MockUpstream, MockUpstream], settings_env: dict[str, str]
    ) -> None:
        """Without freeze_gc (tests, embedding) nothing is frozen: frozen cyclic garbage is never freed."""
        gc.unfreeze()
        app = create_app(settings_from_dict(proxy_config(*upstreams), settings_env))
        with TestClient(app):
            assert gc.get_freeze_count() == 0
