//! Sampling options and logprobs through scheduler -> agent -> engine, over real HTTP.
//!
//! The tiny test model's weights are random but fixed, so its greedy text is the same on
//! every run; its near-flat distributions make any sampling visibly different from greedy.

use flotilla_e2e::*;
use serde_json::{Value, json};

struct Fleet {
    sched: Running,
    agent: Running,
}

impl Fleet {
    async fn start() -> Self {
        let sched = start_scheduler(scheduler_section()).await;
        let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(4))).await;
        Fleet { sched, agent }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sched.url)
    }

    async fn chat(&self, extra: Value) -> Value {
        let body = chat_body("tiny-llama", "Tell me about the sea", extra);
        let resp = post(&self.url("/v1/chat/completions"), &body).await;
        assert_eq!(resp.status(), 200, "{body}");
        resp.json().await.expect("JSON answer")
    }

    async fn chat_text(&self, extra: Value) -> String {
        self.chat(extra).await["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned()
    }

    async fn stop(self) {
        self.agent.stop().await;
        self.sched.stop().await;
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test]
async fn invalid_sampling_values_are_400_naming_the_param() {
    let fleet = Fleet::start().await;
    let chat_cases = [
        (json!({"top_k": -2}), "top_k"),
        (json!({"top_k": 1.5}), "top_k"),
        (json!({"top_k": "3"}), "top_k"),
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"min_p": -0.1}), "min_p"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"repetition_penalty": -1.0}), "repetition_penalty"),
        (json!({"frequency_penalty": 2.5}), "frequency_penalty"),
        (json!({"frequency_penalty": "high"}), "frequency_penalty"),
        (json!({"presence_penalty": -2.01}), "presence_penalty"),
        (json!({"logprobs": "yes"}), "logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            json!({"logprobs": true, "top_logprobs": 2.5}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": false, "top_logprobs": 1}),
            "top_logprobs",
        ),
    ];
    for (extra, param) in chat_cases {
        let body = chat_body("tiny-llama", "hi", extra.clone());
        let resp = post(&fleet.url("/v1/chat/completions"), &body).await;
        assert_eq!(resp.status(), 400, "{extra}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let completion_cases = [
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"logprobs": -1}), "logprobs"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"top_k": -5}), "top_k"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
    ];
    for (extra, param) in completion_cases {
        let mut body = json!({"model": "tiny-llama", "prompt": "hi"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let resp = post(&fleet.url("/v1/completions"), &body).await;
        assert_eq!(resp.status(), 400, "{extra}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    fleet.stop().await;
}

#[tokio::test]
async fn unknown_fields_and_off_values_are_accepted() {
    let fleet = Fleet::start().await;
    let greedy = json!({"temperature": 0, "max_tokens": 12});
    let base = fleet.chat_text(greedy.clone()).await;
    // Unknown fields are ignored; 0 and -1 both turn top_k off (vLLM reads both so); the
    // neutral values of every option change nothing.
    let mut extra = greedy.clone();
    extra.as_object_mut().unwrap().extend(
        json!({"best_of_everything": {"x": 1}, "mirostat": 2, "top_k": -1, "min_p": 0,
               "repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0,
               "logprobs": false, "top_logprobs": null})
        .as_object()
        .unwrap()
        .clone(),
    );
    assert_eq!(fleet.chat_text(extra.clone()).await, base);
    extra["top_k"] = json!(0);
    assert_eq!(fleet.chat_text(extra).await, base);
    fleet.stop().await;
}

#[tokio::test]
async fn each_filter_narrowed_to_one_token_is_greedy() {
    let fleet = Fleet::start().await;
    let greedy = fleet
        .chat_text(json!({"temperature": 0, "max_tokens": 20}))
        .await;
    let sampled = json!({"temperature": 1.0, "seed": 7, "max_tokens": 20});
    // Plain sampling at this temperature leaves the greedy path: the check below means
    // something.
    assert_ne!(fleet.chat_text(sampled.clone()).await, greedy);
    for narrow in [
        json!({"top_k": 1}),
        // Only tokens as likely as the best survive.
        json!({"min_p": 1.0}),
        // The nucleus of any distribution holds at least its top token.
        json!({"top_p": 1e-6}),
    ] {
        let mut extra = sampled.clone();
        extra
            .as_object_mut()
            .unwrap()
            .extend(narrow.as_object().unwrap().clone());
        assert_eq!(fleet.chat_text(extra).await, greedy, "{narrow}");
    }
    fleet.stop().await;
}

#[tokio::test]
async fn seeded_sampling_with_every_option_is_reproducible() {
    let fleet = Fleet::start().await;
    let extra = json!({"temperature": 0.9, "top_k": 100, "top_p": 0.95, "min_p": 0.01,
        "repetition_penalty": 1.1, "frequency_penalty": 0.3, "presence_penalty": 0.2,
        "seed": 42, "max_tokens": 24});
    let a = fleet.chat_text(extra.clone()).await;
    assert_eq!(a, fleet.chat_text(extra.clone()).await);
    let mut other = extra;
    other["seed"] = json!(43);
    assert_ne!(a, fleet.chat_text(other).await);
    fleet.stop().await;
}

#[tokio::test]
async fn strong_penalties_change_the_greedy_text() {
    let fleet = Fleet::start().await;
    let greedy = json!({"temperature": 0, "max_tokens": 40});
    let base = fleet.chat_text(greedy.clone()).await;
    for penalty in [
        json!({"repetition_penalty": 3.0}),
        json!({"frequency_penalty": 2.0}),
        json!({"presence_penalty": 2.0}),
    ] {
        let mut extra = greedy.clone();
        extra
            .as_object_mut()
            .unwrap()
            .extend(penalty.as_object().unwrap().clone());
        let text = fleet.chat_text(extra.clone()).await;
        assert_ne!(text, base, "{penalty} left the greedy text unchanged");
        // Still greedy: the same penalty gives the same text.
        assert_eq!(fleet.chat_text(extra).await, text);
    }
    fleet.stop().await;
}

#[tokio::test]
async fn logprobs_are_null_unless_asked_for() {
    let fleet = Fleet::start().await;
    let v = fleet.chat(json!({"temperature": 0, "max_tokens": 4})).await;
    let choice = v["choices"][0].as_object().unwrap();
    assert!(choice.contains_key("logprobs") && choice["logprobs"].is_null());
    let v = fleet
        .chat(json!({"temperature": 0, "max_tokens": 4, "logprobs": true}))
        .await;
    assert!(v["choices"][0]["logprobs"]["content"].is_array(), "{v}");

    let v = post_json(
        &fleet.url("/v1/completions"),
        &json!({"model": "tiny-llama", "prompt": "Once", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert!(v["choices"][0]["logprobs"].is_null());
    let v = post_json(
        &fleet.url("/v1/completions"),
        &json!({"model": "tiny-llama", "prompt": "Once", "max_tokens": 4, "temperature": 0,
                "logprobs": 2}),
    )
    .await;
    for list in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert!(v["choices"][0]["logprobs"][list].is_array(), "{list}: {v}");
    }
    fleet.stop().await;
}

/// Checks one chat `logprobs.content` entry of a greedy run asking for `top` alternatives.
fn check_greedy_entry(entry: &Value, top: usize) {
    let logprob = f(&entry["logprob"]);
    assert!(logprob <= 0.0, "{entry}");
    assert!(entry["token"].is_string(), "{entry}");
    assert!(entry["bytes"].is_array(), "{entry}");
    let alts = entry["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(alts.len(), top, "{entry}");
    for a in alts {
        assert!(f(&a["logprob"]) <= 0.0 && a["token"].is_string() && a["bytes"].is_array());
    }
    assert!(
        alts.windows(2)
            .all(|w| f(&w[0]["logprob"]) >= f(&w[1]["logprob"]))
    );
    if let Some(best) = alts.first() {
        // Greedy picks the likeliest token.
        assert!((logprob - f(&best["logprob"])).abs() < 1e-6, "{entry}");
    }
}

/// Waits on the engine reporting logprobs in its deltas.
#[tokio::test]
async fn chat_logprobs_one_entry_per_token() {
    let fleet = Fleet::start().await;
    for top in [3usize, 0] {
        let mut extra = json!({"temperature": 0, "max_tokens": 12, "logprobs": true});
        if top > 0 {
            extra["top_logprobs"] = json!(top);
        }
        let v = fleet.chat(extra).await;
        let content = v["choices"][0]["logprobs"]["content"]
            .as_array()
            .expect("content");
        let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert_eq!(content.len() as u64, completion, "{v}");
        for entry in content {
            check_greedy_entry(entry, top);
        }
    }
    fleet.stop().await;
}

/// Waits on the engine reporting logprobs in its deltas.
#[tokio::test]
async fn chat_stream_logprobs_match_the_whole_answer() {
    let fleet = Fleet::start().await;
    let extra = json!({"temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 2});
    let whole = fleet.chat(extra.clone()).await;

    let mut streamed = extra;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let body = chat_body("tiny-llama", "Tell me about the sea", streamed);
    let sse = read_sse(post(&fleet.url("/v1/chat/completions"), &body).await).await;
    assert!(sse.saw_done, "{}", sse.raw);
    let mut entries = Vec::new();
    for e in &sse.events {
        let Some(choice) = e.pointer("/choices/0") else {
            continue;
        };
        // A chunk with text or tokens carries their logprobs; role and finish chunks none.
        if let Some(content) = choice.pointer("/logprobs/content") {
            entries.extend(content.as_array().expect("content").iter().cloned());
        }
    }
    let usage = &sse.events.last().unwrap()["usage"];
    assert_eq!(
        entries.len() as u64,
        usage["completion_tokens"].as_u64().unwrap(),
        "{}",
        sse.raw
    );
    for entry in &entries {
        check_greedy_entry(entry, 2);
    }
    let tokens =
        |list: &[Value]| -> Vec<Value> { list.iter().map(|e| e["token"].clone()).collect() };
    let whole_entries = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(tokens(&entries), tokens(whole_entries));
    fleet.stop().await;
}

/// Checks a legacy `logprobs` object of a greedy run asking for `n` alternatives.
fn check_legacy(lp: &Value, n: usize, completion: u64) {
    let list = |name: &str| {
        lp[name]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {lp}"))
    };
    let tokens = list("tokens");
    assert_eq!(tokens.len() as u64, completion, "{lp}");
    for name in ["token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(list(name).len(), tokens.len(), "{name}: {lp}");
    }
    let mut last_offset = 0;
    for (i, token) in tokens.iter().enumerate() {
        let token = token.as_str().expect("token");
        let logprob = f(&list("token_logprobs")[i]);
        assert!(logprob <= 0.0, "{lp}");
        let top = list("top_logprobs")[i].as_object().expect("top map");
        // The alternatives plus the chosen token: up to n + 1 entries.
        assert!(!top.is_empty() && top.len() <= n + 1, "{lp}");
        assert!((f(&top[token]) - logprob).abs() < 1e-6, "{lp}");
        let best = top.values().map(f).fold(f64::NEG_INFINITY, f64::max);
        assert!(
            (best - logprob).abs() < 1e-6,
            "greedy picks the likeliest: {lp}"
        );
        let offset = list("text_offset")[i].as_u64().expect("offset");
        assert!(offset >= last_offset, "{lp}");
        last_offset = offset;
    }
    assert_eq!(list("text_offset").first().and_then(Value::as_u64), Some(0));
}

/// Waits on the engine reporting logprobs in its deltas.
#[tokio::test]
async fn legacy_completion_logprobs_have_parallel_lists() {
    let fleet = Fleet::start().await;
    let body = json!({"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 10,
        "temperature": 0, "logprobs": 3});
    let v = post_json(&fleet.url("/v1/completions"), &body).await;
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    check_legacy(&v["choices"][0]["logprobs"], 3, completion);

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let sse = read_sse(post(&fleet.url("/v1/completions"), &streamed).await).await;
    assert!(sse.saw_done, "{}", sse.raw);
    let mut merged =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for e in &sse.events {
        let Some(lp) = e.pointer("/choices/0/logprobs").filter(|l| !l.is_null()) else {
            continue;
        };
        for name in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let more = lp[name].as_array().unwrap().clone();
            merged[name].as_array_mut().unwrap().extend(more);
        }
    }
    check_legacy(&merged, 3, completion);
    assert_eq!(merged["tokens"], v["choices"][0]["logprobs"]["tokens"]);
    assert_eq!(
        merged["text_offset"],
        v["choices"][0]["logprobs"]["text_offset"]
    );
    fleet.stop().await;
}
