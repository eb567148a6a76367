//! The chat request's tools, tool choice, template variables and output constraints, read and checked; and the
//! grammar that makes `tool_choice: "required"` (or a named function) produce a valid call.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::parse::{Fields, Intake};
use crate::guide::{compact, lark_string, GuideSpec};
use crate::output::{ToolFormat, ToolSpec};

/// Most tools one request may declare.
pub(super) const MAX_TOOLS: usize = 256;
/// Most calls one assistant message may carry back.
pub(super) const MAX_TOOL_CALLS: usize = 256;

/// How the server reads chat output: set at start from the template and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChatParsers {
    /// The tool-call form; `None` turns tool parsing off.
    pub tool_format: Option<ToolFormat>,
    /// Split `<think>…</think>` into `reasoning_content`.
    pub reasoning: bool,
}

impl ChatParsers {
    /// What a template teaches: its tool-call form, and reasoning when it writes `<think>`.
    pub fn of_template(template: Option<&moe_model::ChatTemplate>) -> Self {
        let source = template.map(moe_model::ChatTemplate::source).unwrap_or_default();
        ChatParsers { tool_format: ToolFormat::of_template(source), reasoning: source.contains("<think>") }
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

/// The request's tools, as the template sees them and as calls are read.
#[derive(Debug, Clone)]
pub(super) struct Tools {
    /// The `tools` list as given (each checked).
    pub(super) list: Vec<Value>,
    pub(super) specs: Vec<ToolSpec>,
    pub(super) choice: ToolChoice,
    pub(super) parallel: bool,
}

pub(super) fn parse_tools(f: &Fields<'_>) -> Result<Option<Tools>, ApiError> {
    let list = match f.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) if list.len() > MAX_TOOLS => {
            return Err(ApiError::invalid("tools", format!("at most {MAX_TOOLS} tools, got {}", list.len())))
        }
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(ApiError::schema("tools", "`tools` must be a list")),
    };
    let mut specs = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let field = |k: &str| format!("tools[{i}].{k}");
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            _ => return Err(ApiError::invalid(&field("type"), "only tools of type \"function\" are supported")),
        }
        let function = tool
            .get("function")
            .filter(|v| v.is_object())
            .ok_or_else(|| ApiError::schema(&field("function"), "each tool needs a `function` object"))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::schema(&field("function.name"), "each function needs a string `name`"))?;
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(ApiError::invalid(
                &field("function.name"),
                format!("{name:?}: a function name is 1 to 64 of a-z, A-Z, 0-9, '_', '-' and '.'"),
            ));
        }
        if specs.iter().any(|s: &ToolSpec| s.name == name) {
            return Err(ApiError::invalid(&field("function.name"), format!("function {name:?} is declared twice")));
        }
        match function.get("parameters") {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => {
                return Err(ApiError::schema(
                    &field("function.parameters"),
                    "`parameters` must be a JSON schema object",
                ))
            }
        }
        specs.extend(ToolSpec::of_tool(tool));
    }
    let choice = match f.get("tool_choice") {
        None | Some(Value::Null) => {
            if list.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("{other:?}: one of \"none\", \"auto\", \"required\", or a named function"),
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).ok_or_else(|| {
                ApiError::schema("tool_choice.function.name", "a named tool choice needs `function.name`")
            })?;
            if !specs.iter().any(|s| s.name == name) {
                return Err(ApiError::invalid("tool_choice.function.name", format!("no tool named {name:?} is given")));
            }
            ToolChoice::Function(name.to_owned())
        }
        Some(_) => return Err(ApiError::schema("tool_choice", "`tool_choice` must be a string or an object")),
    };
    if list.is_empty() {
        if matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) {
            return Err(ApiError::invalid("tool_choice", "`tool_choice` asks for a tool, and no `tools` are given"));
        }
        return Ok(None);
    }
    let parallel = f.bool("parallel_tool_calls")?.unwrap_or(true);
    Ok(Some(Tools { list, specs, choice, parallel }))
}

/// Names the template itself sets; `chat_template_kwargs` may not replace them.
const RESERVED: &[&str] = &["messages", "tools", "add_generation_prompt", "bos_token", "eos_token"];

