//! What a chat model's text means: reasoning (`<think>…</think>`), the answer, and tool calls, split as the text
//! arrives so that a stream can send each part as its own delta.
//!
//! Two tool-call forms are read, both inside `<tool_call>…</tool_call>`:
//! - [`ToolFormat::Xml`], Qwen3.5's: `<function=NAME>` then `<parameter=KEY>VALUE</parameter>` pairs, each value
//!   converted by the JSON-schema type the tool declares for it;
//! - [`ToolFormat::Hermes`], older Qwen templates': a JSON object `{"name": …, "arguments": {…}}`.
//!
//! A call is given out only once it is whole and valid (its function one of the request's tools). Anything else
//! between the tags comes back as text, tags included: a malformed call is never lost and never an error.
//! Text that might be the start of a tag is held back until the next piece tells.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// Which tool-call form the model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call><function=NAME><parameter=K>V</parameter></function></tool_call>` (Qwen3.5, Qwen3-Coder).
    Xml,
    /// `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>` (Hermes; Qwen2.5 and Qwen3).
    Hermes,
}

impl ToolFormat {
    /// The form a chat template teaches: Qwen3.5's templates show `<function=` in their instructions.
    pub fn of_template(source: &str) -> Option<ToolFormat> {
        if source.contains("<function=") {
            Some(ToolFormat::Xml)
        } else if source.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else {
            None
        }
    }
}

/// One tool of a request, as far as reading its calls needs: its name and each parameter's declared type.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    /// Parameter name to its JSON-schema `type` (the first one when a list is given); absent when not declared.
    pub types: HashMap<String, String>,
}

impl ToolSpec {
    /// Reads `{"type": "function", "function": {"name", "parameters": {"properties": …}}}`.
    pub fn of_tool(tool: &Value) -> Option<ToolSpec> {
        let function = tool.get("function")?;
        let name = function.get("name")?.as_str()?.to_owned();
        let mut types = HashMap::new();
        if let Some(props) = function.get("parameters").and_then(|p| p.get("properties")).and_then(Value::as_object) {
            for (key, schema) in props {
                let ty = match schema.get("type") {
                    Some(Value::String(t)) => Some(t.clone()),
                    Some(Value::Array(list)) => {
                        list.iter().filter_map(Value::as_str).find(|t| *t != "null").map(str::to_owned)
                    }
                    _ => None,
                };
                if let Some(ty) = ty {
                    types.insert(key.clone(), ty);
                }
            }
        }
        Some(ToolSpec { name, types })
    }
}

/// A parsed tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON object's text, as OpenAI's `function.arguments` carries them.
    pub arguments: String,
}

/// A part of the output, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Reasoning(String),
    Content(String),
    Call(ToolCall),
}

/// What the splitter looks for.
#[derive(Debug, Clone, Default)]
pub struct OutputConfig {
    /// The output begins inside reasoning: the prompt opened `<think>` (Qwen3.5's templates do), so only
    /// `</think>` is generated.
    pub in_reasoning: bool,
    /// Split `<think>…</think>` out at all; when false, reasoning stays in the content.
    pub reasoning: bool,
    /// Tool calls to read, in this form, for these tools.
    pub tools: Option<(ToolFormat, Vec<ToolSpec>)>,
}

impl OutputConfig {
    /// Whether the prompt leaves a `<think>` open for the model to close.
    pub fn prompt_opens_reasoning(prompt: &str) -> bool {
        match (prompt.rfind(THINK_OPEN), prompt.rfind(THINK_CLOSE)) {
            (Some(open), Some(close)) => open > close,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing seen yet: a leading `<think>` opens reasoning.
    Start,
    Reasoning,
    Content,
    /// Inside `<tool_call>`: the body is gathered until `</tool_call>`.
    Call,
}

/// Splits a model's text into [`Part`]s as it arrives.
#[derive(Debug)]
pub struct Splitter {
    config: OutputConfig,
    mode: Mode,
    /// Text not yet given out: a possible tag prefix, or a call's body.
    held: String,
    /// Characters to drop from the start of what comes next: the blank line after `</think>`, the white space
    /// between calls.
    skip: Option<fn(char) -> bool>,
    calls: usize,
}

impl Splitter {
    pub fn new(config: OutputConfig) -> Self {
        let mode = if config.reasoning && config.in_reasoning {
            Mode::Reasoning
        } else if config.reasoning {
            Mode::Start
        } else {
            Mode::Content
        };
        Splitter { config, mode, held: String::new(), skip: None, calls: 0 }
    }

    /// How many tool calls have been given out.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Reads the next piece of text.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        self.held.push_str(text);
        let mut out = Vec::new();
        self.run(&mut out, false);
        merge(out)
    }

    /// The text has ended: everything held is given out (an unclosed call is read as it stands, else as text).
    pub fn finish(&mut self) -> Vec<Part> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        let rest = std::mem::take(&mut self.held);
        match self.mode {
            Mode::Call => {
                self.close_call(&rest, false, &mut out);
            }
            Mode::Reasoning => emit(&mut out, Part::Reasoning(rest)),
            Mode::Start | Mode::Content => emit(&mut out, Part::Content(rest)),
        }
        merge(out)
    }

