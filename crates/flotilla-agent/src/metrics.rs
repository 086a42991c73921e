//! The agent's `/metrics`: GPU series under dcgm-exporter's names and labels, the host's
//! CPU and memory, and per-model engine series after vLLM's.

use flotilla_api::metrics::{self as m, TextEncoder};
use flotilla_api::protocol::{GpuStats, HostStats};

use crate::AgentState;
use crate::models::EMBEDDING_SLOTS;

const MIB: f64 = (1u64 << 20) as f64;

type GpuField = fn(&GpuStats) -> Option<f64>;

/// dcgm-exporter's default fields: name, help, reading.
const GPU_SERIES: &[(&str, &str, GpuField)] = &[
    (m::DCGM_GPU_UTIL, "GPU utilization (in %).", |g| {
        g.gpu_utilization_pct.map(f64::from)
    }),
    (m::DCGM_MEM_COPY_UTIL, "Memory utilization (in %).", |g| {
        g.memory_utilization_pct.map(f64::from)
    }),
    (m::DCGM_FB_USED, "Framebuffer memory used (in MiB).", |g| {
        Some((g.memory_used_bytes as f64 / MIB).floor())
    }),
    (m::DCGM_FB_FREE, "Framebuffer memory free (in MiB).", |g| {
        Some((g.memory_free_bytes as f64 / MIB).floor())
    }),
    (m::DCGM_GPU_TEMP, "GPU temperature (in C).", |g| {
        g.temperature_c.map(f64::from)
    }),
    (m::DCGM_POWER_USAGE, "Power draw (in W).", |g| {
        g.power_draw_w
    }),
    (m::DCGM_POWER_LIMIT, "Power management limit (in W).", |g| {
        g.power_limit_w
    }),
    (m::DCGM_SM_CLOCK, "SM clock frequency (in MHz).", |g| {
        g.sm_clock_mhz.map(f64::from)
    }),
    (m::DCGM_MEM_CLOCK, "Memory clock frequency (in MHz).", |g| {
        g.memory_clock_mhz.map(f64::from)
    }),
];

pub(crate) fn render(s: &AgentState, gpus: &[GpuStats], host: Option<&HostStats>) -> String {
    let mut e = TextEncoder::new();
    let hostname: &str = &s.hostname;
    for (name, help, read) in GPU_SERIES {
        let readings: Vec<(&GpuStats, f64)> = gpus
            .iter()
            .filter_map(|g| read(g).map(|v| (g, v)))
            .collect();
        if readings.is_empty() {
            continue;
        }
        e.family(name, "gauge", help);
        for (g, v) in readings {
            let index = g.index.to_string();
            let device = format!("nvidia{}", g.index);
            e.sample(
                name,
                &[
                    ("gpu", &index),
                    ("UUID", &g.uuid),
                    ("device", &device),
                    ("modelName", &g.name),
                    ("Hostname", hostname),
                ],
                v,
            );
        }
    }
    if let Some(h) = host {
        let labels = [("Hostname", hostname)];
        if let Some(u) = h.cpu_utilization {
            e.family(
                m::HOST_CPU_UTIL,
                "gauge",
                "Busy share of all CPUs since the previous reading.",
            );
            e.sample(m::HOST_CPU_UTIL, &labels, u);
        }
        e.family(m::HOST_MEMORY_TOTAL, "gauge", "Host memory.");
        e.sample(m::HOST_MEMORY_TOTAL, &labels, h.memory_total_bytes as f64);
        e.family(
            m::HOST_MEMORY_AVAILABLE,
            "gauge",
            "Host memory available to new work.",
        );
        e.sample(
            m::HOST_MEMORY_AVAILABLE,
            &labels,
            h.memory_available_bytes as f64,
        );
    }
    engine_series(&mut e, s);
    e.family(
        m::AGENT_DRAINING,
        "gauge",
        "1 while the agent finishes its work before leaving.",
    );
    e.sample(
        m::AGENT_DRAINING,
        &[],
        if s.drain.is_draining() { 1.0 } else { 0.0 },
    );
    e.finish()
}

