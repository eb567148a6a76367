"""Drives a moe-mesh router with the official OpenAI Python client, as operators' clients do.

Usage: python openai_client.py BASE_URL API_KEY MODEL. Exits non-zero with the failed check on stderr.
"""

import sys

import openai
from openai import OpenAI


def main() -> None:
    base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)

    assert [m.id for m in client.models.list().data] == [model]

    greedy = dict(model=model, prompt="The quick brown fox", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    done = client.completions.create(**greedy)
    text = done.choices[0].text
    assert done.object == "text_completion", done
    assert done.usage.completion_tokens == 12, done.usage
    assert done.choices[0].finish_reason == "length"

    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **greedy) if c.choices)
    assert streamed == text, (streamed, text)

    with_logprobs = client.completions.create(logprobs=3, **greedy)
    lp = with_logprobs.choices[0].logprobs
    assert len(lp.tokens) == 12 and len(lp.token_logprobs) == 12 and len(lp.top_logprobs[0]) == 3, lp

    chat = dict(model=model, messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hello!"}],
                max_completion_tokens=10, temperature=0, seed=3)
    reply = client.chat.completions.create(**chat)
    assert reply.choices[0].message.role == "assistant"
    content = reply.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    several = client.chat.completions.create(n=3, **{**chat, "temperature": 1.0})
    assert [c.index for c in several.choices] == [0, 1, 2]

    try:
        client.completions.create(model=model, prompt="x", temperature=-1)
        raise AssertionError("temperature -1 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body
    try:
        client.completions.create(model="not-this-one", prompt="x")
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError:
        pass
    try:
        OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass
    print(f"openai {openai.__version__}: all checks passed")


if __name__ == "__main__":
    main()
