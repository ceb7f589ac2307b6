"""A first end-to-end check that the harness and the proxy work together."""

import openai

from tests.harness import ProxyServer


def test_chat_through_proxy(proxy: ProxyServer) -> None:
    """The official client gets an answer from the control upstream at 0 %."""
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="client-key")
    raw = client.chat.completions.with_raw_response.create(
        model="sales-companion", messages=[{"role": "user", "content": "hello"}], user="alice"
    )
    completion = raw.parse()
    assert "[base]" in (completion.choices[0].message.content or "")
    assert raw.headers["x-abproxy-variant"] == "control"
