//! `flotilla chat`: a conversation with a scheduler (or any OpenAI-compatible server) from
//! the terminal. Answers stream in as they are generated; after each one a line on stderr
//! says where it ran and how long it took. Lines starting with `/` are commands.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cli::ChatArgs;

const HELP: &str = "commands: /model NAME (switch model), /reset (forget the conversation), \
                    /exit (or Ctrl-D)";

/// How one turn ended.
#[derive(Debug, Default)]
struct Turn {
    text: String,
    target: Option<String>,
    reason: Option<String>,
    ttft: Option<Duration>,
    took: Duration,
    completion_tokens: Option<u64>,
    finish_reason: Option<String>,
}

/// Why a turn failed: the server's own message when it sent an OpenAI error.
#[derive(Debug)]
struct TurnError {
    message: String,
    /// The server refused the model itself (400 naming `model`, or 404): another may do.
    model_refused: bool,
}

pub async fn run(args: &ChatArgs) -> anyhow::Result<()> {
    let base = args.scheduler_url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let interactive = std::io::stdin().is_terminal();
    let mut candidates = match &args.model {
        Some(m) => vec![m.clone()],
        None => list_models(&http, &base, args.api_key.as_deref()).await?,
    };
    candidates.reverse();
    let mut model = candidates
        .pop()
        .context("the server lists no models: name one with --model")?;
    let chosen = args.model.is_some();
    let mut history: Vec<Value> = Vec::new();
    if let Some(system) = &args.system {
        history.push(json!({"role": "system", "content": system}));
    }
    if interactive {
        eprintln!("chatting with {model} at {base}; {HELP}");
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut failed = 0usize;
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next_line().await.context("reading stdin")? else {
            break;
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match (name, arg.trim()) {
                ("exit" | "quit", _) => break,
                ("reset", _) => {
                    history.retain(|m| m["role"] == "system");
                    eprintln!("(conversation forgotten)");
                }
                ("model", "") => eprintln!("model: {model}"),
                ("model", m) => {
                    model = m.to_owned();
                    eprintln!("model: {model}");
                }
                _ => eprintln!("{HELP}"),
            }
            continue;
        }
        history.push(json!({"role": "user", "content": line}));
        loop {
            match turn(&http, &base, args, &model, &history).await {
                Ok(t) => {
                    eprintln!("{}", summary(&model, &t));
                    history.push(json!({"role": "assistant", "content": t.text}));
                    break;
                }
                // No model named: the listing's first may serve embeddings only.
                Err(e) if e.model_refused && !chosen && !candidates.is_empty() => {
                    model = candidates.pop().expect("not empty");
                }
                Err(e) => {
                    eprintln!("error: {}", e.message);
                    failed += 1;
                    // The question stays unanswered: not part of the conversation.
                    history.pop();
                    break;
                }
            }
        }
    }
    if failed > 0 && !interactive {
        anyhow::bail!("{failed} request(s) failed");
    }
    Ok(())
}

/// `[where · why · first token · whole answer · tokens]`, for stderr.
fn summary(model: &str, t: &Turn) -> String {
    let mut parts = vec![model.to_owned()];
    parts.extend(t.target.clone());
    parts.extend(t.reason.clone());
    if let Some(ttft) = t.ttft {
        parts.push(format!("first token {} ms", ttft.as_millis()));
    }
    parts.push(format!("{} ms", t.took.as_millis()));
    if let Some(n) = t.completion_tokens {
        parts.push(format!("{n} token{}", if n == 1 { "" } else { "s" }));
    }
    if let Some(f) = t.finish_reason.as_deref().filter(|f| *f != "stop") {
        parts.push(format!("finish: {f}"));
    }
    format!("[{}]", parts.join(" · "))
}

async fn list_models(
    http: &reqwest::Client,
    base: &str,
    key: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let url = format!("{base}/v1/models");
    let mut req = http.get(&url).timeout(Duration::from_secs(10));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("asking {url} for its models"))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .with_context(|| format!("reading {url}'s answer"))?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {}", error_message(&body));
    }
    Ok(body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect())
}

fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string().chars().take(300).collect())
}

