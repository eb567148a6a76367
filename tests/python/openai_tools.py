"""The tool-calling flow of the official OpenAI Python client against a moe-mesh router: a required call, the tool's
result sent back, a final answer; the same call streamed; a JSON-schema answer validated with `jsonschema` when
installed.

Usage: python openai_tools.py BASE_URL MODEL. Exits non-zero with the failed check on stderr.
"""

import json
import sys

from openai import OpenAI

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
        },
    },
}]


def check_arguments(text):
    args = json.loads(text)
    assert args["city"] in ("Paris", "Oslo"), args
    assert 1 <= args["days"] <= 7, args
    return args


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris for two days?"}]
    # Constraints hold from the end of the reasoning on, and random weights never end it: thinking off.
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}

    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                           temperature=0.8, seed=3, max_tokens=400, extra_body=no_thinking)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", first
    calls = choice.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].function.name == "get_weather", first
    args = check_arguments(calls[0].function.arguments)
    print("call:", calls[0].function.name, args)

    # The assistant's turn as the client gives it back, then the tool's result.
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 12})})
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=16,
                                           extra_body=no_thinking)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls"), final
    assert answer.message.content is not None or answer.message.tool_calls, final
    assert final.usage.prompt_tokens > first.usage.prompt_tokens, (final.usage, first.usage)
    print("final:", answer.finish_reason, repr(answer.message.content))

    # The same call, streamed: deltas put together by index.
    stream = client.chat.completions.create(model=model, messages=messages[:1], tools=TOOLS, tool_choice="required",
                                            temperature=0.8, seed=3, max_tokens=400, stream=True,
                                            extra_body=no_thinking)
    names, arguments, finish = {}, {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            if call.function and call.function.name:
                names[call.index] = names.get(call.index, "") + call.function.name
            if call.function and call.function.arguments:
                arguments[call.index] = arguments.get(call.index, "") + call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls", finish
    assert names[0] == "get_weather", names
    assert check_arguments(arguments[0]) == args, (arguments, args)
    print("streamed:", names, arguments)

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}
    structured = client.chat.completions.create(
        model=model, messages=messages[:1], temperature=1.0, seed=5, max_tokens=200, extra_body=no_thinking,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    value = json.loads(structured.choices[0].message.content)
    try:
        import jsonschema
        jsonschema.validate(value, schema)
    except ImportError:
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9, value
    print("json_schema:", value)


if __name__ == "__main__":
    main()
