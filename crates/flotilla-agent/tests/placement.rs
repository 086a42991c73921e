//! Start-up placement: a model that fits nowhere stops the agent before anything loads,
//! with one line naming the shortfall; what fits is placed and served.

use flotilla_agent::{Agent, AgentError, AgentSection, ModelSpec};
use flotilla_api::protocol::ModelKind;
use flotilla_gpu::FixedGpu;

fn l4() -> FixedGpu {
    FixedGpu {
        used_gib: 2.0,
        ..FixedGpu::new("NVIDIA L4", 24.0)
    }
}

#[tokio::test]
async fn a_model_that_fits_nowhere_stops_the_agent_with_the_shortfall() {
    let dir = tempfile::tempdir().unwrap();
    flotilla_engine::make_test_model(dir.path()).unwrap();
    let src = dir.path().to_str().unwrap();
    let section = AgentSection {
        fixed_gpus: vec![l4()],
        models: vec![
            ModelSpec::new("tiny", src, ModelKind::Chat),
            // Sized as the catalog's 70B: 131 GiB of bf16 weights against 21.6 GiB usable.
            ModelSpec {
                catalog: Some("llama-3.1-70b".into()),
                ..ModelSpec::new("big", src, ModelKind::Chat)
            },
        ],
        ..AgentSection::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = match Agent::load(listener, section.validate().unwrap()).await {
        Err(e) => e,
        Ok(_) => panic!("the agent started with a model that cannot fit"),
    };
    let AgentError::Placement(lines) = &err else {
        panic!("not a placement refusal: {err}");
    };
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(
        line.starts_with("model `big` (catalog:llama-3.1-70b"),
        "{line}"
    );
    assert!(
        line.contains("GPU 0 (NVIDIA L4) has 21.6 GiB usable"),
        "{line}"
    );
    assert!(line.contains("short"), "{line}");

    // Without it the tiny model is placed (on the described L4, run on the CPU) and served.
    let section = AgentSection {
        models: section.models[..1].to_vec(),
        ..section
    };
    let (plan, _) = flotilla_agent::plan(&section.validate().unwrap())
        .await
        .unwrap();
    assert_eq!(plan.plan.device_of("tiny").unwrap().spec(), "cuda:0");
    assert_eq!(
        plan.engine_device(&section.models[0]),
        flotilla_engine::DeviceSpec::Cpu
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = Agent::load(listener, section.validate().unwrap())
        .await
        .unwrap();
    assert!(agent.models().chat.contains_key("tiny"));
    assert_eq!(agent.models().devices["tiny"], "cpu");
}

#[tokio::test]
async fn unknown_repo_ids_cannot_be_sized_before_download() {
    let hub = tempfile::tempdir().unwrap();
    let section = AgentSection {
        hf_cache_dir: Some(hub.path().to_path_buf()),
        offline: true,
        models: vec![ModelSpec::new(
            "x",
            "someone/unknown-model",
            ModelKind::Chat,
        )],
        ..AgentSection::default()
    };
    let Err(err) = flotilla_agent::plan(&section.validate().unwrap()).await else {
        panic!("an unknown, uncached repo id was sized");
    };
    let err = err.to_string();
    assert!(err.contains("cannot size `someone/unknown-model`"), "{err}");
    assert!(err.contains("catalog"), "{err}");
}

/// The placement's KV estimate is what the engine really allocates, for the default budget
/// and for explicit ones.
#[test]
fn kv_estimate_matches_the_engines_allocation() {
    use flotilla_gpu::ModelShape;
    use flotilla_gpu::catalog::DeviceKind;
    let dir = tempfile::tempdir().unwrap();
    flotilla_engine::make_test_model(dir.path()).unwrap();
    let shape = ModelShape::from_dir(dir.path(), false).unwrap();
    for (seqs, blocks, bytes) in [
        (None, None, None),
        (Some(3), None, None),
        (None, None, Some(300_000)),
        (None, Some(40), None),
    ] {
        let spec = ModelSpec {
            max_num_seqs: seqs,
            kv_cache_blocks: blocks,
            kv_cache_bytes: bytes,
            ..ModelSpec::new("tiny", dir.path().to_str().unwrap(), ModelKind::Chat)
        };
        let budget = flotilla_agent::placement::budget(&spec);
        let engine =
            flotilla_engine::TextEngine::load("tiny", dir.path(), spec.engine_config()).unwrap();
        let st = engine.status();
        let allocated =
            (st.kv_blocks_total * st.kv_block_size) as u64 * shape.kv_bytes_per_token(4);
        let e = shape.estimate(DeviceKind::Host, &budget);
        assert_eq!(e.kv_cache, allocated, "{seqs:?} {blocks:?} {bytes:?}");
        // f32 weights on the CPU: the safetensors file's parameters x 4 bytes.
        assert_eq!(e.weights, shape.parameters * 4);
    }
}
