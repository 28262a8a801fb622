//! `kiln serve` as clients see it: OpenAI's API through a raw HTTP client (every malformed
//! request answered with the right status and OpenAI's error JSON, the server still serving
//! afterwards; the stream order; a disconnected client's sequence cancelled; SIGTERM drains),
//! through the official `openai` Python client, under 64 concurrent streams, in a real headless
//! browser, and as two replicas behind nginx. The Python, browser and nginx tests need
//! `scripts/setup-test-tools.sh` (CI runs it); without it they fail saying so.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn smollm() -> PathBuf {
    let p = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

/// A running `kiln serve` on a free port; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    if let Some(addr) = line.split("listening on http://").nth(1) {
                        let _ = port_tx.send(addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());
                    }
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let port = port_rx.recv_timeout(Duration::from_secs(60)).expect("the server prints its address");
        let server = Server { child, port, log };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = self.try_request("GET", "/health", b"") {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(180), "not ready:\n{}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn try_request(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
        http(self.port, method, path, body)
    }

    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        self.try_request(method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, body.to_string().as_bytes());
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.request("GET", "/metrics", b"");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open a connection and send one HTTP/1.1 request on it; the response is the caller's to read.
fn send(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    Ok(s)
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body), chunked bodies decoded.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = send(port, method, path, body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out += &rest[..n];
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

const PROMPT: &str = "The license grants you the freedom to";

/// `kiln generate`'s greedy continuation of `prompt`.
fn kiln_generate(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--temperature", "0"])
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(&fixture("llama3-tiny"), &["--ctx", "256", "--max-body", "64K"]);
    let chat = |extra: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body.to_string()
    };
    let long_prompt = "word ".repeat(400);
    let huge = format!("{{\"prompt\": \"{}\"}}", "x".repeat(70_000));
    // (what, method, path, body, status, the error's param)
    type Case<'a> = (&'a str, &'a str, &'a str, String, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("malformed JSON", "POST", "/v1/chat/completions", "{\"messages\": [".into(), 400, None),
        ("not an object", "POST", "/v1/chat/completions", "[1, 2]".into(), 400, None),
        ("empty body", "POST", "/v1/completions", String::new(), 400, None),
        ("no messages", "POST", "/v1/chat/completions", "{\"model\": \"m\"}".into(), 400, Some("messages")),
        ("empty messages", "POST", "/v1/chat/completions", chat(json!({"messages": []})), 400, Some("messages")),
        ("messages not a list", "POST", "/v1/chat/completions", chat(json!({"messages": "hi"})), 400, Some("messages")),
        (
            "bad role",
            "POST",
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "robot", "content": "x"}]})),
            400,
            Some("messages[0].role"),
        ),
        (
            "content a number",
            "POST",
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": 5}]})),
            400,
            Some("messages[0].content"),
        ),
        (
            "image part",
            "POST",
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})),
            400,
            Some("messages[0].content[0]"),
        ),
        (
            "negative max_tokens",
            "POST",
            "/v1/chat/completions",
            chat(json!({"max_tokens": -1})),
            400,
            Some("max_tokens"),
        ),
        (
            "zero max_completion_tokens",
            "POST",
            "/v1/chat/completions",
            chat(json!({"max_completion_tokens": 0})),
            400,
            Some("max_completion_tokens"),
        ),
        (
            "max_tokens a string",
            "POST",
            "/v1/chat/completions",
            chat(json!({"max_tokens": "ten"})),
            400,
            Some("max_tokens"),
        ),
        (
            "negative temperature",
            "POST",
            "/v1/chat/completions",
            chat(json!({"temperature": -0.5})),
            400,
            Some("temperature"),
        ),
        (
            "temperature above 2",
            "POST",
            "/v1/chat/completions",
            chat(json!({"temperature": 3})),
            400,
            Some("temperature"),
        ),
        ("top_p 0", "POST", "/v1/chat/completions", chat(json!({"top_p": 0})), 400, Some("top_p")),
        ("top_p above 1", "POST", "/v1/chat/completions", chat(json!({"top_p": 1.5})), 400, Some("top_p")),
        ("top_k negative", "POST", "/v1/chat/completions", chat(json!({"top_k": -5})), 400, Some("top_k")),
        ("min_p above 1", "POST", "/v1/chat/completions", chat(json!({"min_p": 2})), 400, Some("min_p")),
        (
            "presence_penalty out of range",
            "POST",
            "/v1/chat/completions",
            chat(json!({"presence_penalty": 9})),
            400,
            Some("presence_penalty"),
        ),
        (
            "repetition_penalty 0",
            "POST",
            "/v1/chat/completions",
            chat(json!({"repetition_penalty": 0})),
            400,
            Some("repetition_penalty"),
        ),
        ("n 0", "POST", "/v1/chat/completions", chat(json!({"n": 0})), 400, Some("n")),
        ("n 1000", "POST", "/v1/chat/completions", chat(json!({"n": 1000})), 400, Some("n")),
        ("stop a number", "POST", "/v1/chat/completions", chat(json!({"stop": 7})), 400, Some("stop")),
        ("stream a string", "POST", "/v1/chat/completions", chat(json!({"stream": "yes"})), 400, Some("stream")),
        (
            "stream_options without stream",
            "POST",
            "/v1/chat/completions",
            chat(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
        ),
        (
            "top_logprobs without logprobs",
            "POST",
            "/v1/chat/completions",
            chat(json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
        ),
        (
            "top_logprobs 50",
            "POST",
            "/v1/chat/completions",
            chat(json!({"logprobs": true, "top_logprobs": 50})),
            400,
            Some("top_logprobs"),
        ),
        (
            "prompt past the context",
            "POST",
            "/v1/completions",
            json!({"prompt": long_prompt, "max_tokens": 4}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "max_tokens past the context",
            "POST",
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 1000}).to_string(),
            400,
            Some("max_tokens"),
        ),
        ("no prompt", "POST", "/v1/completions", json!({"max_tokens": 4}).to_string(), 400, Some("prompt")),
        ("empty prompt list", "POST", "/v1/completions", json!({"prompt": []}).to_string(), 400, Some("prompt")),
        (
            "prompt of objects",
            "POST",
            "/v1/completions",
            json!({"prompt": [{"a": 1}]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "token id past the vocabulary",
            "POST",
            "/v1/completions",
            json!({"prompt": [1, 99999999]}).to_string(),
            400,
            Some("prompt"),
        ),
        ("detokenize bad ids", "POST", "/detokenize", json!({"tokens": [-1]}).to_string(), 400, Some("tokens")),
        ("tokenize without text", "POST", "/tokenize", json!({}).to_string(), 400, Some("prompt")),
        ("body over the limit", "POST", "/v1/completions", huge, 413, None),
        ("unknown route", "GET", "/v2/everything", String::new(), 404, None),
        ("wrong method", "GET", "/v1/chat/completions", String::new(), 405, None),
    ];
    assert!(cases.len() >= 20);
    for (what, method, path, body, status, param) in &cases {
        let (got, text) = server.request(method, path, body.as_bytes());
        assert_eq!(got, *status, "{what}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: error body not JSON ({e}): {text}"));
        let error = &v["error"];
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
        assert!(error["type"].is_string() && error.get("code").is_some(), "{what}: {v}");
        assert_eq!(error["param"].as_str(), *param, "{what}: {v}");
    }
    // Unknown fields are ignored; the server still serves.
    let (status, v) = server.post(
        "/v1/chat/completions",
        &json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "user": "someone", "tools": null, "parallel_tool_calls": false
        }),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert!(server.metric("kiln_requests_total{outcome=\"rejected\"}") >= 30.0);
}

