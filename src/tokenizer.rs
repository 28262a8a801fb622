//! Text ⇄ token ids for Hugging Face model directories, and chat prompts.
//!
//! - Encoding and decoding run the Hugging Face `tokenizers` library on the model's own
//!   `tokenizer.json`, so ids are exactly those of `transformers` (checked against golden vectors in
//!   `tests/tokenizer.rs`).
//! - Chat prompts render `tokenizer_config.json`'s `chat_template` the way transformers'
//!   `apply_chat_template` does (`transformers/utils/chat_template_utils.py`): Jinja with
//!   `trim_blocks` and `lstrip_blocks`, the variables `messages`, `add_generation_prompt` and the
//!   special tokens (`bos_token`, `eos_token`, ...), and the helpers `raise_exception`, `tojson`
//!   and `strftime_now`. minijinja stands in for Jinja2; Python string and dict methods
//!   (`.strip()`, `.startswith()`, `.items()`) come from minijinja-contrib's pycompat layer.
//! - [`StreamDecoder`] turns ids into text one token at a time without ever emitting half a
//!   UTF-8 character, with the prefix/read-offset method of Hugging Face text-generation-inference
//!   (`server/text_generation_server/models/model.py`, `decode_token`).

use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{KilnError, Result};

/// One turn of a conversation, as transformers' chat templates expect it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The name the compiled chat template is stored under in its minijinja environment.
const CHAT_TEMPLATE_NAME: &str = "chat_template";