    fn tools(&self) -> bool {
        self.config.tools.is_some()
    }

    fn run(&mut self, out: &mut Vec<Part>, at_end: bool) {
        loop {
            if let Some(skip) = self.skip {
                let kept = self.held.trim_start_matches(skip).len();
                self.held.drain(..self.held.len() - kept);
                if self.held.is_empty() && !at_end {
                    return;
                }
                self.skip = None;
            }
            match self.mode {
                Mode::Start => {
                    let trimmed = self.held.trim_start();
                    if trimmed.starts_with(THINK_OPEN) {
                        let at = self.held.len() - trimmed.len() + THINK_OPEN.len();
                        self.held.drain(..at);
                        self.mode = Mode::Reasoning;
                    } else if !at_end && THINK_OPEN.starts_with(trimmed) {
                        return; // blank, or a prefix of `<think>`: wait
                    } else {
                        self.mode = Mode::Content;
                    }
                }
                Mode::Reasoning => {
                    let mut tags = vec![THINK_CLOSE];
                    if self.tools() {
                        tags.push(CALL_OPEN);
                    }
                    let Some((at, tag)) = self.find(&tags, at_end, out, Part::Reasoning) else { return };
                    self.held.drain(..at + tag.len());
                    if tag == CALL_OPEN {
                        // A call inside reasoning ends it (Qwen3.5 models do this when thinking is cut short).
                        self.mode = Mode::Call;
                    } else {
                        self.mode = Mode::Content;
                        // The templates put a blank line after `</think>`: it belongs to neither part.
                        self.skip = Some(|c| c == '\n');
                    }
                }
                Mode::Content => {
                    if !self.tools() {
                        emit(out, Part::Content(std::mem::take(&mut self.held)));
                        return;
                    }
                    let Some((at, tag)) = self.find(&[CALL_OPEN], at_end, out, Part::Content) else { return };
                    self.held.drain(..at + tag.len());
                    self.mode = Mode::Call;
                }
                Mode::Call => {
                    let Some(end) = self.held.find(CALL_CLOSE) else { return };
                    let body: String = self.held[..end].to_owned();
                    self.held.drain(..end + CALL_CLOSE.len());
                    if self.close_call(&body, true, out) {
                        self.skip = Some(char::is_whitespace);
                    }
                    self.mode = Mode::Content;
                }
            }
        }
    }