#[test]
fn greedy_output_equals_kiln_generate_and_streams_in_openai_order() {
    let model = fixture("llama3-tiny");
    let server = Server::start(&model, &[]);
    let want = kiln_generate(&model, PROMPT, 16);
    let (status, v) = server.post("/v1/completions", &json!({"prompt": PROMPT, "max_tokens": 16, "temperature": 0}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["object"], "text_completion");

    // The stream: role chunk, content deltas, finish chunk, usage chunk with no choices, [DONE].
    let body = json!({
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}
    });
    let (status, text) = server.request("POST", "/v1/chat/completions", body.to_string().as_bytes());
    assert_eq!(status, 200, "{text}");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    for c in &chunks[1..chunks.len() - 2] {
        assert!(c["choices"][0]["delta"]["content"].is_string() && c["choices"][0]["finish_reason"].is_null(), "{c}");
        assert_eq!(c["object"], "chat.completion.chunk");
    }
    // The same request not streamed gives the same text.
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain.as_object_mut().unwrap().remove("stream_options");
    let (_, v) = server.post("/v1/chat/completions", &plain);
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), streamed);

    // tokenize / detokenize round trip; models; health.
    let (_, t) = server.post("/tokenize", &json!({"prompt": PROMPT}));
    let (_, d) = server.post("/detokenize", &json!({"tokens": t["tokens"]}));
    assert!(d["prompt"].as_str().unwrap().ends_with(PROMPT), "{d}");
    assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
    let (status, m) = server.request("GET", "/v1/models", b"");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&m).unwrap()["data"][0]["id"], "llama3-tiny");
    let (status, page) = server.request("GET", "/", b"");
    assert!(status == 200 && page.contains("/v1/chat/completions"));
}