/// A model's tokenizer: `tokenizer.json` plus what `tokenizer_config.json` adds (special token
/// names, chat template).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `Some(Ok)` = a compiled template; `Some(Err)` = the config has one but it does not parse.
    /// The parse error is kept rather than returned at load so that plain-text use still works,
    /// as in transformers, which only compiles the template when a chat is rendered.
    chat: Option<std::result::Result<Environment<'static>, String>>,
    /// Special-token variables handed to the template (transformers' `special_tokens_map`):
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token`, each only if the config sets it.
    special_tokens: Vec<(&'static str, String)>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.has_chat_template())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

/// Run `f`, turning a panic inside it into an error with the panic's message, printed nowhere.
///
/// Why: tokenizers 0.22.2 panics on some malformed tokenizer.json files instead of returning an
/// error. Its `DecoderWrapper` and `NormalizerWrapper` deserialisers call
/// `Helper::deserialize(deserializer).expect("Helper")` (src/decoders/mod.rs:90,
/// src/normalizers/mod.rs), so a syntax error or a bad escape inside the `decoder` or
/// `normalizer` object aborts the caller. Upstream, those `expect`s should become `map_err`.
/// 1.0.0-rc.3 (read in its source, 2026-12) replaces the serde readers with its own JSON parser
/// (tk-serialize) that has no such `expect`, but it is a release candidate with a new API
/// (`PipelineTokenizer`, a canonicalising pass for older files); kiln stays on 0.22 for now and
/// keeps this guard either way.
pub(crate) fn without_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    use std::cell::Cell;
    thread_local! {
        static QUIET: Cell<bool> = const { Cell::new(false) };
    }
    // One process-wide hook that stays silent on threads inside this guard and otherwise
    // defers to the hook it replaced.
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the tokenizers crate panicked".into())
    })
}

impl Tokenizer {
    /// Load a Hugging Face model directory's `tokenizer.json` and, if present,
    /// `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let config = dir.join("tokenizer_config.json");
        let config = config.is_file().then_some(config);
        Tokenizer::from_files(&dir.join("tokenizer.json"), config.as_deref())
    }

    /// Load from explicit files. Without a config there is no chat template and no bos/eos id.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Tokenizer> {
        let bytes = std::fs::read(tokenizer_json).map_err(|e| KilnError::io(tokenizer_json, e))?;
        let config = match tokenizer_config {
            Some(path) => TokenizerConfig::load(path)?,
            None => TokenizerConfig::default(),
        };
        Self::from_parts(&bytes, config, tokenizer_json, tokenizer_config)
    }

    /// From the bytes of a tokenizer.json and, optionally, a tokenizer_config.json; `origin`
    /// names them in errors (the fuzz target's entry point).
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config: Option<&[u8]>, origin: &Path) -> Result<Tokenizer> {
        let config = match tokenizer_config {
            Some(bytes) => {
                let json: serde_json::Value = serde_json::from_slice(bytes)
                    .map_err(|e| KilnError::model(origin, format!("tokenizer_config: not valid JSON: {e}")))?;
                TokenizerConfig::from_json(origin, &json)?
            }
            None => TokenizerConfig::default(),
        };
        Self::from_parts(tokenizer_json, config, origin, None)
    }

    /// From the JSON of a tokenizer.json and a tokenizer_config.json made elsewhere (a GGUF
    /// file's metadata); `origin` names their source in errors.
    pub fn from_json_values(
        tokenizer: &serde_json::Value,
        config: &serde_json::Value,
        origin: &Path,
    ) -> Result<Tokenizer> {
        let bytes = serde_json::to_vec(tokenizer).map_err(|e| KilnError::model(origin, format!("tokenizer: {e}")))?;
        let config = TokenizerConfig::from_json(origin, config)?;
        Self::from_parts(&bytes, config, origin, None)
    }

    fn from_parts(
        bytes: &[u8],
        config: TokenizerConfig,
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
    ) -> Result<Tokenizer> {
        let damaged =
            |e: String| KilnError::model(tokenizer_json, format!("damaged or not a valid tokenizer.json: {e}"));
        let inner = without_panics(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(damaged)?
            .map_err(|e| damaged(e.to_string()))?;

        // A bos/eos the vocabulary lacks would silently never match (generation would not stop),
        // so it is an error here rather than a `None`.
        let lookup = |name: &str, token: &Option<String>| -> Result<Option<u32>> {
            let Some(token) = token else { return Ok(None) };
            match inner.token_to_id(token) {
                Some(id) => Ok(Some(id)),
                None => Err(KilnError::model(
                    tokenizer_config.unwrap_or(tokenizer_json),
                    format!("{name} `{token}` is not in the vocabulary of {}", tokenizer_json.display()),
                )),
            }
        };
        let bos_id = lookup("bos_token", &config.bos_token)?;
        let eos_id = lookup("eos_token", &config.eos_token)?;

        let special_tokens = [
            ("bos_token", &config.bos_token),
            ("eos_token", &config.eos_token),
            ("unk_token", &config.unk_token),
            ("pad_token", &config.pad_token),
        ]
        .into_iter()
        .filter_map(|(name, token)| token.clone().map(|t| (name, t)))
        .collect();

        let chat = config.chat_template.map(compile_chat_template);
        let tokenizer = Tokenizer { inner, chat, special_tokens, bos_id, eos_id };
        // A post-processor that cannot encode anything (its template names tokens it lacks) is a
        // damaged file: say so now rather than on every request.
        for add_special_tokens in [true, false] {
            tokenizer.encode("a", add_special_tokens).map_err(|e| damaged(e.to_string()))?;
        }
        Ok(tokenizer)
    }

    /// Encode text. `add_special_tokens` runs the tokenizer's post-processor (Llama 3 prepends
    /// `<|begin_of_text|>`; Qwen2 adds nothing).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // encode_fast skips the character offsets, which kiln never uses; the ids are identical.
        // Guarded: a damaged post-processor (a template naming a special token it does not
        // define) makes tokenizers 0.22 index out of bounds while encoding (found by fuzzing).
        let encoding = without_panics(|| self.inner.encode_fast(text, add_special_tokens))
            .map_err(|e| KilnError::Tokenizer(format!("encoding failed: the tokenizers crate panicked: {e}")))?
            .map_err(|e| KilnError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decode ids to text. Ids outside the vocabulary are dropped, as the `tokenizers` library
    /// does (a model's embedding table is often padded past the tokenizer's last id).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        without_panics(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(|e| KilnError::Tokenizer(format!("decoding failed: the tokenizers crate panicked: {e}")))?
            .map_err(|e| KilnError::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Number of distinct tokens, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// `bos_token` of tokenizer_config.json, as an id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// `eos_token` of tokenizer_config.json, as an id. (A model's generation_config.json may list
    /// more end-of-sequence ids; those are the model loader's business.)
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Render the chat template for `messages` exactly as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = match &self.chat {
            None => {
                return Err(KilnError::ChatTemplate(
                    "this tokenizer has no chat_template (tokenizer_config.json missing or without one)".into(),
                ))
            }
            Some(Err(message)) => return Err(KilnError::ChatTemplate(message.clone())),
            Some(Ok(env)) => env,
        };
        let template = env.get_template(CHAT_TEMPLATE_NAME).map_err(|e| KilnError::ChatTemplate(describe(&e)))?;

        // Special tokens the config does not set stay undefined (rendering as ""), as in
        // transformers, whose special_tokens_map only holds the ones that are set.
        let mut context: std::collections::BTreeMap<&str, Value> =
            self.special_tokens.iter().map(|(name, token)| (*name, Value::from(token.as_str()))).collect();
        context.insert("messages", Value::from_serialize(messages));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));

        template.render(context).map_err(|e| KilnError::ChatTemplate(describe(&e)))
    }

    /// The ids to feed for a chat prompt: the rendered template encoded *without* adding special
    /// tokens, because the template already holds BOS where the model wants it (adding it again
    /// would double it).
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// The underlying `tokenizers` object, for anything this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// What kiln reads from tokenizer_config.json. Everything is optional: many directories have
/// only some of these keys.
#[derive(Default)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    chat_template: Option<String>,
}