    /// Finds the first of `tags` in the held text and gives out what comes before it as `part`; without one, gives
    /// out all but a suffix that could begin a tag (everything, at the end) and returns `None`.
    fn find(
        &mut self,
        tags: &[&'static str],
        at_end: bool,
        out: &mut Vec<Part>,
        part: fn(String) -> Part,
    ) -> Option<(usize, &'static str)> {
        let first = tags.iter().filter_map(|t| self.held.find(t).map(|at| (at, *t))).min_by_key(|(at, _)| *at);
        if let Some((at, tag)) = first {
            let before: String = self.held[..at].to_owned();
            emit(out, part(before));
            self.held.drain(..at);
            return Some((0, tag));
        }
        let keep = if at_end { 0 } else { tags.iter().map(|t| partial_suffix(&self.held, t)).max().unwrap_or(0) };
        let cut = self.held.len() - keep;
        let text: String = self.held.drain(..cut).collect();
        emit(out, part(text));
        None
    }

    /// A call's body, read; when it is not a valid call, the text as it came (`closed`: with its end tag).
    fn close_call(&mut self, body: &str, closed: bool, out: &mut Vec<Part>) -> bool {
        let parsed = self.config.tools.as_ref().and_then(|(format, specs)| parse_call(*format, specs, body));
        match parsed {
            Some(call) => {
                self.calls += 1;
                out.push(Part::Call(call));
                true
            }
            None => {
                let mut text = format!("{CALL_OPEN}{body}");
                if closed {
                    text.push_str(CALL_CLOSE);
                }
                emit(out, Part::Content(text));
                false
            }
        }
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

fn emit(out: &mut Vec<Part>, part: Part) {
    match &part {
        Part::Reasoning(t) | Part::Content(t) if t.is_empty() => {}
        _ => out.push(part),
    }
}

/// Adjacent text parts of one kind, joined.
fn merge(parts: Vec<Part>) -> Vec<Part> {
    let mut out: Vec<Part> = Vec::with_capacity(parts.len());
    for p in parts {
        match (out.last_mut(), p) {
            (Some(Part::Reasoning(a)), Part::Reasoning(b)) | (Some(Part::Content(a)), Part::Content(b)) => {
                a.push_str(&b)
            }
            (_, p) => out.push(p),
        }
    }
    out
}

/// Reads one call's body in `format`; `None` when it is not a call of one of `specs`.
pub fn parse_call(format: ToolFormat, specs: &[ToolSpec], body: &str) -> Option<ToolCall> {
    match format {
        ToolFormat::Xml => parse_xml(specs, body),
        ToolFormat::Hermes => parse_hermes(specs, body),
    }
}

fn parse_hermes(specs: &[ToolSpec], body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    specs.iter().find(|s| s.name == name)?;
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok().filter(Value::is_object)?,
        Some(o @ Value::Object(_)) => o.clone(),
        Some(_) => return None,
    };
    Some(ToolCall { name: name.to_owned(), arguments: arguments.to_string() })
}

fn parse_xml(specs: &[ToolSpec], body: &str) -> Option<ToolCall> {
    let rest = body.trim().strip_prefix("<function=")?;
    let end = rest.find('>')?;
    let name = rest[..end].trim();
    let spec = specs.iter().find(|s| s.name == name)?;
    let mut rest = rest[end + 1..].trim_start();
    let mut args = Map::new();
    loop {
        if let Some(after) = rest.strip_prefix("</function>") {
            if !after.trim().is_empty() {
                return None;
            }
            break;
        }
        let after = rest.strip_prefix("<parameter=")?;
        let key_end = after.find('>')?;
        let key = after[..key_end].trim();
        let value_and_rest = &after[key_end + 1..];
        let value_end = value_and_rest.find("</parameter>")?;
        let raw = value_and_rest[..value_end].strip_prefix('\n').unwrap_or(&value_and_rest[..value_end]);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        if key.is_empty() || args.contains_key(key) {
            return None;
        }
        args.insert(key.to_owned(), typed(raw, spec.types.get(key).map(String::as_str)));
        rest = value_and_rest[value_end + "</parameter>".len()..].trim_start();
    }
    Some(ToolCall { name: name.to_owned(), arguments: Value::Object(args).to_string() })
}

/// A parameter's text as the value its schema type says; text that does not read as that type stays a string.
fn typed(raw: &str, ty: Option<&str>) -> Value {
    let json = || serde_json::from_str::<Value>(raw.trim()).ok();
    let as_string = || Value::String(raw.to_owned());
    match ty {
        Some("string") | None => as_string(),
        Some("integer") => json().filter(|v| v.is_i64() || v.is_u64()).unwrap_or_else(as_string),
        Some("number") => json().filter(Value::is_number).unwrap_or_else(as_string),
        Some("boolean") => match raw.trim().to_ascii_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => as_string(),
        },
        Some("null") => json().filter(Value::is_null).unwrap_or_else(as_string),
        Some("object") => json().filter(Value::is_object).unwrap_or_else(as_string),
        Some("array") => json().filter(Value::is_array).unwrap_or_else(as_string),
        Some(_) => json().unwrap_or_else(as_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<ToolSpec> {
        let list = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
                "hours": {"type": "array"}, "where": {"type": "object"}, "zip": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
        ]);
        list.as_array().expect("a list").iter().map(|t| ToolSpec::of_tool(t).expect("a tool")).collect()
    }

    fn config(format: ToolFormat, in_reasoning: bool) -> OutputConfig {
        OutputConfig { in_reasoning, reasoning: true, tools: Some((format, tools())) }
    }

    /// The parts of `text` fed whole, then fed in every split into two pieces and one character at a time: the
    /// parts (joined per kind) must not depend on how the text arrives.
    fn split_every_way(config: &OutputConfig, text: &str) -> Vec<Part> {
        let whole = {
            let mut s = Splitter::new(config.clone());
            let mut parts = s.push(text);
            parts.extend(s.finish());
            merge(parts)
        };
        let cuts: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &cut in &cuts {
            let mut s = Splitter::new(config.clone());
            let mut parts = s.push(&text[..cut]);
            parts.extend(s.push(&text[cut..]));
            parts.extend(s.finish());
            assert_eq!(merge(parts), whole, "split at {cut} of {text:?}");
        }
        let mut s = Splitter::new(config.clone());
        let mut parts = Vec::new();
        for (i, c) in text.char_indices() {
            parts.extend(s.push(&text[i..i + c.len_utf8()]));
        }
        parts.extend(s.finish());
        assert_eq!(merge(parts), whole, "one character at a time: {text:?}");
        whole
    }

    fn call(name: &str, args: Value) -> Part {
        Part::Call(ToolCall { name: name.into(), arguments: args.to_string() })
    }

    // What a Qwen3.5 checkpoint writes after a prompt that opened `<think>`.
    const QWEN35_CALL: &str = "The user wants the weather in Paris.\n</think>\n\nLet me look.\n\n<tool_call>\n\
        <function=get_weather>\n<parameter=city>\nParis, <France> & co\n</parameter>\n<parameter=days>\n3\n\
        </parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=hours>\n[9, 12]\n</parameter>\n\
        <parameter=zip>\n007\n</parameter>\n</function>\n</tool_call>";

    #[test]
    fn qwen35_xml_calls_are_read_with_their_schema_types_however_the_text_is_split() {
        let parts = split_every_way(&config(ToolFormat::Xml, true), QWEN35_CALL);
        assert_eq!(
            parts,
            vec![
                Part::Reasoning("The user wants the weather in Paris.\n".into()),
                Part::Content("Let me look.\n\n".into()),
                call(
                    "get_weather",
                    json!({"city": "Paris, <France> & co", "days": 3, "metric": true, "hours": [9, 12], "zip": "007"})
                ),
            ]
        );
    }

    #[test]
    fn parallel_calls_and_a_call_without_parameters() {
        let text = "<tool_call>\n<function=ping>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n\
                    <parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>";
        let parts = split_every_way(&OutputConfig { reasoning: false, ..config(ToolFormat::Xml, false) }, text);
        assert_eq!(parts, vec![call("ping", json!({})), call("get_weather", json!({"city": "Oslo"}))]);
    }

    #[test]
    fn hermes_json_calls_are_read() {
        let text = "<think>\nplan\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\", \"days\": 2}}\n</tool_call>";
        let parts = split_every_way(&config(ToolFormat::Hermes, false), text);
        assert_eq!(
            parts,
            vec![Part::Reasoning("\nplan\n".into()), call("get_weather", json!({"city": "Rome", "days": 2}))]
        );
        // Arguments given as a string of JSON, as some fine-tunes write them.
        let text = "<tool_call>{\"name\": \"ping\", \"arguments\": \"{}\"}</tool_call>";
        assert_eq!(split_every_way(&config(ToolFormat::Hermes, false), text), vec![call("ping", json!({}))]);
    }

    #[test]
    fn malformed_calls_come_back_as_text() {
        let cfg = OutputConfig { reasoning: false, ..config(ToolFormat::Xml, false) };
        for text in [
            "<tool_call>\n<function=no_such_tool>\n</function>\n</tool_call>",
            "<tool_call>\n<function=ping>\n<parameter=x>\n1\n</function>\n</tool_call>",
            "<tool_call>\nnot a call\n</tool_call>",
            "<tool_call>\n<function=ping>\n</function>\ntrailing words\n</tool_call>",
        ] {
            assert_eq!(split_every_way(&cfg, text), vec![Part::Content(text.into())], "{text:?}");
        }
        // Cut off inside a call: the text as it stands.
        let cut = "Sure. <tool_call>\n<function=get_weather>\n<parameter=city>\nPa";
        assert_eq!(split_every_way(&cfg, cut), vec![Part::Content(cut.into())]);
        // Cut off after `</function>`, before `</tool_call>`: the call is whole.
        let nearly = "<tool_call>\n<function=ping>\n</function>\n";
        assert_eq!(split_every_way(&cfg, nearly), vec![call("ping", json!({}))]);
        let hermes = OutputConfig { reasoning: false, ..config(ToolFormat::Hermes, false) };
        for text in
            ["<tool_call>{\"name\": \"ping\", \"arguments\": [1]}</tool_call>", "<tool_call>{\"name\": </tool_call>"]
        {
            assert_eq!(split_every_way(&hermes, text), vec![Part::Content(text.into())], "{text:?}");
        }
    }

    #[test]
    fn a_tool_call_inside_reasoning_ends_it() {
        let text = "thinking about it <tool_call>\n<function=ping>\n</function>\n</tool_call>";
        assert_eq!(
            split_every_way(&config(ToolFormat::Xml, true), text),
            vec![Part::Reasoning("thinking about it ".into()), call("ping", json!({}))]
        );
    }

    #[test]
    fn reasoning_without_tools_and_text_that_only_looks_like_a_tag() {
        let cfg = OutputConfig { in_reasoning: true, reasoning: true, tools: None };
        let text = "a < b and </thin k>\n</think>\n\nThe answer: <tool_call> is just text here.";
        assert_eq!(
            split_every_way(&cfg, text),
            vec![
                Part::Reasoning("a < b and </thin k>\n".into()),
                Part::Content("The answer: <tool_call> is just text here.".into())
            ]
        );
        // No reasoning asked: the tags stay in the content.
        let off = OutputConfig { in_reasoning: true, reasoning: false, tools: None };
        assert_eq!(split_every_way(&off, text), vec![Part::Content(text.into())]);
        // The model opens `<think>` itself; text that merely starts with `<` is content.
        let own = OutputConfig { in_reasoning: false, reasoning: true, tools: None };
        assert_eq!(
            split_every_way(&own, "  <think>x</think>y"),
            vec![Part::Reasoning("x".into()), Part::Content("y".into())]
        );
        assert_eq!(split_every_way(&own, "<b>bold</b>"), vec![Part::Content("<b>bold</b>".into())]);
        // Reasoning that never closes (cut by max_tokens) is reasoning.
        assert_eq!(split_every_way(&cfg, "still thinking <"), vec![Part::Reasoning("still thinking <".into())]);
    }

    #[test]
    fn which_form_a_template_teaches_and_whether_its_prompt_opens_reasoning() {
        assert_eq!(
            ToolFormat::of_template("... <tool_call>\\n<function=example_function_name>"),
            Some(ToolFormat::Xml)
        );
        assert_eq!(ToolFormat::of_template("<tool_call>\\n{\"name\": <function-name>"), Some(ToolFormat::Hermes));
        assert_eq!(ToolFormat::of_template("{{ messages }}"), None);
        assert!(OutputConfig::prompt_opens_reasoning("<|im_start|>assistant\n<think>\n"));
        assert!(!OutputConfig::prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!OutputConfig::prompt_opens_reasoning("<|im_start|>assistant\n"));
    }

    #[test]
    fn values_follow_the_declared_type_or_stay_strings() {
        assert_eq!(typed("42", Some("integer")), json!(42));
        assert_eq!(typed("4.5", Some("integer")), json!("4.5"));
        assert_eq!(typed("4.5", Some("number")), json!(4.5));
        assert_eq!(typed("True", Some("boolean")), json!(true));
        assert_eq!(typed("yes", Some("boolean")), json!("yes"));
        assert_eq!(typed("{\"a\": 1}", Some("object")), json!({"a": 1}));
        assert_eq!(typed("[1", Some("array")), json!("[1"));
        assert_eq!(typed("12", Some("string")), json!("12"));
        assert_eq!(typed("12", None), json!("12"));
    }
}