#[test]
fn a_client_that_disconnects_mid_stream_is_cancelled_and_its_blocks_freed() {
    // SmolLM2: slow enough on a CPU adapter (tens of ms a token) that 200 tokens outlast the client.
    let server = Server::start(&smollm(), &["--kv-memory", "64M"]);
    let body = json!({"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": true}).to_string();
    let mut s = send(server.port, "POST", "/v1/completions", body.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {seen}");
        seen += &String::from_utf8_lossy(&buf[..n]);
    }
    drop(s);
    let start = Instant::now();
    loop {
        let cancelled = server.metric("kiln_requests_total{outcome=\"cancelled\"}");
        if cancelled == 1.0 && server.metric("kiln_kv_blocks_used") == 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not cancelled ({cancelled} cancelled, {} blocks used)",
            server.metric("kiln_kv_blocks_used")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.metric("kiln_generation_tokens_total") < 200.0, "stopped well before max_tokens");
    // Still serving.
    let (status, _) = server.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(status, 200);
}

#[test]
fn sigterm_stops_accepting_lets_running_streams_finish_and_exits_0() {
    // SmolLM2: its 40 tokens take seconds on a CPU adapter, so the stream is mid-way at SIGTERM.
    let mut server = Server::start(&smollm(), &["--kv-memory", "64M", "--shutdown-timeout", "60"]);
    let port = server.port;
    let streaming = std::thread::spawn(move || {
        let body = json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "stream": true}).to_string();
        http(port, "POST", "/v1/completions", body.as_bytes()).unwrap()
    });
    // Let the stream start, then SIGTERM.
    let start = Instant::now();
    while server.metric("kiln_running_sequences") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, text) = streaming.join().unwrap();
    let tokens = sse_data(&text).iter().filter(|d| d.contains("\"text\"")).count();
    assert!(tokens >= 30, "the stream went on after SIGTERM: {tokens} chunks");
    assert_eq!(status, 200);
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the running stream finished: {text}");
    let finish: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let exit = server.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", server.log.lock().unwrap());
    assert!(http(port, "GET", "/health", b"").is_err(), "no new connections after shutdown");
}

/// The Python of `scripts/setup-test-tools.sh`'s virtual environment.
fn python() -> PathBuf {
    let p = root().join(".cache/venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup-test-tools.sh", p.display());
    p
}

fn run_python(script: &str, args: &[&str]) {
    let out = Command::new(python()).arg(root().join("tests/server").join(script)).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{script}:\n{stdout}{stderr}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
}

/// Each request chooses a LoRA adapter as its model (`base:adapter`, as vLLM lists adapters):
/// the official client sees the adapters in /v1/models, gets `kiln generate --lora`'s greedy text
/// for each, and a clear 404 for an adapter that is not loaded.
#[test]
fn requests_choose_lora_adapters_by_model_name() {
    let model = fixture("llama3-tiny");
    let adapter = |n: &str| fixture("llama3-tiny-lora").join(n).to_str().unwrap().to_string();
    let (a, b) = (adapter("adapter-a"), adapter("adapter-b"));
    let server = Server::start(&model, &["--lora", &a, "--lora", &b]);
    let base_text = kiln_generate(&model, PROMPT, 12);
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["generate", "--model", model.to_str().unwrap(), "--lora", &a, "--prompt", PROMPT])
        .args(["--temperature", "0", "--max-tokens", "12"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let adapter_text = String::from_utf8(out.stdout).unwrap().trim_end_matches('\n').to_string();
    assert_ne!(base_text, adapter_text, "the adapter changes the continuation");
    run_python("lora_client.py", &[&server.url(), PROMPT, &base_text, &adapter_text]);
}

/// `kiln serve --lookup`: greedy requests are decoded speculatively inside the batch (drafts by
/// prompt lookup, checked in the same step); the text is `kiln generate`'s, and /metrics counts
/// drafted and accepted tokens.
#[test]
fn prompt_lookup_speculation_in_the_server_keeps_the_output_and_reports_acceptance() {
    // SmolLM2 repeats code it has seen, so drafts are made and kept (the tiny random models
    // rarely repeat two tokens).
    let model = smollm();
    let server = Server::start(&model, &["--lookup", "--draft-tokens", "3"]);
    let prompt = "def area(width, height):\n    return width * height\n\n\ndef area(width, height):\n";
    let want = kiln_generate(&model, prompt, 40);
    let body = json!({"prompt": prompt, "max_tokens": 40, "temperature": 0});
    let (status, v) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    // Streamed, and several at once: the same text each time.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (port, body) =
                (server.port, json!({"prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": true}));
            std::thread::spawn(move || http(port, "POST", "/v1/completions", body.to_string().as_bytes()).unwrap())
        })
        .collect();
    for h in handles {
        let (status, text) = h.join().unwrap();
        assert_eq!(status, 200);
        let streamed: String = sse_data(&text)
            .iter()
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(streamed, want);
    }
    let (drafted, accepted) =
        (server.metric("kiln_spec_draft_tokens_total"), server.metric("kiln_spec_accepted_tokens_total"));
    assert!(drafted > 0.0 && accepted > 0.0 && accepted <= drafted, "drafted {drafted}, accepted {accepted}");
}

