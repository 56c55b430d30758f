//! A real MCP client (rmcp's own) for the guest tests: starts `airlock-agent mcp` as a child
//! over stdio, runs initialize, lists the tools and calls the ones given, printing each answer
//! as a `@@R` line the test reads.
//!
//! `airlock-mcp-probe AGENT_BINARY [KEY TOOL JSON_ARGUMENTS]...`

use std::process::ExitCode;

use rmcp::{
    model::CallToolRequestParams,
    transport::{ConfigureCommandExt, TokioChildProcess},
    ServiceExt,
};
use serde_json::{json, Value};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("@@R mcp_error {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (agent, calls) = args
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("usage: airlock-mcp-probe AGENT [KEY TOOL JSON]..."))?;
    anyhow::ensure!(calls.len() % 3 == 0, "calls come as KEY TOOL JSON");
    let transport = TokioChildProcess::new(tokio::process::Command::new(agent).configure(|c| {
        c.arg("mcp");
    }))?;
    let client = ().serve(transport).await?;
    let server = client
        .peer_info()
        .and_then(|i| i.server_info.as_ref().map(|s| s.name.clone()))
        .unwrap_or_default();
    println!("@@R mcp_server {server}");
    let mut tools: Vec<String> = client
        .list_all_tools()
        .await?
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    tools.sort();
    println!("@@R mcp_tools {}", tools.join(","));
    for call in calls.chunks(3) {
        let (key, tool, arguments) = (&call[0], &call[1], &call[2]);
        let arguments: Value = serde_json::from_str(arguments)?;
        let params = CallToolRequestParams::new(tool.clone()).with_arguments(
            arguments
                .as_object()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{key}: arguments must be a JSON object"))?,
        );
        let result = client.call_tool(params).await?;
        let text: Vec<String> = result
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect();
        let text = text.join("\n");
        // The answer's JSON when it is JSON, else its text.
        let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
        let out = json!({ "is_error": result.is_error.unwrap_or(false), "body": body });
        println!("@@R {key} {out}");
    }
    client.cancel().await?;
    Ok(())
}