/// `chat_template_kwargs` (vLLM's): extra template variables, `enable_thinking` among them.
pub(super) fn parse_template_kwargs(f: &Fields<'_>) -> Result<Map<String, Value>, ApiError> {
    match f.get("chat_template_kwargs") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| RESERVED.contains(&k.as_str())) {
                return Err(ApiError::invalid(
                    "chat_template_kwargs",
                    format!("{k:?} is set by the server and cannot be passed to the template"),
                ));
            }
            Ok(o.clone())
        }
        Some(_) => Err(ApiError::schema("chat_template_kwargs", "`chat_template_kwargs` must be an object")),
    }
}

/// An assistant message's `tool_calls`, as the template reads them: each call's `arguments` as an object (Qwen's
/// templates iterate over them), not the JSON text the API carries.
pub(super) fn message_tool_calls(i: usize, calls: &Value) -> Result<Value, ApiError> {
    let field = |j: usize, k: &str| format!("messages[{i}].tool_calls[{j}].{k}");
    let list = calls
        .as_array()
        .ok_or_else(|| ApiError::schema(&format!("messages[{i}].tool_calls"), "`tool_calls` must be a list"))?;
    if list.len() > MAX_TOOL_CALLS {
        return Err(ApiError::invalid(
            &format!("messages[{i}].tool_calls"),
            format!("at most {MAX_TOOL_CALLS} calls, got {}", list.len()),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (j, call) in list.iter().enumerate() {
        let function = call
            .get("function")
            .filter(|v| v.is_object())
            .ok_or_else(|| ApiError::schema(&field(j, "function"), "each tool call needs a `function` object"))?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::schema(&field(j, "function.name"), "each tool call needs a string name"))?;
        let arguments = match function.get("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
            Some(Value::String(s)) => {
                serde_json::from_str::<Value>(s).ok().filter(Value::is_object).ok_or_else(|| {
                    ApiError::invalid(&field(j, "function.arguments"), "`arguments` must be a JSON object's text")
                })?
            }
            Some(o @ Value::Object(_)) => o.clone(),
            Some(_) => {
                return Err(ApiError::schema(&field(j, "function.arguments"), "`arguments` must be a string of JSON"))
            }
        };
        let mut c = Map::new();
        if let Some(id) = call.get("id").and_then(Value::as_str) {
            c.insert("id".into(), Value::String(id.to_owned()));
        }
        c.insert("type".into(), Value::String("function".into()));
        c.insert("function".into(), serde_json::json!({"name": name, "arguments": arguments}));
        out.push(Value::Object(c));
    }
    Ok(Value::Array(out))
}

/// The output constraint a request asks for, if any: `response_format`, vLLM's `structured_outputs` or its older
/// `guided_*` fields. More than one is refused.
pub(super) fn parse_constraint(f: &Fields<'_>) -> Result<Option<(GuideSpec, &'static str)>, ApiError> {
    let mut found: Vec<(GuideSpec, &'static str)> = Vec::new();
    match f.get("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => found.push((GuideSpec::JsonObject, "response_format")),
            Some("json_schema") => {
                let schema = o.get("json_schema").and_then(|j| j.get("schema")).ok_or_else(|| {
                    ApiError::schema("response_format.json_schema.schema", "a `json_schema` format needs `schema`")
                })?;
                found.push((
                    GuideSpec::JsonSchema(schema_value(schema, "response_format.json_schema.schema")?),
                    "response_format",
                ));
            }
            _ => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    "one of \"text\", \"json_object\" and \"json_schema\"",
                ))
            }
        },
        Some(_) => return Err(ApiError::schema("response_format", "`response_format` must be an object")),
    }
    let structured = match f.get("structured_outputs") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o),
        Some(_) => return Err(ApiError::schema("structured_outputs", "`structured_outputs` must be an object")),
    };
    // Each kind, under vLLM's two spellings: `structured_outputs.K` and `guided_K`.
    for (key, old) in
        [("json", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice"), ("grammar", "guided_grammar")]
    {
        let given = [(structured.and_then(|o| o.get(key)), "structured_outputs"), (f.get(old), old)];
        for (value, param) in given {
            let Some(value) = value.filter(|v| !v.is_null()) else { continue };
            let spec = match key {
                "json" => GuideSpec::JsonSchema(schema_value(value, param)?),
                "regex" => GuideSpec::Regex(
                    value.as_str().ok_or_else(|| ApiError::schema(param, "a regex must be a string"))?.to_owned(),
                ),
                "choice" => {
                    let list = value
                        .as_array()
                        .filter(|l| !l.is_empty())
                        .and_then(|l| l.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| ApiError::schema(param, "a choice must be a non-empty list of strings"))?;
                    GuideSpec::Choice(list)
                }
                _ => GuideSpec::Lark(
                    value.as_str().ok_or_else(|| ApiError::schema(param, "a grammar must be a string"))?.to_owned(),
                ),
            };
            found.push((spec, param));
        }
    }
    if let Some(o) = structured {
        if o.get("json_object").and_then(Value::as_bool) == Some(true) {
            found.push((GuideSpec::JsonObject, "structured_outputs"));
        }
    }
    if found.len() > 1 {
        return Err(ApiError::invalid(found[1].1, "only one output constraint may be given per request"));
    }
    Ok(found.pop())
}

/// A schema given as an object, or as its JSON text (vLLM accepts both).
fn schema_value(v: &Value, param: &str) -> Result<Value, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(|v| v.is_object() || v.is_boolean())
            .ok_or_else(|| ApiError::invalid(param, "the schema's text is not a JSON object")),
        _ => Err(ApiError::schema(param, "a JSON schema must be an object")),
    }
}