impl TokenizerConfig {
    fn load(path: &Path) -> Result<TokenizerConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| KilnError::io(path, e))?;
        // Parsed as a generic JSON value: the file holds many keys of varying type that kiln ignores
        // (model_max_length, for one, can be 1e30, which no integer type holds).
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| KilnError::model(path, format!("not valid JSON: {e}")))?;
        Self::from_json(path, &json)
    }

    fn from_json(path: &Path, json: &serde_json::Value) -> Result<TokenizerConfig> {
        let Some(obj) = json.as_object() else {
            return Err(KilnError::model(path, "expected a JSON object"));
        };
        let token = |key: &str| special_token(path, key, obj.get(key));
        Ok(TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            unk_token: token("unk_token")?,
            pad_token: token("pad_token")?,
            chat_template: chat_template(path, obj.get("chat_template"))?,
        })
    }
}

/// A special token entry is `null`, a string, or an AddedToken object `{"content": ..., ...}`.
fn special_token(path: &Path, key: &str, value: Option<&serde_json::Value>) -> Result<Option<String>> {
    use serde_json::Value as J;
    match value {
        None | Some(J::Null) => Ok(None),
        Some(J::String(s)) => Ok(Some(s.clone())),
        Some(J::Object(o)) => match o.get("content") {
            Some(J::String(s)) => Ok(Some(s.clone())),
            _ => Err(KilnError::model(path, format!("`{key}` is an object without a string `content`"))),
        },
        Some(other) => Err(KilnError::model(path, format!("`{key}` should be a string, got {other}"))),
    }
}

/// `chat_template` is a string, or a list of `{"name": ..., "template": ...}` of which transformers
/// uses the one named "default" when no name is asked for.
fn chat_template(path: &Path, value: Option<&serde_json::Value>) -> Result<Option<String>> {
    use serde_json::Value as J;
    match value {
        None | Some(J::Null) => Ok(None),
        Some(J::String(s)) => Ok(Some(s.clone())),
        Some(J::Array(list)) => {
            for entry in list {
                if entry.get("name").and_then(J::as_str) == Some("default") {
                    return match entry.get("template") {
                        Some(J::String(s)) => Ok(Some(s.clone())),
                        _ => Err(KilnError::model(path, "chat_template \"default\" has no string `template`")),
                    };
                }
            }
            let names: Vec<&str> = list.iter().filter_map(|e| e.get("name").and_then(J::as_str)).collect();
            Err(KilnError::model(
                path,
                format!("chat_template is a list without a \"default\" entry (has: {})", names.join(", ")),
            ))
        }
        Some(other) => Err(KilnError::model(path, format!("chat_template should be a string or a list, got {other}"))),
    }
}

/// Build the Jinja environment transformers renders chat templates in
/// (`_compile_jinja_template`: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
/// plus `raise_exception`, `tojson` and `strftime_now`). A parse error becomes the returned message.
/// Instructions a chat template may run for one rendering (see `compile_chat_template`).
const CHAT_TEMPLATE_FUEL: u64 = 10_000_000;

fn compile_chat_template(source: String) -> std::result::Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Jinja2's default, which transformers keeps: a template's final newline is dropped.
    env.set_keep_trailing_newline(false);
    // A template comes with the model file, so a damaged or hostile one must not hang the
    // process (loops nested in loops): rendering stops with an error after this many
    // instructions. Real templates render a long conversation with tools in a few thousand.
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(CHAT_TEMPLATE_NAME, source).map_err(|e| describe(&e))?;
    Ok(env)
}

/// minijinja's Display omits the detail on some errors; include it, and the line, once.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(detail) = e.detail() {
        if !s.contains(detail) {
            s = format!("{s}: {detail}");
        }
    }
    s
}