#[test]
fn the_official_openai_client_works_against_the_server() {
    let model = fixture("llama3-tiny");
    let server = Server::start(&model, &[]);
    let want = kiln_generate(&model, PROMPT, 16);
    run_python("openai_client.py", &[&server.url(), &want, PROMPT]);
}

#[test]
fn sixty_four_concurrent_streams_on_smollm2_complete_and_cancellations_free_the_pool() {
    let server = Server::start(&smollm(), &["--kv-memory", "128M", "--max-running", "64"]);
    run_python("concurrency.py", &[&server.url(), &server.child.id().to_string()]);
}

#[test]
fn the_chat_page_streams_a_reply_in_a_headless_browser() {
    let server = Server::start(&fixture("qwen2-tiny"), &[]);
    let shot = std::env::temp_dir().join(format!("kiln-chat-page-{}.png", std::process::id()));
    run_python("chat_page.py", &[&server.url(), shot.to_str().unwrap()]);
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000, "a screenshot was taken");
}

#[test]
fn two_replicas_behind_nginx_share_the_load_and_losing_one_loses_no_request() {
    let nginx = Path::new("/usr/sbin/nginx");
    assert!(nginx.exists(), "nginx is missing: run scripts/setup-test-tools.sh");
    let model = fixture("llama3-tiny");
    let a = Server::start(&model, &["--shutdown-timeout", "60"]);
    let b = Server::start(&model, &["--shutdown-timeout", "60"]);
    let a_pid = a.child.id().to_string();
    let mut a = a;
    run_python(
        "replicas.py",
        &[&a.url(), &b.url(), &a_pid, nginx.to_str().unwrap(), std::env::temp_dir().to_str().unwrap()],
    );
    // The stopped replica drained its streams and exited cleanly.
    let exit = a.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", a.log.lock().unwrap());
    drop(b);
}

#[test]
fn a_full_queue_answers_503_and_bad_requests_never_disturb_a_running_stream() {
    let model = smollm();
    let server = Server::start(&model, &["--kv-memory", "64M", "--max-running", "1", "--max-waiting", "1"]);
    let port = server.port;
    let want = kiln_generate(&model, PROMPT, 24);
    let body = json!({"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": true}).to_string();
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || http(port, "POST", "/v1/completions", body.as_bytes()).unwrap())
        })
        .collect();
    let start = Instant::now();
    while server.metric("kiln_running_sequences") + server.metric("kiln_waiting_sequences") < 2.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "two requests in flight");
        std::thread::sleep(Duration::from_millis(5));
    }
    // One running and one waiting fill the queue: the next is refused, with Retry-After.
    let extra = json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let mut s = send(port, "POST", "/v1/completions", extra.as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("retry-after: 1"), "{reply}");
    assert!(reply.contains("\"code\":\"server_busy\""), "{reply}");
    // Garbage while the streams run.
    for bad in
        ["{", "[]", "{\"prompt\": 5}", "{\"prompt\": \"x\", \"temperature\": -1}", "{\"prompt\": \"x\", \"n\": 99}"]
    {
        let (status, _) = server.request("POST", "/v1/completions", bad.as_bytes());
        assert_eq!(status, 400, "{bad}");
    }
    for stream in streams {
        let (status, text) = stream.join().unwrap();
        assert_eq!(status, 200, "{text}");
        let got: String = sse_data(&text)
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "each stream's text is kiln generate's");
    }
    assert_eq!(server.metric("kiln_requests_total{outcome=\"busy\"}"), 1.0);
}
