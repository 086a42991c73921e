//! `/metrics` read by a Prometheus text-format parser: GPU series under dcgm-exporter's
//! names and labels with the probe's values, and engine series that follow real traffic.

use std::time::Duration;

use flotilla_agent::{Agent, AgentSection, ModelSpec};
use flotilla_api::protocol::ModelKind;
use flotilla_gpu::{FixedGpu, FixedProbe};
use prometheus_parse::{Sample, Scrape, Value};
use tokio_util::sync::CancellationToken;

fn gpu(name: &str, gib: f64, used: f64, util: u32, temp: u32, watts: f64) -> FixedGpu {
    FixedGpu {
        used_gib: used,
        utilization_pct: Some(util),
        memory_utilization_pct: Some(util / 3),
        temperature_c: Some(temp),
        power_draw_w: Some(watts),
        power_limit_w: Some(700.0),
        sm_clock_mhz: Some(1755),
        memory_clock_mhz: Some(2619),
        ..FixedGpu::new(name, gib)
    }
}

fn find<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no {metric} {labels:?}"))
}

fn scalar(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, metric, labels).value {
        Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => v,
        ref other => panic!("{metric} is {other:?}"),
    }
}

async fn scrape(url: &str) -> Scrape {
    let resp = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

#[tokio::test]
async fn gpu_series_use_dcgm_names_and_engine_series_follow_traffic() {
    let models = tempfile::tempdir().unwrap();
    flotilla_engine::make_test_model(models.path()).unwrap();
    let gpus = vec![
        gpu("NVIDIA L4", 24.0, 6.0, 30, 51, 41.5),
        gpu("NVIDIA H100 80GB HBM3", 80.0, 40.0, 97, 66, 612.25),
    ];
    let section = AgentSection {
        fixed_gpus: gpus.clone(),
        models: vec![ModelSpec::new(
            "tiny",
            models.path().to_str().unwrap(),
            ModelKind::Chat,
        )],
        ..AgentSection::default()
    };
    let cfg = section.validate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The real start-up path: fixed probe from config, placement, load.
    let agent = Agent::load(listener, cfg).await.unwrap();
    let url = agent.base_url().to_owned();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let s = scrape(&url).await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let probe = FixedProbe::from_config(&gpus);
    let stats = flotilla_gpu::GpuProbe::read(&probe).gpus;
    for g in &stats {
        let index = g.index.to_string();
        let device = format!("nvidia{}", g.index);
        let labels = [
            ("gpu", index.as_str()),
            ("UUID", g.uuid.as_str()),
            ("device", device.as_str()),
            ("modelName", g.name.as_str()),
            ("Hostname", host.as_str()),
        ];
        let mib = |b: u64| (b >> 20) as f64;
        for (metric, want) in [
            (
                "DCGM_FI_DEV_GPU_UTIL",
                g.gpu_utilization_pct.unwrap() as f64,
            ),
            (
                "DCGM_FI_DEV_MEM_COPY_UTIL",
                g.memory_utilization_pct.unwrap() as f64,
            ),
            ("DCGM_FI_DEV_FB_USED", mib(g.memory_used_bytes)),
            ("DCGM_FI_DEV_FB_FREE", mib(g.memory_free_bytes)),
            ("DCGM_FI_DEV_GPU_TEMP", g.temperature_c.unwrap() as f64),
            ("DCGM_FI_DEV_POWER_USAGE", g.power_draw_w.unwrap()),
            ("DCGM_FI_DEV_SM_CLOCK", 1755.0),
            ("DCGM_FI_DEV_MEM_CLOCK", 2619.0),
        ] {
            assert_eq!(scalar(&s, metric, &labels), want, "{metric} {labels:?}");
            assert!(
                matches!(find(&s, metric, &labels).value, Value::Gauge(_)),
                "{metric} is a gauge"
            );
        }
    }
    assert_eq!(
        scalar(&s, "DCGM_FI_DEV_FB_USED", &[("gpu", "1")]),
        40.0 * 1024.0
    );
    assert_eq!(
        scalar(&s, "DCGM_FI_DEV_FB_FREE", &[("gpu", "0")]),
        18.0 * 1024.0
    );
    assert!(scalar(&s, "flotilla_host_memory_total_bytes", &[]) > 0.0);
    let m = [("model_name", "tiny")];
    assert_eq!(scalar(&s, "flotilla_num_requests_running", &m), 0.0);
    assert_eq!(scalar(&s, "flotilla_generation_tokens_total", &m), 0.0);
    assert_eq!(scalar(&s, "flotilla_kv_cache_usage_perc", &m), 0.0);
    assert_eq!(scalar(&s, "flotilla_agent_draining", &[]), 0.0);

    // One request of 12 tokens: 1 first token, 11 gaps between tokens.
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let body = serde_json::json!({"model": "tiny", "prompt": "metrics", "max_tokens": 12,
                                  "ignore_eos": true, "temperature": 0});
    let r: serde_json::Value = c
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 12);
    let prompt = r["usage"]["prompt_tokens"].as_f64().unwrap();

    let s = scrape(&url).await;
    assert_eq!(scalar(&s, "flotilla_generation_tokens_total", &m), 12.0);
    assert_eq!(scalar(&s, "flotilla_prompt_tokens_total", &m), prompt);
    assert_eq!(
        scalar(&s, "flotilla_prefix_cache_hit_tokens_total", &m),
        0.0
    );
    assert!(scalar(&s, "flotilla_kv_cache_blocks", &m) > 0.0);
    assert_eq!(scalar(&s, "flotilla_max_num_seqs", &m), 16.0);
    for (metric, count) in [
        ("flotilla_time_to_first_token_seconds", 1.0),
        ("flotilla_time_per_output_token_seconds", 11.0),
    ] {
        let Value::Histogram(buckets) = &find(&s, metric, &m).value else {
            panic!("{metric} is not a histogram");
        };
        let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
        assert_eq!(inf.count, count, "{metric}");
        // Cumulative buckets never decrease.
        assert!(
            buckets.windows(2).all(|w| w[0].count <= w[1].count),
            "{metric}"
        );
        assert_eq!(scalar(&s, &format!("{metric}_count"), &m), count);
        assert!(scalar(&s, &format!("{metric}_sum"), &m) > 0.0);
    }

    stop.cancel();
    task.await.unwrap().unwrap();
}
