#!/usr/bin/env python3
"""Checks a running Flotilla scheduler with the official OpenAI Python SDK.

Usage: python3 scripts/sdk-smoke.py http://127.0.0.1:8080
Exits non-zero with a message on the first check that fails.
"""
import math
import sys

from openai import NotFoundError, OpenAI, BadRequestError


def main(base: str) -> None:
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)

    ids = sorted(m.id for m in client.models.list())
    assert "tiny-llama" in ids, ids

    r = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, seed=7, temperature=0.8
    )
    assert r.object == "chat.completion", r
    assert r.usage.completion_tokens == 10 or r.choices[0].finish_reason == "stop", r.usage
    again = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, seed=7, temperature=0.8
    )
    assert again.choices[0].message.content == r.choices[0].message.content, "same seed, same text"

    parts, usage = [], None
    for chunk in client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None and usage.prompt_tokens > 0, usage

    lp = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"top_k": 40, "repetition_penalty": 1.1},
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content), content

    c = client.completions.create(model="tiny-llama", prompt="Once", max_tokens=5)
    assert c.object == "text_completion", c

    if "minilm" in ids:
        e = client.embeddings.create(
            model="minilm", input=["A man is eating food.", "A man is eating a piece of bread."]
        )
        a, b = e.data[0].embedding, e.data[1].embedding
        assert len(a) == 384, len(a)
        cos = sum(x * y for x, y in zip(a, b))
        assert 0.70 < cos < 0.80, cos
        print(f"embeddings: 384 dims, cosine {cos:.3f}")

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except NotFoundError:
        pass
    try:
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "x"}], temperature=9
        )
        raise AssertionError("temperature 9 accepted")
    except BadRequestError:
        pass
    print(f"sdk smoke: ok (models {ids}, streamed {len(parts)} chunks)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080")
