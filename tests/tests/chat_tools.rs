//! Tool calls, reasoning and structured output through a live router, on the fixture model with chat templates in
//! the Qwen3.5 (XML calls, `<think>` opened in the prompt) and Hermes (JSON calls) conventions.
//!
//! The fixture's weights are random, so the model never chooses to call a tool by itself; `tool_choice: "required"`
//! and the output constraints make it, and every such output is checked against the tools' and formats' schemas,
//! for many seeds, streamed and not. Unconstrained greedy output is checked against the raw completion of the same
//! prompt: the reasoning split must give back exactly the model's text.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use moe_e2e::{fixture, RouterProcess};
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let resp = client().post(format!("{url}{path}")).json(body).send().await.expect("sent");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The JSON chunks of a streamed response, `[DONE]` excluded (and checked last).
async fn chunks(url: &str, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let resp = client().post(format!("{url}/v1/chat/completions")).json(&body).send().await.expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("body");
    let data: Vec<&str> = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("a JSON chunk")).collect()
}

/// The fixture model with `template` as its chat template, in a folder of its own.
fn model_with(template: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).expect("mkdir");
    for entry in std::fs::read_dir(fixture("qwen35")).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy");
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/templates").join(template);
    std::fs::copy(source, model.join("chat_template.jinja")).expect("template");
    (dir, model)
}

fn start(model: &Path, extra: &[&str]) -> RouterProcess {
    let mut args = vec!["--served-model-name", "qwen35"];
    args.extend_from_slice(extra);
    RouterProcess::start(model, &args).expect("router starts")
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "metric": {"type": "boolean"},
                "note": {"type": "string", "maxLength": 6}},
            "required": ["city", "days"]}}},
        {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
    ])
}

/// A call's arguments hold what its tool's schema allows.
fn check_call(name: &str, arguments: &str) {
    let args: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments:?}: {e}"));
    match name {
        "get_weather" => {
            assert!(matches!(args["city"].as_str(), Some("Paris" | "Oslo")), "{args}");
            assert!(args["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)), "{args}");
            assert!(args.get("metric").is_none_or(Value::is_boolean), "{args}");
            assert!(args.get("note").is_none_or(|n| n.as_str().is_some_and(|n| n.chars().count() <= 6)), "{args}");
            let known = ["city", "days", "metric", "note"];
            assert!(args.as_object().expect("object").keys().all(|k| known.contains(&k.as_str())), "{args}");
        }
        "ping" => assert_eq!(args, json!({})),
        other => panic!("a call of {other:?}, which is not a tool"),
    }
}

/// One streamed call put together: (id, name, arguments).
type Call = (String, String, String);

/// A streamed answer put together as OpenAI's clients do: its calls by index, finish reason, content, reasoning.
fn streamed_calls(chunks: &[Value]) -> (Vec<Call>, Option<String>, String, String) {
    let mut calls: Vec<Call> = Vec::new();
    let (mut finish, mut content, mut reasoning) = (None, String::new(), String::new());
    for c in chunks {
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        content.push_str(delta["content"].as_str().unwrap_or_default());
        reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or_default());
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().expect("index") as usize;
            if index == calls.len() {
                calls.push(Default::default());
            }
            let entry = &mut calls[index];
            if let Some(id) = call["id"].as_str() {
                entry.0 = id.to_owned();
            }
            if let Some(name) = call["function"]["name"].as_str() {
                entry.1.push_str(name);
            }
            entry.2.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    (calls, finish, content, reasoning)
}

/// A chat request, thinking off: a constraint holds from the end of the reasoning on, and random weights would
/// reason until `max_tokens` (the template closes the block itself when thinking is off).
fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "qwen35",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "max_tokens": 400,
        "chat_template_kwargs": {"enable_thinking": false},
    });
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

