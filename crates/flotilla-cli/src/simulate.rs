//! `flotilla simulate`: replays a trace against the simulated fleet a config describes,
//! under each chosen policy, and prints one row per policy with its cost under both
//! accountings (marginal and owned); or, with `--generate`, writes an example trace and,
//! with `--generate-config`, a fleet to replay it against.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Context;
use flotilla_scheduler::sim::{
    GenerateOptions, SimConfig, SimPolicy, Trace, cost_ratios, generate, markdown_table,
    scenario_config, simulate_all,
};
use serde::Serialize;

use crate::cli::SimulateArgs;

#[derive(Serialize)]
struct JsonReport<'a> {
    trace: String,
    config: String,
    requests: usize,
    span_s: f64,
    seed: u64,
    policies: &'a [flotilla_scheduler::sim::PolicyReport],
}

pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let text = render(args)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// What `run` prints.
pub fn render(args: &SimulateArgs) -> anyhow::Result<String> {
    let mut out = String::new();
    if let Some(out_path) = &args.generate {
        let opts = GenerateOptions {
            requests: args.requests,
            duration_s: args.duration_s,
            seed: args.seed.unwrap_or(1),
            model: args.model.clone(),
        };
        let trace = generate(&opts)?;
        std::fs::write(out_path, trace.to_jsonl())
            .with_context(|| format!("writing {}", out_path.display()))?;
        writeln!(
            out,
            "wrote {} requests over {} s (seed {}) to {}",
            trace.requests.len(),
            opts.duration_s,
            opts.seed,
            out_path.display()
        )?;
        if let Some(cfg_path) = &args.generate_config {
            let text = scenario_config(&opts);
            // What we write must be what `--config` accepts.
            SimConfig::parse(&text)?;
            std::fs::write(cfg_path, text)
                .with_context(|| format!("writing {}", cfg_path.display()))?;
            writeln!(out, "wrote its fleet to {}", cfg_path.display())?;
        }
        return Ok(out);
    }
    if args.generate_config.is_some() {
        anyhow::bail!("--generate-config goes with --generate");
    }
    let (Some(trace_path), Some(config_path)) = (&args.trace, &args.config) else {
        anyhow::bail!("--trace and --config are required (or --generate OUT.jsonl)");
    };
    let mut cfg = SimConfig::read(config_path)?;
    if let Some(seed) = args.seed {
        cfg.seed = seed;
    }
    let trace = Trace::read(trace_path)?;
    let policies: Vec<SimPolicy> = if args.policies.is_empty() {
        SimPolicy::ALL.to_vec()
    } else {
        args.policies.clone()
    };
    let rows = simulate_all(&cfg, &trace, &policies)?;
    if args.json {
        let report = JsonReport {
            trace: trace_path.display().to_string(),
            config: config_path.display().to_string(),
            requests: trace.requests.len(),
            span_s: trace.span_s(),
            seed: cfg.seed,
            policies: &rows,
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(out);
    }
    let slots: u64 = cfg.agents.iter().map(|a| a.slots).sum();
    writeln!(
        out,
        "{}: {} requests over {:.0} s; {} agent(s) with {slots} slots, {} cloud target(s); seed {}\n",
        trace_path.display(),
        trace.requests.len(),
        trace.span_s(),
        cfg.agents.len(),
        cfg.cloud.len(),
        cfg.seed
    )?;
    out.push_str(&markdown_table(&rows));
    out.push_str(
        "\nCost: marginal = busy GPU time + cloud; owned = every GPU over the whole window + cloud.\n",
    );
    out.push_str(&cost_ratios(&rows, SimPolicy::Flotilla.as_str()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn args(argv: &[&str]) -> crate::cli::SimulateArgs {
        let mut full = vec!["flotilla", "simulate"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full) {
            Ok(Cli {
                command: Command::Simulate(a),
                ..
            }) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn generate_then_simulate_the_example_config() {
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("t.jsonl");
        let trace = trace.to_str().unwrap();
        let config = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/sim/config.toml"
        );
        let fleet = dir.path().join("fleet.toml");
        let fleet = fleet.to_str().unwrap();
        let said = super::render(&args(&[
            "--generate",
            trace,
            "--generate-config",
            fleet,
            "--requests",
            "300",
            "--duration-s",
            "60",
            "--seed",
            "4",
        ]))
        .unwrap();
        assert!(said.starts_with("wrote 300 requests"), "{said}");
        assert!(said.contains("wrote its fleet"), "{said}");

        let table = super::render(&args(&["--trace", trace, "--config", config])).unwrap();
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 6, "header + five policies:\n{table}");
        for p in [
            "flotilla",
            "cloud-only",
            "local-only",
            "round-robin",
            "ordered-fallback",
        ] {
            assert!(
                rows.iter().any(|r| r.starts_with(&format!("| {p} |"))),
                "{p}"
            );
        }

        let json = super::render(&args(&[
            "--trace",
            trace,
            "--config",
            config,
            "--policy",
            "flotilla",
            "--policy",
            "cloud-only",
            "--json",
        ]))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let names: Vec<&str> = v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["policy"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["flotilla", "cloud-only"]);
        assert_eq!(v["requests"], 300);
        let owned = v["policies"][1]["owned_cost_usd"].as_f64().unwrap();
        let marginal = v["policies"][1]["cost_usd"].as_f64().unwrap();
        assert!(owned > marginal, "cloud-only still owns the idle fleet");

        // The generated fleet replays the generated trace, both accountings printed.
        let table = super::render(&args(&["--trace", trace, "--config", fleet])).unwrap();
        assert!(table.contains("owned cost USD"), "{table}");
        assert!(
            table.contains("flotilla / cloud-only: marginal "),
            "{table}"
        );

        // Without --generate, both inputs are needed; unknown policies are refused.
        let cli = |argv: &[&str]| {
            let mut full = vec!["flotilla", "simulate"];
            full.extend_from_slice(argv);
            Cli::try_parse_from(full)
        };
        assert!(cli(&["--trace", trace]).is_err());
        assert!(cli(&["--trace", trace, "--config", config, "--policy", "random"]).is_err());
        assert!(cli(&["--generate", trace, "--json"]).is_err());
        assert!(
            super::render(&args(&[
                "--trace",
                trace,
                "--config",
                config,
                "--generate-config",
                fleet
            ]))
            .is_err()
        );
    }
}