/// The grammar of a valid answer to `tool_choice: "required"` or a named function: one call (or, with parallel calls,
/// one or more) of the allowed tools in the template's form, each argument valid under its schema.
pub(super) fn tool_grammar(tools: &Tools, format: ToolFormat) -> GuideSpec {
    let allowed: Vec<&Value> = tools
        .list
        .iter()
        .filter(|t| match &tools.choice {
            ToolChoice::Function(name) => {
                t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) == Some(name)
            }
            _ => true,
        })
        .collect();
    let mut rules = Vec::new();
    let mut functions = Vec::new();
    for (i, tool) in allowed.iter().enumerate() {
        let function = &tool["function"];
        let name = function["name"].as_str().unwrap_or_default();
        let mut params = function.get("parameters").cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
        // A call names only the parameters its tool declares, unless the schema says otherwise.
        if let Some(o) = params.as_object_mut() {
            o.entry("additionalProperties").or_insert(Value::Bool(false));
        }
        let rule = format!("f{i}");
        match format {
            ToolFormat::Hermes => {
                let call = serde_json::json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": params},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                });
                rules.push(format!("{rule}: %json {}", compact(call)));
            }
            ToolFormat::Xml => {
                let props = params.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
                let required: Vec<&str> = params
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut body = vec![lark_string(&format!("<function={name}>\n"))];
                for (j, (key, schema)) in props.iter().enumerate() {
                    let value_rule = format!("f{i}p{j}");
                    rules.push(format!("{value_rule}: {}", xml_value(schema)));
                    let item = format!(
                        "{} {value_rule} {}",
                        lark_string(&format!("<parameter={key}>\n")),
                        lark_string("\n</parameter>\n")
                    );
                    body.push(if required.contains(&key.as_str()) { item } else { format!("({item})?") });
                }
                body.push(lark_string("</function>\n"));
                rules.push(format!("{rule}: {}", body.join(" ")));
            }
        }
        functions.push(rule);
    }
    let (open, close) = match format {
        ToolFormat::Xml => ("<tool_call>\n", "</tool_call>"),
        ToolFormat::Hermes => ("<tool_call>\n", "\n</tool_call>"),
    };
    let call = format!("call: {} ({}) {}", lark_string(open), functions.join(" | "), lark_string(close));
    let calls = if tools.parallel { format!("call ({} call)*", lark_string("\n")) } else { "call".to_owned() };
    let mut grammar = vec![format!("start: {calls}"), call];
    grammar.extend(rules);
    GuideSpec::Lark(grammar.join("\n"))
}

/// One XML parameter's value: text for a string (one of its `enum` when given), JSON for anything else.
fn xml_value(schema: &Value) -> String {
    let is_string = schema.get("type").and_then(Value::as_str) == Some("string");
    if is_string {
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            let alts: Vec<String> = options.iter().filter_map(Value::as_str).map(lark_string).collect();
            if !alts.is_empty() {
                return alts.join(" | ");
            }
        }
        // Text that cannot end the parameter early; `maxLength` bounds it when given.
        let max = schema.get("maxLength").and_then(Value::as_u64);
        return match max {
            Some(n) => format!("/[^<]{{0,{n}}}/"),
            None => "/[^<]*/".to_owned(),
        };
    }
    format!("%json {}", compact(schema.clone()))
}

