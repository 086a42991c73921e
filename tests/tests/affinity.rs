//! Prefix affinity, proven end to end: requests that share a long system prompt go to the
//! agent that holds its KV blocks (its prefix-hit counter rises) while another agent sits
//! idle, and with Redis every replica sends them there.

use std::time::Duration;

use flotilla_e2e::*;
use flotilla_gateway::{LocalBalance, SchedulerSection, StateSection};
use serde_json::json;

const SYSTEM: &str = "You are the harbour master of a small fishing town. You know every \
boat, every berth and every tide table by heart, and you answer captains briefly and \
precisely, always naming the berth, the tide and the hour.";

fn prefixed(question: &str) -> serde_json::Value {
    json!({"model": "tiny-llama", "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question}]})
}

/// Spread (emptiest agent first, ties by name): without affinity every request on an idle
/// fleet would go to node-a.
fn spread() -> SchedulerSection {
    SchedulerSection {
        local_balance: LocalBalance::Spread,
        affinity_max_imbalance: 2,
        ..scheduler_section()
    }
}

async fn prefix_hits(agent: &str) -> f64 {
    metric(agent, "flotilla_prefix_cache_hit_tokens_total")
        .await
        .unwrap_or(0.0)
}

/// Sends the first prefixed request while node-a is busy, so it lands on node-b; then
/// waits until node-a is idle again.
async fn seed_prefix_on_b(sched: &str, a: &Running) {
    let long = start_long_stream(sched).await;
    assert_eq!(target(&long), "local:node-a/tiny-llama");
    let first = post(
        &format!("{sched}/v1/chat/completions"),
        &prefixed("Where is berth 1?"),
    )
    .await;
    assert_eq!(target(&first), "local:node-b/tiny-llama");
    drop(long);
    for _ in 0..500 {
        if engine_running(&a.url).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("node-a never went idle");
}

#[tokio::test]
async fn a_shared_system_prompt_stays_on_the_agent_that_has_its_blocks() {
    let sched = start_scheduler(spread()).await;
    let a = start_agent(&sched.url, "node-a", chat_models(load_tiny(4))).await;
    let b = start_agent(&sched.url, "node-b", chat_models(load_tiny(4))).await;
    seed_prefix_on_b(&sched.url, &a).await;
    let hits_before = prefix_hits(&b.url).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    for i in 0..8 {
        let resp = post(&url, &prefixed(&format!("When is high tide at berth {i}?"))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            target(&resp),
            "local:node-b/tiny-llama",
            "request {i} left the agent with the prefix while node-a was idle"
        );
    }
    assert!(
        prefix_hits(&b.url).await > hits_before,
        "node-b reused the prefix's blocks"
    );
    assert_eq!(prefix_hits(&a.url).await, 0.0);
    // Another prompt has no affinity: the idle node-a takes it.
    let other = chat_body("tiny-llama", "hello", json!({"max_tokens": 4}));
    assert_eq!(target(&post(&url, &other).await), "local:node-a/tiny-llama");
    a.stop().await;
    b.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn affinity_learned_by_one_replica_is_followed_by_another() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let section = SchedulerSection {
        state: StateSection {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            key_prefix: format!("flotilla-test:affinity:{}:{nanos}", std::process::id()),
            sync_ms: 100,
            timeout_ms: 200,
            ..StateSection::default()
        },
        ..spread()
    };
    let one = start_scheduler(section.clone()).await;
    let two = start_scheduler(section).await;
    let a = start_agent(&one.url, "node-a", chat_models(load_tiny(4))).await;
    let b = start_agent(&one.url, "node-b", chat_models(load_tiny(4))).await;
    seed_prefix_on_b(&one.url, &a).await;
    // Replica two knows the nodes through Redis...
    let mut nodes = 0;
    for _ in 0..100 {
        let v = get_json(&format!("{}/admin/v1/nodes", two.url)).await;
        nodes = v["nodes"].as_array().map_or(0, Vec::len);
        if nodes == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(nodes, 2);
    // ...never served the prefix, and heard where it went.
    let url = format!("{}/v1/chat/completions", two.url);
    for i in 0..6 {
        let resp = post(&url, &prefixed(&format!("Which berth is free at {i}?"))).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(target(&resp), "local:node-b/tiny-llama", "request {i}");
    }
    a.stop().await;
    b.stop().await;
    one.stop().await;
    two.stop().await;
}
