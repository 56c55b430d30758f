//! Rules the control plane sends over the agent's stream: checked like the agent's own, merged
//! after them, and cached on disk so that a host restarted while the control plane is down
//! still enforces them.

use std::path::Path;

use crate::config::{Config, ConfigError, RuleConfig};

/// Most rules an agent enforces (one bit each in the kernel's masks).
const MAX_RULES: usize = 64;

/// Parses the TOML the decider sent (`[[rule]]` tables only).
pub fn parse(text: &str) -> Result<Vec<RuleConfig>, ConfigError> {
    let config = Config::parse(text, Path::new("<rules from the decider>"))?;
    Ok(config.rules)
}

/// The agent's own rules first, then the server's; a server rule whose name the agent already
/// uses is skipped (the host's own file wins). Fails if the total exceeds what the kernel side
/// can hold.
pub fn merge(local: &[RuleConfig], server: &[RuleConfig]) -> Result<Vec<RuleConfig>, String> {
    let mut out = local.to_vec();
    for rule in server {
        if out.iter().any(|r| r.name == rule.name) {
            tracing::warn!(rule = %rule.name, "server rule has the name of a local rule; the local one stays");
            continue;
        }
        out.push(rule.clone());
    }
    if out.len() > MAX_RULES {
        return Err(format!(
            "{} rules (local and from the decider); at most {MAX_RULES} are supported",
            out.len()
        ));
    }
    Ok(out)
}

/// Rules cached by an earlier run, if any (a bad cache is ignored with a warning).
pub fn load_cache(path: &Path) -> Vec<RuleConfig> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    match parse(&text) {
        Ok(rules) => {
            tracing::info!(path = %path.display(), rules = rules.len(), "using cached rules from the decider");
            rules
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a bad rules cache");
            Vec::new()
        }
    }
}

/// Writes the rules text to the cache atomically.
pub fn save_cache(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "[[rule]]\nname = \"db\"\nconnect = [\"10.0.0.0/8\"]\ndecision = \"ask\"\n\n[[rule]]\nname = \"kubectl\"\nexec = [\"/bin/sh\"]\ndecision = \"deny\"\n";

    #[test]
    fn local_rules_come_first_and_win_on_name() {
        let local = Config::parse(
            "[[rule]]\nname = \"kubectl\"\nexec = [\"/bin/sh\"]\ndecision = \"ask\"\n",
            Path::new("a.toml"),
        )
        .unwrap()
        .rules;
        let merged = merge(&local, &parse(SERVER).unwrap()).unwrap();
        let names: Vec<&str> = merged.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["kubectl", "db"]);
        assert_eq!(
            merged[0].decision,
            crate::policy::Decision::Ask,
            "the local kubectl rule"
        );
    }

    #[test]
    fn bad_rules_from_the_decider_are_refused_with_position() {
        let err = parse("[[rule]]\nname = \"x\"\ndecision = \"sometimes\"\nexec = [\"/bin/sh\"]\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("<rules from the decider>:3:12"),
            "{err}"
        );
    }

    #[test]
    fn cache_round_trips_and_a_bad_cache_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/server-rules.toml");
        save_cache(&path, SERVER).unwrap();
        assert_eq!(load_cache(&path).len(), 2);
        std::fs::write(&path, "not toml [").unwrap();
        assert!(load_cache(&path).is_empty());
        assert!(load_cache(&dir.path().join("missing")).is_empty());
    }
}