fn engine_series(e: &mut TextEncoder, s: &AgentState) {
    let mut chat: Vec<_> = s.models.chat.iter().collect();
    chat.sort_by(|a, b| a.0.cmp(b.0));
    let mut embed: Vec<_> = s.models.embedding.iter().collect();
    embed.sort_by(|a, b| a.0.cmp(b.0));
    let status: Vec<_> = chat
        .iter()
        .map(|(n, eng)| (n.as_str(), eng.status()))
        .collect();

    // (running, waiting, max) for every model, embeddings included.
    let mut load: Vec<(&str, f64, f64, f64)> = status
        .iter()
        .map(|(n, st)| {
            (
                *n,
                st.running as f64,
                st.waiting as f64,
                st.max_running as f64,
            )
        })
        .collect();
    for (n, em) in &embed {
        let (running, waiting) = em.load();
        load.push((
            n.as_str(),
            running as f64,
            waiting as f64,
            EMBEDDING_SLOTS as f64,
        ));
    }
    for (name, help, pick) in [
        (
            m::REQUESTS_RUNNING,
            "Sequences in the running batch.",
            1usize,
        ),
        (
            m::REQUESTS_WAITING,
            "Sequences waiting for a batch slot.",
            2,
        ),
        (m::MAX_NUM_SEQS, "Sequences that may run at once.", 3),
    ] {
        e.family(name, "gauge", help);
        for (model, r, w, mx) in &load {
            let v = [*r, *w, *mx][pick - 1];
            e.sample(name, &[("model_name", model)], v);
        }
    }
    type Pick = fn(&flotilla_engine::EngineStatus) -> f64;
    let per_chat: [(&str, &str, &str, Pick); 6] = [
        (
            m::KV_CACHE_USAGE,
            "gauge",
            "KV-cache blocks held by running sequences, 0..1.",
            |st| {
                if st.kv_blocks_total == 0 {
                    0.0
                } else {
                    st.kv_blocks_used as f64 / st.kv_blocks_total as f64
                }
            },
        ),
        (
            m::KV_BLOCKS_TOTAL,
            "gauge",
            "KV-cache blocks in the pool.",
            |st| st.kv_blocks_total as f64,
        ),
        (
            m::PROMPT_TOKENS,
            "counter",
            "Prompt tokens run through the model.",
            |st| st.prompt_tokens_total as f64,
        ),
        (
            m::PREFIX_CACHE_HITS,
            "counter",
            "Prompt tokens served from cached prefix blocks.",
            |st| st.prefix_hit_tokens_total as f64,
        ),
        (m::GENERATION_TOKENS, "counter", "Tokens generated.", |st| {
            st.generated_tokens_total as f64
        }),
        (
            m::PREEMPTIONS,
            "counter",
            "Sequences preempted for KV-cache room.",
            |st| st.preemptions_total as f64,
        ),
    ];
    for (name, kind, help, pick) in per_chat {
        e.family(name, kind, help);
        for (model, st) in &status {
            e.sample(name, &[("model_name", model)], pick(st));
        }
    }
    let latency: Vec<_> = chat
        .iter()
        .map(|(n, eng)| (n.as_str(), eng.latency()))
        .collect();
    e.family(
        m::TTFT,
        "histogram",
        "Time from arrival to the first generated token.",
    );
    for (model, l) in &latency {
        e.histogram(m::TTFT, &[("model_name", model)], &l.time_to_first_token);
    }
    e.family(
        m::TPOT,
        "histogram",
        "Time between two generated tokens of one sequence.",
    );
    for (model, l) in &latency {
        e.histogram(m::TPOT, &[("model_name", model)], &l.time_per_output_token);
    }
}
