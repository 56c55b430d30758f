//! Every query of the Grafana dashboard (deploy/grafana/airlock.json) names metrics that exist:
//! the server's from a live scrape of a running `airlock-server`'s /metrics, the agent's from
//! its registry in-process (fast, no guest). The packaged agent's live /metrics is checked
//! against the same queries in the QEMU guest (tests/tests/package_guest.rs). The dashboard
//! covers what an operator watches.

#[path = "support/server.rs"]
mod server;

use std::{collections::BTreeSet, io::Read, io::Write, net::TcpStream, path::Path};

use airlock_agent::metrics::AgentMetrics;
use airlock_testkit::prometheus::{exposition_names as names, metrics_in};
use server::Server;

fn scrape(base: &str) -> String {
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_owned()
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("airlock.db").display());
    // One notification channel, so its failure counter exists (at zero) as on a real server.
    let secret = dir.path().join("hook-key");
    std::fs::write(&secret, "k").unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[[webhook]]\nname = \"siem\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .unwrap();
    let server = Server::start(dir.path(), &db, &["--config".as_ref(), config.as_os_str()]);
    let server_names = names(&scrape(&server.http_url()));
    // The agent as its /metrics handler leaves it at every scrape (kernel and program totals
    // folded in), after it has released one hold.
    let agent = AgentMetrics::default();
    agent.update_kernel(&[0; airlock_agent::bpf::COUNTER_NAMES.len()]);
    agent.update_programs(&[("exec_hold".into(), 1, std::time::Duration::from_micros(3))]);
    agent.applied(false, "timeout", 1.0);
    let agent_names = names(&agent.render().unwrap());
    assert!(
        server_names.contains("airlock_pending_requests"),
        "{server_names:?}"
    );
    assert!(
        agent_names.contains("airlock_agent_kernel_events_total"),
        "{agent_names:?}"
    );

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/airlock.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_owned();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let found = metrics_in(expr);
            assert!(
                !found.is_empty(),
                "panel {title:?}: {expr} names no Airlock metric"
            );
            for name in found {
                assert!(
                    server_names.contains(&name) || agent_names.contains(&name),
                    "panel {title:?}: {name} is exported by neither the server \
                     ({server_names:?}) nor the agent ({agent_names:?})"
                );
                used.insert(name);
            }
        }
        titles.push(title);
    }
    // What the operator watches, each from the metric that measures it.
    for want in [
        "airlock_requests_total",
        "airlock_decisions_total",
        "airlock_decision_latency_seconds_bucket",
        "airlock_pending_requests",
        "airlock_notification_failures_total",
        "airlock_connected_agents",
        "airlock_agent_kernel_events_total",
    ] {
        assert!(used.contains(want), "no panel uses {want}: {titles:?}");
    }
    for want in ["expired", "hold_", "pass", "drop_", "by (instance"] {
        assert!(
            std::fs::read_to_string(&path).unwrap().contains(want),
            "no query mentions {want}"
        );
    }
}
