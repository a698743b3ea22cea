//! `tandem serve` as a real process on loopback, driven over raw HTTP/1.1 and by the official
//! OpenAI Python SDK: both endpoints streaming and not, OpenAI error shapes and statuses,
//! concurrency, and a client disconnect freeing its KV blocks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tandem");

/// A server process, killed on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model_path() -> String {
    let out = Command::new(BIN).arg("fetch-model").output().expect("running tandem fetch-model");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .args(["serve", "--port", "0", "--kv-cache-bytes", "256MiB", "--served-model-name", "smol", "--model"])
        .arg(model_path())
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting tandem serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut port = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
            port = rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|p| p.parse().ok());
            break;
        }
    }
    // Keep draining the server's log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, port: port.expect("the server printed its address") }
}

/// One HTTP/1.1 request; returns (status, headers, body).
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, head.to_string(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, _, body) = http(port, "GET", "/metrics", &[], "");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{body}"))
}

/// KV blocks in use once the server has caught up: aborts land at the engine's next step, so
/// poll a bounded number of times (this bounds the test; it asserts no timing).
fn blocks_used_after_settling(port: u16) -> f64 {
    let mut used = 1.0;
    for _ in 0..200 {
        used = metric(port, "tandem_kv_blocks{state=\"used\"}");
        if used == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    used
}

#[test]
fn chat_and_completions_streaming_and_not() {
    let srv = start(&[]);
    let p = srv.port;
    let (st, _, body) = http(p, "GET", "/v1/models", &[], "");
    assert_eq!(st, 200);
    assert_eq!(json(&body)["data"][0]["id"], "smol");
    assert_eq!(http(p, "GET", "/health", &[], "").0, 200);
    assert_eq!(http(p, "GET", "/ready", &[], "").0, 200);

    let chat = r#"{"model":"smol","messages":[{"role":"user","content":[{"type":"text","text":"What is the capital of France?"}]}],"max_tokens":24,"temperature":0}"#;
    let (st, _, body) = http(p, "POST", "/v1/chat/completions", &[], chat);
    assert_eq!(st, 200, "{body}");
    let v = json(&body);
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );

    // The same request streamed: same text, role first, finish reason, usage, [DONE].
    let streamed = chat
        .replace("\"temperature\":0", "\"temperature\":0,\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    let (st, head, body) = http(p, "POST", "/v1/chat/completions", &[], &streamed);
    assert_eq!(st, 200);
    assert!(head.to_ascii_lowercase().contains("text/event-stream"));
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1].iter().map(|d| json(d)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, answer);
    let finish: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finish, vec!["stop"]);
    assert_eq!(chunks.last().unwrap()["choices"].as_array().unwrap().len(), 0);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], v["usage"]["completion_tokens"]);

    // Completions, with logprobs, non-streaming and streaming agree.
    let comp = r#"{"prompt":"The capital of France is","max_tokens":6,"temperature":0,"logprobs":3}"#;
    let (st, _, body) = http(p, "POST", "/v1/completions", &[], comp);
    assert_eq!(st, 200, "{body}");
    let c = json(&body);
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    let lp = &c["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    let (_, _, body) = http(p, "POST", "/v1/completions", &[], &comp.replace("\"logprobs\":3", "\"stream\":true"));
    let data = sse_data(&body);
    let text: String = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| json(d)["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, c["choices"][0]["text"].as_str().unwrap());
}