impl Intake<'_> {
    /// Whether the template and flags let this server read tool calls.
    pub(super) fn tool_format(&self) -> Option<ToolFormat> {
        self.parsers.tool_format
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guide::testing::{fixture_guides, run};
    use crate::output::parse_call;
    use serde_json::json;

    fn weather_tools(choice: ToolChoice, parallel: bool) -> Tools {
        let list = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                               "days": {"type": "integer", "minimum": 1, "maximum": 7},
                               "note": {"type": "string", "maxLength": 6}},
                "required": ["city", "days"]}}}),
            json!({"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}),
        ];
        let specs = list.iter().filter_map(ToolSpec::of_tool).collect();
        Tools { list, specs, choice, parallel }
    }

    /// Random logits under the grammar of a required call give a call of the given tools, in each form, that the
    /// output reader parses back with arguments inside their schemas.
    #[test]
    fn a_required_call_is_always_a_valid_call() {
        let (guides, tok) = fixture_guides();
        for format in [ToolFormat::Xml, ToolFormat::Hermes] {
            for choice in [ToolChoice::Required, ToolChoice::Function("get_weather".into())] {
                let tools = weather_tools(choice.clone(), false);
                let spec = tool_grammar(&tools, format);
                for seed in 0..8 {
                    let text = run(&guides, &tok, &spec, seed, 400)
                        .unwrap_or_else(|| panic!("{format:?} seed {seed}: no end"));
                    let body = text
                        .strip_prefix("<tool_call>")
                        .and_then(|t| t.strip_suffix("</tool_call>"))
                        .unwrap_or_else(|| panic!("{text:?}"));
                    let call = parse_call(format, &tools.specs, body).unwrap_or_else(|| panic!("{format:?}: {text:?}"));
                    if choice != ToolChoice::Required {
                        assert_eq!(call.name, "get_weather");
                    }
                    let args: Value = serde_json::from_str(&call.arguments).expect("arguments are JSON");
                    if call.name == "get_weather" {
                        assert!(matches!(args["city"].as_str(), Some("Paris" | "Oslo")), "{text:?}");
                        assert!(args["days"].as_i64().is_some_and(|d| (1..=7).contains(&d)), "{text:?}");
                        assert!(
                            args.get("note").is_none_or(|n| n.as_str().is_some_and(|n| n.chars().count() <= 6)),
                            "{text:?}"
                        );
                    } else {
                        assert_eq!(args, json!({}), "{text:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn tool_fields_are_checked() {
        let body = |v: Value| v.as_object().cloned().expect("object");
        let read = |v: Value| parse_tools(&Fields(&body(v))).map(|t| t.map(|t| (t.choice, t.parallel)));
        let tool = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(read(json!({})).expect("none"), None);
        assert_eq!(read(json!({"tools": [tool]})).expect("auto"), Some((ToolChoice::Auto, true)));
        assert_eq!(
            read(json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "f"}}, "parallel_tool_calls": false}))
                .expect("named"),
            Some((ToolChoice::Function("f".into()), false))
        );
        for (bad, param) in [
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": [tool], "tool_choice": "sometimes"}), "tool_choice"),
            (
                json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice.function.name",
            ),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}), "tools[0].function.name"),
            (json!({"tools": [tool, tool]}), "tools[1].function.name"),
            (json!({"tools": {"f": 1}}), "tools"),
        ] {
            let e = read(bad.clone()).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        }
        let kw = |v: Value| parse_template_kwargs(&Fields(&body(v)));
        assert_eq!(
            kw(json!({"chat_template_kwargs": {"enable_thinking": false}})).expect("ok")["enable_thinking"],
            json!(false)
        );
        assert!(kw(json!({"chat_template_kwargs": {"messages": []}})).is_err());
        let c = |v: Value| parse_constraint(&Fields(&body(v)));
        assert_eq!(c(json!({"response_format": {"type": "text"}})).expect("ok"), None);
        assert!(matches!(
            c(json!({"guided_json": "{\"type\": \"object\"}"})).expect("ok"),
            Some((GuideSpec::JsonSchema(_), "guided_json"))
        ));
        assert!(matches!(
            c(json!({"structured_outputs": {"choice": ["a"]}})).expect("ok"),
            Some((GuideSpec::Choice(_), _))
        ));
        assert!(c(json!({"guided_regex": "a", "response_format": {"type": "json_object"}})).is_err());
        assert!(c(json!({"guided_choice": []})).is_err());
    }
}
