//! The config file: `[scheduler]` and `[agent]` sections. Unknown keys and invalid values
//! are all collected and reported together.

use std::path::Path;

use flotilla_agent::{AgentConfig, AgentSection};
use flotilla_gateway::{SchedulerConfig, SchedulerSection};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    pub scheduler: SchedulerSection,
    pub agent: AgentSection,
}

/// Every problem with a config file, one per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Parses TOML text. Unknown keys are collected rather than failing on the first.
pub fn parse(text: &str) -> Result<FileConfig, ConfigErrors> {
    let value: toml::Value = text
        .parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let mut unknown = Vec::new();
    let parsed: Result<FileConfig, _> =
        serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    let mut errors: Vec<String> = unknown
        .into_iter()
        .map(|k| format!("{k}: unknown key"))
        .collect();
    match parsed {
        Ok(cfg) if errors.is_empty() => Ok(cfg),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(e) => {
            errors.push(e.to_string());
            Err(ConfigErrors(errors))
        }
    }
}

pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigErrors> {
    match path {
        None => Ok(FileConfig::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| ConfigErrors(vec![format!("{}: {e}", p.display())]))?;
            parse(&text)
        }
    }
}

/// Validates both sections, reporting the errors of both together.
pub fn resolve(
    file: &FileConfig,
    need_agent: bool,
) -> Result<(SchedulerConfig, Option<AgentConfig>), ConfigErrors> {
    let mut errors = Vec::new();
    let sched = file.scheduler.validate().map_err(|e| errors.extend(e)).ok();
    let agent = if need_agent {
        file.agent.validate().map_err(|e| errors.extend(e)).ok()
    } else {
        None
    };
    match sched {
        Some(s) if errors.is_empty() => Ok((s, agent)),
        _ => Err(ConfigErrors(errors)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_unknown_keys_are_reported() {
        let err =
            parse("[scheduler]\nlisten = \"x\"\nbogus = 1\n[agent]\nalso_bogus = true\n[nope]\n")
                .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(err.0.iter().any(|e| e.contains("scheduler.bogus")));
        assert!(err.0.iter().any(|e| e.contains("agent.also_bogus")));
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = r#"
            [scheduler]
            listen = "127.0.0.1:8080"
            [[scheduler.providers]]
            name = "openai"
            base_url = "https://api.openai.com/v1"
            api_key_env = "OPENAI_API_KEY"
            [[scheduler.models]]
            name = "tiny-llama"
            max_queue_depth = 4
            cloud = [{ provider = "openai", model = "gpt-4o-mini" }]
            [agent]
            [[agent.models]]
            name = "tiny-llama"
            source = "builtin:tiny-llama"
        "#;
        let cfg = parse(text).unwrap();
        let (s, a) = resolve(&cfg, true).unwrap();
        assert_eq!(s.groups["tiny-llama"].max_queue_depth, 4);
        assert_eq!(a.unwrap().models.len(), 1);
    }

    #[test]
    fn validation_errors_of_both_sections_come_together() {
        let cfg = parse("[scheduler]\nheartbeat_ms = 0\n[agent]\nheartbeat_ms = 0\n").unwrap();
        let err = resolve(&cfg, true).unwrap_err();
        assert!(
            err.0
                .iter()
                .any(|e| e.starts_with("scheduler.heartbeat_ms")),
            "{err}"
        );
        assert!(
            err.0.iter().any(|e| e.starts_with("agent.heartbeat_ms")),
            "{err}"
        );
    }
}