async fn required_calls_are_valid(url: &str, seeds: u64) {
    for seed in 0..seeds {
        let body = chat(json!({"tools": tools(), "tool_choice": "required", "temperature": 1.0, "seed": seed}));
        let (status, done) = post(url, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{done}");
        let choice = &done["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{done}");
        let message = &choice["message"];
        assert_eq!(message["content"], Value::Null, "{done}");
        assert!(message.get("reasoning_content").is_none(), "no reasoning when thinking is off: {done}");
        let calls = message["tool_calls"].as_array().expect("tool_calls");
        assert!(!calls.is_empty());
        for call in calls {
            assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{call}");
            assert_eq!(call["type"], "function");
            check_call(
                call["function"]["name"].as_str().expect("name"),
                call["function"]["arguments"].as_str().expect("text"),
            );
        }
        // Streamed with the same seed: the same calls, in chunks.
        let (streamed, finish, content, reasoning) = streamed_calls(&chunks(url, &body).await);
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        assert_eq!((content.as_str(), reasoning.as_str()), ("", ""));
        let same: Vec<(String, String)> = streamed.iter().map(|(_, n, a)| (n.clone(), a.clone())).collect();
        let want: Vec<(String, String)> = calls
            .iter()
            .map(|c| {
                (
                    c["function"]["name"].as_str().unwrap_or_default().to_owned(),
                    c["function"]["arguments"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(same, want, "seed {seed}");
        assert!(streamed.iter().all(|(id, _, _)| id.starts_with("call_")));
    }
    // A named function, and one call only.
    for seed in 0..3 {
        let body = chat(json!({"tools": tools(), "temperature": 1.0, "seed": seed, "parallel_tool_calls": false,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}));
        let (status, done) = post(url, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{done}");
        let calls = done["choices"][0]["message"]["tool_calls"].as_array().expect("tool_calls").clone();
        assert_eq!(calls.len(), 1, "{done}");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        check_call("get_weather", calls[0]["function"]["arguments"].as_str().expect("text"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn required_tool_calls_are_valid_calls_in_qwen35_xml_streamed_or_not() {
    let (_dir, model) = model_with("qwen35-tools.jinja");
    let router = start(&model, &[]);
    required_calls_are_valid(router.url(), 4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn required_tool_calls_are_valid_calls_in_hermes_json() {
    let (_dir, model) = model_with("hermes-tools.jinja");
    let router = start(&model, &[]);
    required_calls_are_valid(router.url(), 2).await;
    // The flag overrides the template: calls read (and constrained) in the XML form instead.
    drop(router);
    let router = start(&model, &["--tool-call-parser", "qwen3_xml"]);
    let body = chat(json!({"tools": tools(), "tool_choice": "required", "temperature": 0}));
    let (status, done) = post(router.url(), "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["choices"][0]["finish_reason"], "tool_calls", "{done}");
    let router = start(&model, &["--tool-call-parser", "none"]);
    let (status, done) = post(router.url(), "/v1/chat/completions", &body).await;
    assert_eq!(status, 400, "{done}");
    assert_eq!(done["error"]["param"], "tool_choice");
}

/// The answer the server gives with reasoning split must be the model's own text, cut at `</think>`: the raw greedy
/// completion of the same prompt ids.
#[tokio::test(flavor = "multi_thread")]
async fn reasoning_is_split_from_the_answer_and_enable_thinking_reaches_the_template() {
    let (_dir, model) = model_with("qwen35-tools.jinja");
    let router = start(&model, &[]);
    let url = router.url();
    for (kwargs, thinking) in [(json!({}), true), (json!({"enable_thinking": false}), false)] {
        let messages = json!([{"role": "user", "content": "Why is the sky blue?"}]);
        let (status, tokens) =
            post(url, "/tokenize", &json!({"messages": messages, "chat_template_kwargs": kwargs})).await;
        assert_eq!(status, 200, "{tokens}");
        let (_, rendered) = post(url, "/detokenize", &json!({"tokens": tokens["tokens"]})).await;
        let rendered = rendered["prompt"].as_str().expect("text").to_owned();
        assert_eq!(rendered.ends_with("<think>\n"), thinking, "{rendered:?}");
        let (_, raw) = post(
            url,
            "/v1/completions",
            &json!({"prompt": tokens["tokens"], "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        let raw = raw["choices"][0]["text"].as_str().expect("text").to_owned();
        assert!(!raw.contains("</think>") && !raw.contains("<tool_call>"), "{raw:?}");
        let body = json!({"messages": messages, "max_tokens": 24, "temperature": 0, "ignore_eos": true,
                          "chat_template_kwargs": kwargs});
        let (status, done) = post(url, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{done}");
        let message = &done["choices"][0]["message"];
        let (_, _, content, reasoning) = streamed_calls(&chunks(url, &body).await);
        if thinking {
            assert_eq!(message["reasoning_content"].as_str(), Some(raw.as_str()), "{done}");
            assert_eq!(message["content"], "", "{done}");
            assert_eq!((reasoning.as_str(), content.as_str()), (raw.as_str(), ""));
        } else {
            assert!(message.get("reasoning_content").is_none(), "{done}");
            assert_eq!(message["content"].as_str(), Some(raw.as_str()), "{done}");
            assert_eq!((reasoning.as_str(), content.as_str()), ("", raw.as_str()));
        }
    }
    // With the reasoning parser off, everything is content.
    drop(router);
    let router = start(&model, &["--reasoning-parser", "none"]);
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let (_, done) = post(router.url(), "/v1/chat/completions", &body).await;
    assert!(done["choices"][0]["message"].get("reasoning_content").is_none(), "{done}");
    assert!(!done["choices"][0]["message"]["content"].as_str().unwrap_or_default().is_empty(), "{done}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_results_and_earlier_calls_are_rendered_through_the_template() {
    let (_dir, model) = model_with("qwen35-tools.jinja");
    let router = start(&model, &[]);
    let url = router.url();
    let messages = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "reasoning_content": "Look it up.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"},
        {"role": "tool", "tool_call_id": "call_2", "content": "dry"},
    ]);
    let (status, tokens) = post(url, "/tokenize", &json!({"messages": messages, "tools": tools()})).await;
    assert_eq!(status, 200, "{tokens}");
    let (_, text) = post(url, "/detokenize", &json!({"tokens": tokens["tokens"]})).await;
    let text = text["prompt"].as_str().expect("text");
    for part in [
        "<tools>\n{\"function\":{\"description\":\"The weather in a city.\"",
        "<|im_start|>assistant\n<think>\nLook it up.\n</think>\n\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>",
        "<|im_start|>user\n<tool_response>\n12 degrees\n</tool_response>\n<tool_response>\ndry\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n",
    ] {
        assert!(text.contains(part), "{part:?} not in\n{text}");
    }
    // The whole conversation runs, and a final answer comes back.
    let (status, done) =
        post(url, "/v1/chat/completions", &json!({"messages": messages, "tools": tools(), "max_tokens": 8})).await;
    assert_eq!(status, 200, "{done}");
    // Bad tool fields are refused naming the field.
    for (body, param) in [
        (
            json!({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}), "messages[0].tool_calls"),
        (json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}), "tool_choice"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tools": []}}),
            "chat_template_kwargs",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "guided_regex": "a", "guided_choice": ["b"]}),
            "guided_choice",
        ),
    ] {
        let (status, e) = post(url, "/v1/chat/completions", &body).await;
        assert!(status == 400 || status == 422, "{status} {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_schema_choice_and_regex_outputs_hold_for_many_seeds() {
    let (_dir, model) = model_with("qwen35-tools.jinja");
    let router = start(&model, &[]);
    let url = router.url();
    let schema = json!({"type": "object", "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["answer", "confidence", "tags"], "additionalProperties": false});
    for seed in 0..12 {
        let body = chat(json!({"temperature": 1.0, "seed": seed, "response_format": {"type": "json_schema",
            "json_schema": {"name": "verdict", "strict": true, "schema": schema}}}));
        let (status, done) = post(url, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{done}");
        let message = &done["choices"][0]["message"];
        assert_eq!(done["choices"][0]["finish_reason"], "stop", "{done}");
        assert!(message.get("reasoning_content").is_none(), "{done}");
        let v: Value = serde_json::from_str(message["content"].as_str().expect("content")).expect("JSON");
        assert!(matches!(v["answer"].as_str(), Some("yes" | "no" | "maybe")), "{v}");
        assert!(v["confidence"].as_u64().is_some_and(|c| c <= 100), "{v}");
        let tags = v["tags"].as_array().expect("tags");
        assert!(tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"), "{v}");
        assert_eq!(v.as_object().expect("object").len(), 3, "{v}");
    }
    // With thinking on, the model reasons first, unconstrained (random weights never close the block, so the
    // answer runs out of tokens inside it), as vLLM with a reasoning parser does.
    let mut body = chat(json!({"temperature": 0, "max_tokens": 24, "response_format": {"type": "json_schema",
        "json_schema": {"name": "verdict", "strict": true, "schema": schema}}}));
    body["chat_template_kwargs"] = json!({});
    let (status, done) = post(url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["choices"][0]["finish_reason"], "length", "{done}");
    let message = &done["choices"][0]["message"];
    assert!(message["reasoning_content"].as_str().is_some_and(|r| !r.is_empty()), "{done}");
    assert!(message["content"].as_str().unwrap_or_default().is_empty(), "{done}");
    assert_eq!(done["usage"]["completion_tokens"], 24, "{done}");
    // vLLM's spellings on /v1/completions.
    for seed in 0..6 {
        let (_, done) = post(
            url,
            "/v1/completions",
            &json!({"prompt": "Pick:", "max_tokens": 20, "temperature": 1.0, "seed": seed,
            "guided_choice": ["red", "green", "blue"]}),
        )
        .await;
        let text = done["choices"][0]["text"].as_str().expect("text");
        assert!(["red", "green", "blue"].contains(&text), "{done}");
        let (_, done) = post(
            url,
            "/v1/completions",
            &json!({"prompt": "Code:", "max_tokens": 20, "temperature": 1.0, "seed": seed,
            "structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}}),
        )
        .await;
        let text = done["choices"][0]["text"].as_str().expect("text");
        let b = text.as_bytes();
        assert!(
            b.len() == 6
                && b[..3].iter().all(u8::is_ascii_uppercase)
                && b[3] == b'-'
                && b[4..].iter().all(u8::is_ascii_digit),
            "{done}"
        );
    }
}

#[test]
fn the_openai_python_client_calls_tools_and_gets_a_final_answer() {
    let Some(python) = moe_e2e::openai_python() else { return };
    let (_dir, model) = model_with("qwen35-tools.jinja");
    let router = start(&model, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_tools.py");
    let out = Command::new(&python).args([script, router.url(), "qwen35"]).output().expect("python runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}\nrouter log:\n{}", router.log_text());
    eprintln!("{stdout}");
}
