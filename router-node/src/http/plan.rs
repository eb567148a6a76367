//! What each endpoint's body asks, read and checked whole: the plan a handler then runs. [`read_request`] gives the
//! same reading to tools that check it from outside (the fuzz targets), without an engine.

use serde_json::Value;

use super::error::ApiError;
use super::parse::{
    check_model, parse_common, parse_conversation, parse_json, parse_messages, parse_prompts, Common, Fields, Intake,
};
use super::tools::{parse_constraint, tool_grammar, ToolChoice};
use crate::guide::{Compiled, GuideSpec};
use crate::output::OutputConfig;

/// A completions request: each prompt with its token budget, every prompt asked `common.n` times.
pub(super) struct CompletionPlan {
    pub(super) common: Common,
    pub(super) prompts: Vec<(Vec<u32>, usize)>,
    pub(super) echo: bool,
    /// The output constraint, compiled (each choice follows a copy).
    pub(super) constraint: Option<Compiled>,
}

pub(super) fn completion_plan(intake: &Intake<'_>, body: &[u8]) -> Result<CompletionPlan, ApiError> {
    let body = parse_json(body)?;
    let f = Fields(&body);
    let common = parse_common(intake, &f, false)?;
    let prompts = parse_prompts(intake, &f)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    let constraint = match parse_constraint(&f)? {
        Some((spec, param)) => Some(compile(intake, &spec, param)?),
        None => None,
    };
    if prompts.len().checked_mul(common.n).is_none_or(|choices| choices > intake.max_choices) {
        return Err(ApiError::invalid("n", format!("at most {} choices per request", intake.max_choices)));
    }
    let prompts = prompts
        .into_iter()
        .map(|p| {
            let max_tokens = budget(intake, &common, p.len(), Some(16), "max_tokens")?;
            Ok((p, max_tokens))
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(CompletionPlan { common, prompts, echo, constraint })
}

/// A chat request: the rendered conversation's tokens and their budget, asked `common.n` times.
pub(super) struct ChatPlan {
    pub(super) common: Common,
    pub(super) prompt: Vec<u32>,
    pub(super) max_tokens: usize,
    /// How the output is split into reasoning, content and tool calls.
    pub(super) output: OutputConfig,
    /// The output constraint (`response_format`, `structured_outputs`, or a required tool call), compiled.
    pub(super) constraint: Option<Compiled>,
    /// More than one call per answer (`parallel_tool_calls`, default true); else only the first is returned.
    pub(super) parallel_tool_calls: bool,
}

pub(super) fn chat_plan(intake: &Intake<'_>, body: &[u8]) -> Result<ChatPlan, ApiError> {
    let body = parse_json(body)?;
    let f = Fields(&body);
    let common = parse_common(intake, &f, true)?;
    let conversation = parse_conversation(&f)?;
    let (text, prompt) = conversation.encode(intake)?;
    let param = if f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = budget(intake, &common, prompt.len(), None, param)?;
    let reasoning = intake.parsers.reasoning;
    let in_reasoning = reasoning && OutputConfig::prompt_opens_reasoning(&text);
    let tools = conversation.tools.as_ref().filter(|t| t.choice != ToolChoice::None);
    let format = intake.tool_format();
    let output = OutputConfig {
        in_reasoning,
        reasoning,
        tools: match (tools, format) {
            (Some(t), Some(format)) => Some((format, t.specs.clone())),
            _ => None,
        },
    };
    let asked = parse_constraint(&f)?;
    let forced = tools.filter(|t| matches!(t.choice, ToolChoice::Required | ToolChoice::Function(_)));
    let spec = match (asked, forced) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "a required tool call and an output format cannot both constrain one answer",
            ))
        }
        (Some((spec, param)), None) => Some((spec, param)),
        (None, Some(t)) => {
            let format = format.ok_or_else(|| {
                ApiError::invalid("tool_choice", "this server reads no tool calls (`--tool-call-parser none`)")
            })?;
            Some((tool_grammar(t, format), "tool_choice"))
        }
        (None, None) => None,
    };
    // A prompt that opened reasoning: the model reasons freely, and the constraint holds from the end of it on, so
    // that the constrained answer is the content. (`chat_template_kwargs: {"enable_thinking": false}` makes the
    // template close the block itself, and the constraint then holds from the first token.)
    let spec = spec.map(|(spec, param)| match in_reasoning {
        true => (GuideSpec::AfterReasoning(Box::new(spec)), param),
        false => (spec, param),
    });
    let constraint = match spec {
        Some((spec, param)) => Some(compile(intake, &spec, param)?),
        None => None,
    };
    let parallel_tool_calls = conversation.tools.as_ref().is_none_or(|t| t.parallel);
    Ok(ChatPlan { common, prompt, max_tokens, output, constraint, parallel_tool_calls })
}

