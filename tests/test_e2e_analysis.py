"""The whole analysis path with real parts: openai client -> proxy -> Redis Stream -> `abproxy collect`
-> PostgreSQL -> GET /admin/experiments/{name}/report."""

from __future__ import annotations

import random
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa

from proxy.store.db import engine_for
from proxy.store.schema import feedback, requests
from tests.harness import MockUpstream, PostgresServer, Process, ProxyServer, outcomes_config, wait_until

EXPERIMENT = "sales-companion"
USERS = 160
TRUE_RATE = {"control": 0.45, "treatment": 0.85}  # an effect a study of this size cannot miss


@pytest.fixture()
def store(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"e2e_{uuid.uuid4().hex[:12]}"
    yield postgres_server.create_schema(name)
    postgres_server.drop_schema(name)


def test_outcomes_flow_from_users_to_the_report(
    upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path, store: str
) -> None:
    config = outcomes_config(*upstreams)
    config["experiments"][EXPERIMENT]["analysis"] = {"primary_metric": "task_completed", "mde": 0.1,
                                                     "planned_users_per_variant": 50}
    proxy = ProxyServer(config, tmp_path, redis_url, extra_env={"ABPROXY_STORE_URL": store})
    proxy.start()
    config_file = str(tmp_path / f"proxy-{proxy.port}.yaml")
    collector = Process("collector", [sys.executable, "-m", "proxy", "collect", "--config", config_file,
                                      "--consumer", "e2e"], tmp_path, {"REDIS_URL": redis_url,
                                                                       "ABPROXY_STORE_URL": store})
    collector.start()
    engine = engine_for(store)
    try:
        proxy.set_percent(50)
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-app", max_retries=0)
        rng = random.Random(5)
        variants: dict[str, str] = {}
        for i in range(USERS):
            user = f"person-{i}@example.com"
            for turn in range(2):
                raw = client.chat.completions.with_raw_response.create(
                    model=EXPERIMENT, messages=[{"role": "user", "content": f"question {i}.{turn}"}], user=user,
                )
                variant = raw.headers["x-abproxy-variant"]
                variants[user] = variant
                completed = rng.random() < TRUE_RATE[variant]
                reply = client.post("/feedback", cast_to=httpx.Response, body={
                    "request_id": raw.headers["x-request-id"], "metric": "task_completed", "value": completed})
                assert reply.status_code == 202
            client.post("/feedback", cast_to=httpx.Response, body={"user_id": user, "metric": "returned",
                                                                   "value": rng.random() < 0.5})

        def stored() -> bool:
            with engine.connect() as conn:
                n_requests = conn.execute(sa.select(sa.func.count()).select_from(requests)).scalar_one()
                n_feedback = conn.execute(sa.select(sa.func.count()).select_from(feedback)).scalar_one()
            return bool(n_requests == 2 * USERS and n_feedback == 3 * USERS)

        wait_until(stored, timeout=30, what="the collector storing every request and feedback")

        with engine.connect() as conn:
            users = conn.execute(sa.select(requests.c.user_hash).distinct()).scalars().all()
            prompts = conn.execute(sa.select(sa.func.count()).where(requests.c.prompt.is_not(None))).scalar_one()
        assert len(users) == USERS and not any("@" in u for u in users)  # hashed, never the raw id
        assert prompts == 0  # not stored unless the experiment says so

        with proxy.admin() as admin:
            body = admin.get(f"/admin/experiments/{EXPERIMENT}/report").json()
        treated = sum(v == "treatment" for v in variants.values())
        assert body["arms"]["treatment"]["users"] == treated
        assert body["arms"]["control"]["users"] == USERS - treated
        assert body["arms"]["control"]["requests"] + body["arms"]["treatment"]["requests"] == 2 * USERS
        assert body["srm"]["mismatch"] is False
        (task,) = [m for m in body["metrics"] if m["name"] == "task_completed"]
        assert task["significant"] and task["better"]
        assert task["diff_ci"][0] < TRUE_RATE["treatment"] - TRUE_RATE["control"] < task["diff_ci"][1]
        (returned,) = [m for m in body["metrics"] if m["name"] == "returned"]
        assert returned["control"]["users"] + returned["treatment"]["users"] == USERS

        collector.stop()
        assert collector.proc is not None and collector.proc.returncode == 0, collector.logs()
    finally:
        engine.dispose()
        collector.stop()
        proxy.stop()