/// Sends the conversation and prints the answer to stdout as it streams.
async fn turn(
    http: &reqwest::Client,
    base: &str,
    args: &ChatArgs,
    model: &str,
    history: &[Value],
) -> Result<Turn, TurnError> {
    let fail = |message: String| TurnError {
        message,
        model_refused: false,
    };
    let mut body = json!({
        "model": model,
        "messages": history,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(n) = args.max_tokens {
        body["max_tokens"] = json!(n);
    }
    if let Some(t) = args.temperature {
        body["temperature"] = json!(t);
    }
    let started = Instant::now();
    let mut req = http.post(format!("{base}/v1/chat/completions")).json(&body);
    if let Some(k) = &args.api_key {
        req = req.bearer_auth(k);
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| fail(format!("sending to {base}: {e}")))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        return Err(TurnError {
            model_refused: status == 404 || (status == 400 && v["error"]["param"] == "model"),
            message: format!("{status}: {}", error_message(&v)),
        });
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut t = Turn {
        target: header(flotilla_api::headers::TARGET),
        reason: header(flotilla_api::headers::ROUTE_REASON),
        ..Turn::default()
    };
    let mut out = std::io::stdout();
    let mut buf: Vec<u8> = Vec::new();
    let mut done = false;
    while !done {
        let chunk = resp
            .chunk()
            .await
            .map_err(|e| fail(format!("the stream broke: {e}")))?;
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        while let Some((event, rest)) = split_event(&buf) {
            let event = event.to_vec();
            buf.drain(..rest);
            for data in data_lines(&event) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&data)
                    .map_err(|e| fail(format!("unreadable chunk ({e}): {data}")))?;
                if v.get("error").is_some() {
                    let _ = writeln!(out);
                    return Err(fail(format!(
                        "the stream ended early: {}",
                        error_message(&v)
                    )));
                }
                if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                    if t.ttft.is_none() && !c.is_empty() {
                        t.ttft = Some(started.elapsed());
                    }
                    t.text.push_str(c);
                    let _ = out.write_all(c.as_bytes());
                    let _ = out.flush();
                }
                if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                    t.finish_reason = Some(f.to_owned());
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    t.completion_tokens = Some(n);
                }
            }
        }
    }
    let _ = writeln!(out);
    let _ = out.flush();
    if !done {
        return Err(fail(
            "the stream ended without [DONE]: the answer may be cut short".into(),
        ));
    }
    t.took = started.elapsed();
    Ok(t)
}

/// The first complete SSE event in `buf` and the bytes it and its blank line take.
fn split_event(buf: &[u8]) -> Option<(&[u8], usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    let (end, sep) = match (lf, crlf) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (a, b) => a.or(b)?,
    };
    Some((&buf[..end], end + sep))
}

/// The `data:` payloads of one event (several lines join with `\n`, as SSE says).
fn data_lines(event: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(event);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        Vec::new()
    } else {
        vec![data.join("\n")]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_of_either_kind() {
        let buf = b"data: {\"a\":1}\r\n\r\ndata: [DONE]\n\nrest";
        let (e, n) = split_event(buf).unwrap();
        assert_eq!(data_lines(e), vec!["{\"a\":1}"]);
        let (e, m) = split_event(&buf[n..]).unwrap();
        assert_eq!(data_lines(e), vec!["[DONE]"]);
        assert_eq!(&buf[n + m..], b"rest");
        assert!(split_event(b"data: partial").is_none());
        assert!(data_lines(b": comment").is_empty());
        assert_eq!(data_lines(b"data: a\ndata: b"), vec!["a\nb"]);
    }

    #[test]
    fn the_summary_names_where_and_how_long() {
        let t = Turn {
            target: Some("local:n/m".into()),
            reason: Some("local_capacity".into()),
            ttft: Some(Duration::from_millis(12)),
            took: Duration::from_millis(80),
            completion_tokens: Some(5),
            finish_reason: Some("length".into()),
            ..Turn::default()
        };
        assert_eq!(
            summary("m", &t),
            "[m · local:n/m · local_capacity · first token 12 ms · 80 ms · 5 tokens · finish: length]"
        );
    }
}