/// Compiles an output constraint; what llguidance cannot follow is the client's error, naming `param`.
fn compile(intake: &Intake<'_>, spec: &GuideSpec, param: &str) -> Result<Compiled, ApiError> {
    let guides = intake
        .guides
        .ok_or_else(|| ApiError::invalid(param, "constrained decoding is not available for this model's tokenizer"))?;
    guides.compile(spec).map_err(|e| ApiError::invalid(param, format!("the output constraint cannot be used: {e}")))
}

/// vLLM's `/tokenize`: `prompt` (a string) or `messages` (through the chat template).
pub(super) fn tokenize_plan(intake: &Intake<'_>, body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let body = parse_json(body)?;
    let f = Fields(&body);
    check_model(intake, &f)?;
    if f.get("messages").is_some() {
        return parse_messages(intake, &f);
    }
    let text = f.string("prompt")?.ok_or_else(|| ApiError::schema("prompt", "`prompt` or `messages` is required"))?;
    let special = f.bool("add_special_tokens")?.unwrap_or(true);
    intake.tokenizer.encode(text, special).map_err(|e| ApiError::invalid("prompt", e.to_string()))
}

/// vLLM's `/detokenize`: token ids to text.
pub(super) fn detokenize_plan(intake: &Intake<'_>, body: &[u8]) -> Result<String, ApiError> {
    let body = parse_json(body)?;
    let f = Fields(&body);
    check_model(intake, &f)?;
    let ids: Vec<u32> = match f.get("tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64().filter(|&t| (t as usize) < intake.vocab_size).map(|t| t as u32).ok_or_else(|| {
                    ApiError::invalid("tokens", format!("token ids must be integers below {}", intake.vocab_size))
                })
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::schema("tokens", "`tokens` must be a list of token ids")),
    };
    intake.tokenizer.decode(&ids, false).map_err(|e| ApiError::invalid("tokens", e.to_string()))
}

/// The max_tokens to use, checked against the context length.
fn budget(
    intake: &Intake<'_>,
    c: &Common,
    prompt_len: usize,
    default: Option<usize>,
    param: &str,
) -> Result<usize, ApiError> {
    let ctx = intake.max_model_len;
    let max_tokens = c.max_tokens.or(default).unwrap_or_else(|| ctx.saturating_sub(prompt_len));
    if prompt_len.checked_add(max_tokens).is_none_or(|total| total > ctx) || max_tokens == 0 {
        return Err(ApiError::invalid(
            param,
            format!(
                "this model's maximum context length is {ctx} tokens; the request asks for {} ({prompt_len} in the \
                 prompt, {max_tokens} to generate)",
                prompt_len.saturating_add(max_tokens)
            ),
        ));
    }
    Ok(max_tokens)
}

/// The endpoints whose bodies [`read_request`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
    Tokenize,
    Detokenize,
}

/// What a request body asks once read and checked, as far as a tool outside the server can tell.
#[derive(Debug, Clone, Default)]
pub struct RequestShape {
    /// Each prompt's tokens (the one rendered conversation for chat; the result for `/tokenize`).
    pub prompts: Vec<Vec<u32>>,
    /// Each prompt's token budget (completions and chat).
    pub max_tokens: Vec<usize>,
    /// Engine sequences the request would start.
    pub choices: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub temperature: f32,
    pub repetition_penalty: f32,
    /// What `/detokenize` returns.
    pub text: String,
}

/// Reads a request body as the endpoint's handler does, without running it: what it asks, or the error the client
/// gets.
pub fn read_request(intake: &Intake<'_>, endpoint: Endpoint, body: &[u8]) -> Result<RequestShape, ApiError> {
    let shape = |c: &Common, prompts: Vec<Vec<u32>>, max_tokens: Vec<usize>| RequestShape {
        choices: prompts.len() * c.n,
        prompts,
        max_tokens,
        stop: c.stop.clone(),
        stop_token_ids: c.stop_token_ids.clone(),
        temperature: c.sampling.temperature,
        repetition_penalty: c.repetition_penalty,
        text: String::new(),
    };
    match endpoint {
        Endpoint::Completions => {
            let plan = completion_plan(intake, body)?;
            let (prompts, max_tokens) = plan.prompts.into_iter().unzip();
            Ok(shape(&plan.common, prompts, max_tokens))
        }
        Endpoint::ChatCompletions => {
            let plan = chat_plan(intake, body)?;
            Ok(shape(&plan.common, vec![plan.prompt], vec![plan.max_tokens]))
        }
        Endpoint::Tokenize => {
            Ok(RequestShape { prompts: vec![tokenize_plan(intake, body)?], ..RequestShape::default() })
        }
        Endpoint::Detokenize => Ok(RequestShape { text: detokenize_plan(intake, body)?, ..RequestShape::default() }),
    }
}