#[test]
fn errors_come_in_openai_shape_with_the_right_status() {
    let srv = start(&["--api-key", "sekrit", "--max-inflight", "1"]);
    let p = srv.port;
    let auth = [("Authorization", "Bearer sekrit")];
    let check = |(st, _, body): (u16, String, String), want: u16, kind: &str, param: Option<&str>| {
        assert_eq!(st, want, "{body}");
        let v = json(&body);
        assert_eq!(v["error"]["type"], kind, "{body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        if let Some(pm) = param {
            assert_eq!(v["error"]["param"], pm, "{body}");
        }
    };
    let ok = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    check(http(p, "POST", "/v1/chat/completions", &[], ok), 401, "authentication_error", None);
    check(
        http(p, "POST", "/v1/chat/completions", &[("Authorization", "Bearer nope")], ok),
        401,
        "authentication_error",
        None,
    );
    check(
        http(
            p,
            "POST",
            "/v1/chat/completions",
            &auth,
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        404,
        "not_found_error",
        Some("model"),
    );
    let huge = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(5 << 20));
    check(http(p, "POST", "/v1/completions", &auth, &huge), 413, "request_too_large", None);
    let long = format!(r#"{{"prompt":"{}","max_tokens":10}}"#, "hello ".repeat(9000));
    check(http(p, "POST", "/v1/completions", &auth, &long), 400, "invalid_request_error", Some("messages"));
    for (body, param) in [
        (r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":9000}"#, "max_tokens"),
        (r#"{"messages":[{"role":"user","content":"hi"}],"temperature":5}"#, "temperature"),
        (r#"{"messages":[{"role":"user","content":"hi"}],"n":3}"#, "n"),
        (r#"{"messages":[{"role":"wizard","content":"hi"}]}"#, "messages[0].role"),
        (r#"{"messages":[]}"#, "messages"),
        (r#"{"messages":[{"role":"user","content":"hi"}],"top_logprobs":3}"#, "top_logprobs"),
    ] {
        check(http(p, "POST", "/v1/chat/completions", &auth, body), 400, "invalid_request_error", Some(param));
    }
    check(http(p, "POST", "/v1/chat/completions", &auth, "{not json"), 400, "invalid_request_error", None);

    // With one request admitted at a time, a second concurrent one is told to retry.
    let mut long_stream = TcpStream::connect(("127.0.0.1", p)).unwrap();
    let body = r#"{"prompt":"Once upon a time","max_tokens":4000,"ignore_eos":true,"stream":true}"#;
    write!(
        long_stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    long_stream.read_exact(&mut first).unwrap();
    let (st, head, body) = http(p, "POST", "/v1/completions", &auth, r#"{"prompt":"hi","max_tokens":1}"#);
    assert_eq!(st, 429, "{body}");
    assert!(head.to_ascii_lowercase().contains("retry-after"));
    assert_eq!(json(&body)["error"]["type"], "rate_limit_error");
    drop(long_stream);
}

#[test]
fn concurrent_streams_complete_and_a_disconnect_frees_its_blocks() {
    let srv = start(&[]);
    let p = srv.port;
    let workers: Vec<_> = (0..64)
        .map(|i| {
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"messages":[{{"role":"user","content":"Count to {i}."}}],"max_tokens":6,"ignore_eos":true,"stream":true}}"#
                );
                let (st, _, body) = http(p, "POST", "/v1/chat/completions", &[], &body);
                (st, sse_data(&body))
            })
        })
        .collect();
    for w in workers {
        let (st, data) = w.join().unwrap();
        assert_eq!(st, 200);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let tokens = data.iter().filter(|d| d.contains("\"content\":\"") && !d.contains("\"role\"")).count();
        assert!(tokens >= 1);
    }
    assert_eq!(metric(p, "tandem_kv_blocks{state=\"used\"}"), 0.0, "blocks held after every stream ended");

    // A client that goes away mid-stream: its request is aborted and its blocks released.
    let mut s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    let body = r#"{"prompt":"Once upon a time","max_tokens":4000,"ignore_eos":true,"stream":true}"#;
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut buf = [0u8; 512];
    s.read_exact(&mut buf).unwrap();
    assert!(metric(p, "tandem_kv_blocks{state=\"used\"}") > 0.0);
    drop(s);
    // Bounded wait for the abort to land (not a timing assertion: it only bounds the test).
    let used = blocks_used_after_settling(p);
    assert_eq!(used, 0.0, "a disconnected client's blocks were not freed");
    assert!(metric(p, "tandem_requests_total{outcome=\"aborted\"}") >= 1.0);
}

#[test]
fn the_official_openai_python_sdk_streams_a_chat() {
    let srv = start(&[]);
    let script = format!(
        r#"
import openai
client = openai.OpenAI(base_url="http://127.0.0.1:{}/v1", api_key="unused")
stream = client.chat.completions.create(model="smol", messages=[{{"role": "user", "content": "What is the capital of France?"}}],
    max_tokens=24, temperature=0, stream=True, stream_options={{"include_usage": True}})
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert "Paris" in text, text
assert usage.completion_tokens > 0
done = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4, temperature=0)
assert done.choices[0].text.strip().startswith("Paris"), done
print("ok", text)
"#,
        srv.port
    );
    let out = Command::new("python3").arg("-c").arg(&script).output().expect("running python3");
    assert!(
        out.status.success(),
        "the OpenAI SDK failed (pip install openai):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_request_past_its_deadline_gets_504_and_its_work_is_freed() {
    let srv = start(&["--request-timeout", "0.5"]);
    let p = srv.port;
    let long = r#"{"prompt":"Once upon a time","max_tokens":4000,"ignore_eos":true}"#;
    let (st, _, body) = http(p, "POST", "/v1/completions", &[], long);
    assert_eq!(st, 504, "{body}");
    assert_eq!(json(&body)["error"]["type"], "timeout_error");
    let streamed = long.replace("}", r#","stream":true}"#);
    let (st, _, body) = http(p, "POST", "/v1/completions", &[], &streamed);
    assert_eq!(st, 200);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert!(data.iter().any(|d| d.contains("timeout_error")), "no timeout error in the stream");
    let used = blocks_used_after_settling(p);
    assert_eq!(used, 0.0, "a timed-out request's blocks were not freed");
}
