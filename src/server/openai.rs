//! The OpenAI API's request bodies, read field by field from JSON so every bad value gets an
//! error that names it (OpenAI's error JSON, status 400), and its response shapes.
//! Unknown fields are ignored, as OpenAI-compatible servers do.

use crate::engine::{FinishReason, RequestParams, TokenLogprob, Usage};
use crate::model::GenerationDefaults;
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The JSON object of a request body.
pub fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad("", format!("malformed JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::bad("", "the request body must be a JSON object")),
    }
}

/// Typed access to optional fields; `null` counts as absent.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub fn f32(&self, key: &str) -> ApiResult<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x as f32)),
                _ => Err(ApiError::bad(key, format!("`{key}` must be a number, got {v}"))),
            },
        }
    }

    pub fn int(&self, key: &str) -> ApiResult<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) => Ok(Some(x)),
                None => Err(ApiError::bad(key, format!("`{key}` must be an integer, got {v}"))),
            },
        }
    }

    /// An integer in `lo..=hi`.
    pub fn int_in(&self, key: &str, lo: i64, hi: i64) -> ApiResult<Option<i64>> {
        match self.int(key)? {
            Some(x) if x < lo || x > hi => Err(ApiError::bad(key, format!("`{key}` must be in {lo}..={hi}, got {x}"))),
            x => Ok(x),
        }
    }

    pub fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::bad(key, format!("`{key}` must be true or false, got {v}"))),
        }
    }

    pub fn str(&self, key: &str) -> ApiResult<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::bad(key, format!("`{key}` must be a string, got {v}"))),
        }
    }
}

/// What every generation request shares, read and checked.
#[derive(Clone, Debug)]
pub struct Generation {
    pub max_tokens: Option<usize>,
    pub params: RequestParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// Most choices one request may ask for.
pub const MAX_N: i64 = 16;
/// Most stop strings.
pub const MAX_STOPS: usize = 16;

/// Read the sampling and stream fields shared by both endpoints. `logprobs` is read by the
/// caller (the two endpoints spell it differently).
pub fn generation(obj: &Map<String, Value>, defaults: &GenerationDefaults) -> ApiResult<Generation> {
    let f = Fields(obj);
    let max_tokens = match (f.int("max_completion_tokens")?, f.int("max_tokens")?) {
        (Some(x), _) => Some(("max_completion_tokens", x)),
        (None, Some(x)) => Some(("max_tokens", x)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((key, x)) if x < 1 => return Err(ApiError::bad(key, format!("`{key}` must be at least 1, got {x}"))),
        Some((_, x)) => Some(x as usize),
        None => None,
    };
    // Without a value: generation_config.json's when it samples, else OpenAI's defaults.
    let sample = defaults.do_sample;
    let pick = |v: Option<f32>, d: Option<f32>, off: f32| v.or(if sample { d } else { None }).unwrap_or(off);
    let temperature = f.f32("temperature")?;
    if let Some(t) = temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::bad("temperature", format!("`temperature` must be in [0, 2], got {t}")));
        }
    }
    let top_p = f.f32("top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad("top_p", format!("`top_p` must be in (0, 1], got {p}")));
        }
    }
    // -1 means off, as vLLM takes it.
    let top_k = match f.int("top_k")? {
        Some(-1) | None => None,
        Some(k) if k < 0 => return Err(ApiError::bad("top_k", format!("`top_k` must be >= 0 (or -1: off), got {k}"))),
        Some(k) => Some(k as usize),
    };
    let min_p = f.f32("min_p")?;
    let repetition_penalty = f.f32("repetition_penalty")?;
    let sampling = SamplingParams {
        temperature: pick(temperature, defaults.temperature.or(Some(1.0)), 1.0),
        top_k: top_k.or(if sample { defaults.top_k } else { None }).unwrap_or(0),
        top_p: pick(top_p, defaults.top_p, 1.0),
        min_p: pick(min_p, defaults.min_p, 0.0),
        repeat_penalty: pick(repetition_penalty, defaults.repetition_penalty, 1.0),
        presence_penalty: f.f32("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: f.f32("frequency_penalty")?.unwrap_or(0.0),
        seed: f.int("seed")?.unwrap_or(0) as u64,
    };
    // Name the field in the error the sampler's own check gives.
    if let Err(e) = sampling.validate() {
        let message = e.to_string();
        let param = ["min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "top_p", "temperature"]
            .into_iter()
            .find(|p| message.starts_with(p))
            .map(|p| if p == "repeat_penalty" { "repetition_penalty" } else { p })
            .unwrap_or("");
        return Err(ApiError::bad(param, message));
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let stops: Option<Vec<String>> = items.iter().map(|v| v.as_str().map(str::to_string)).collect();
            stops.ok_or_else(|| ApiError::bad("stop", "`stop` must be a string or a list of strings"))?
        }
        Some(v) => return Err(ApiError::bad("stop", format!("`stop` must be a string or a list of strings, got {v}"))),
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::bad("stop", format!("at most {MAX_STOPS} stop strings, got {}", stop.len())));
    }
    let n = f.int_in("n", 1, MAX_N)?.unwrap_or(1) as usize;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(v) => return Err(ApiError::bad("stream_options", format!("`stream_options` must be an object, got {v}"))),
    };
    if include_usage && !stream {
        return Err(ApiError::bad("stream_options", "`stream_options` is only allowed with `stream: true`"));
    }
    Ok(Generation {
        max_tokens,
        params: RequestParams { max_tokens: 0, sampling, stop_at_eos: true, stop, logprobs: None, adapters: 0 },
        n,
        stream,
        include_usage,
    })
}