/// `raise_exception(msg)`: templates call it to reject a conversation (e.g. roles that do not
/// alternate). The message reaches the user inside `KilnError::ChatTemplate`.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {message}")))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
/// sort_keys=sort_keys)`. minijinja's own `tojson` differs (compact separators, HTML-escaped
/// `<`/`>`/`&`/`'`), which would change the prompt text of templates that dump tool definitions.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // ensure_ascii is accepted for compatibility; transformers always passes False.
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string")
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        // Python's defaults: ", " without indent, "," with it (the newline follows).
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    let style = PyJson { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) };
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Writes JSON laid out as Python's `json.dumps` lays it out.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, v: &serde_json::Value, depth: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    self.write(item, depth + 1, out);
                }
                self.close(depth, out);
                out.push(']');
            }
            J::Object(map) if !map.is_empty() => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    self.separator(i, depth + 1, out);
                    out.push_str(&J::String(k.clone()).to_string());
                    out.push_str(&self.key_sep);
                    self.write(item, depth + 1, out);
                }
                self.close(depth, out);
                out.push('}');
            }
            // Scalars and empty containers: serde_json escapes strings as Python does with
            // ensure_ascii=False (only `"`, `\` and control characters).
            other => out.push_str(&other.to_string()),
        }
    }

    fn separator(&self, i: usize, depth: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item_sep);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn close(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }
}

/// transformers' `strftime_now(fmt)`: the current date/time formatted with Python's strftime.
/// Llama 3.1+ templates use it for "Today Date". Supports the common directives
/// (%d %m %y %Y %b %B %a %A %H %I %M %S %p %j %%); others are copied through unchanged.
/// NOTE: uses UTC, where transformers uses the machine's local time zone.
fn strftime_now(format: String) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime_utc(&format, secs)
}

fn strftime_utc(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('Y') => out.push_str(&year.to_string()),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian
/// (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Streaming detokenisation: push ids one at a time, get back the text that is complete.
///
/// Decoding token by token is wrong in two ways: one character can span several byte-level
/// tokens (each alone decodes to U+FFFD), and some decoders change a token's text depending on
/// what precedes it (SentencePiece strips the first leading space). So, as text-generation-inference
/// does, each step decodes a short window of ids twice — without and with the ids not yet
/// emitted — and emits the difference, but only once the longer text does not end in U+FFFD (an
/// incomplete character). The window then slides forward, keeping the last emitted ids as context.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The window: `ids[..read_offset]` were emitted by the previous step and are kept as
    /// context; `ids[read_offset..]` are not emitted yet. Older ids are dropped as it slides.
    ids: Vec<u32>,
    read_offset: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder { tokenizer, skip_special_tokens, ids: Vec::new(), read_offset: 0 }
    }

    /// Add one id; returns the newly completed text, or `None` while the text still ends in an
    /// incomplete character (or the id added no text, e.g. a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (prefix, full) = self.decode_window()?;
        if full.len() > prefix.len() && !full.ends_with(char::REPLACEMENT_CHARACTER) {
            let piece = suffix_after(&full, &prefix).to_string();
            self.slide();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Emit whatever is still held back (text ending in an incomplete character comes out with its
    /// U+FFFD, exactly as a full decode shows it). Returns `None` when nothing is pending.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let (prefix, full) = self.decode_window()?;
        let piece = suffix_after(&full, &prefix).to_string();
        self.slide();
        Ok((!piece.is_empty()).then_some(piece))
    }

    /// (text of the context ids, already emitted; text of the whole window)
    fn decode_window(&self) -> Result<(String, String)> {
        let prefix = self.tokenizer.decode(&self.ids[..self.read_offset], self.skip_special_tokens)?;
        let full = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok((prefix, full))
    }

    /// Everything in the window is emitted: the ids just emitted become the next window's
    /// context (TGI's `prefix_offset = read_offset; read_offset = len`), older ones go.
    fn slide(&mut self) {
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
    }
}

/// `full` minus its leading `prefix`. The window texts are normally prefix-extended; if a decoder
/// ever rewrites earlier text, fall back to TGI's rule (drop as many characters as the prefix has)
/// instead of slicing bytes, which could split a character.
fn suffix_after<'s>(full: &'s str, prefix: &str) -> &'s str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let n = prefix.chars().count();
    match full.char_indices().nth(n) {
        Some((i, _)) => &full[i..],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 12:34:56 UTC, a Friday, day 208 of a leap year.
        let t = 1_721_997_296;
        assert_eq!(strftime_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(strftime_utc("%A %B %j %H:%M:%S %p %I %y %m %% %Q", t), "Friday July 208 12:34:56 PM 12 24 07 % %Q");
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        for days in [-800_000i64, -1, 0, 59, 60, 365, 11_016, 19_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn suffix_after_never_splits_characters() {
        assert_eq!(suffix_after("héllo", "hé"), "llo");
        // Not a prefix: drop as many characters as the prefix has.
        assert_eq!(suffix_after("héllo", "xy"), "llo");
        assert_eq!(suffix_after("hé", "abcdef"), "");
    }
}