/// Chat messages: role and content (a string, or an array of text parts).
pub fn messages(obj: &Map<String, Value>) -> ApiResult<Vec<ChatMessage>> {
    let Some(list) = obj.get("messages") else {
        return Err(ApiError::bad("messages", "`messages` is required"));
    };
    let Value::Array(list) = list else {
        return Err(ApiError::bad("messages", "`messages` must be an array"));
    };
    if list.is_empty() {
        return Err(ApiError::bad("messages", "`messages` must not be empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let Value::Object(m) = m else {
                return Err(ApiError::bad(&param, format!("{param} must be an object")));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if ["system", "developer", "user", "assistant"].contains(&r.as_str()) => {
                    if r == "developer" {
                        "system".to_string()
                    } else {
                        r.clone()
                    }
                }
                Some(r) => {
                    return Err(ApiError::bad(
                        &format!("{param}.role"),
                        format!("{param}.role must be system, developer, user or assistant, got {r}"),
                    ))
                }
                None => return Err(ApiError::bad(&format!("{param}.role"), format!("{param}.role is required"))),
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        let p = format!("{param}.content[{j}]");
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text += t,
                            _ => {
                                return Err(ApiError::bad(
                                    &p,
                                    format!("{p} must be a text part {{\"type\": \"text\", \"text\": ...}}"),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(Value::Null) | None if role == "assistant" => String::new(),
                _ => {
                    return Err(ApiError::bad(
                        &format!("{param}.content"),
                        format!("{param}.content must be a string or an array of text parts"),
                    ))
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// `prompt` of /v1/completions: a string, a list of strings, or a list of token ids.
pub fn prompts(obj: &Map<String, Value>, tokenizer: &Tokenizer) -> ApiResult<Vec<Vec<u32>>> {
    let encode = |s: &str| tokenizer.encode(s, true).map_err(|e| ApiError::bad("prompt", e.to_string()));
    match obj.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::bad("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(vec![encode(s)?]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::bad("prompt", "`prompt` must not be empty")),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            items.iter().map(|s| encode(s.as_str().unwrap_or_default())).collect()
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
            Ok(vec![items.iter().map(|v| v.as_u64().unwrap_or(u64::MAX).min(u32::MAX as u64) as u32).collect()])
        }
        Some(v) => Err(ApiError::bad(
            "prompt",
            format!("`prompt` must be a string, a list of strings or of token ids, got {v}"),
        )),
    }
}

pub fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::MaxTokens => "length",
        _ => "stop",
    }
}

pub fn usage_json(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// Usage of a request's choices: the prompt counted once, the cache hits of the best choice.
pub fn total_usage(usages: &[Usage], prompt_tokens: usize) -> Value {
    let completion: usize = usages.iter().map(|u| u.generated_tokens).sum();
    let cached = usages.iter().map(|u| u.cached_tokens).max().unwrap_or(0);
    usage_json(prompt_tokens, completion, cached)
}

/// A token's text for log-probability listings (decoded on its own).
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// One entry of a chat completion's `logprobs.content`.
pub fn chat_logprob(tokenizer: &Tokenizer, id: u32, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let token = token_text(tokenizer, id);
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
    };
    let mut e = entry(id, lp.logprob);
    e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
    e
}
