//! `airlock-agent mcp`: an MCP server (stdio) for the AI agents on this host (Claude Code,
//! Cursor, Copilot and others), on the official Rust SDK (`rmcp`).
//!
//! It runs as the AI agent's own account and forwards each tool call to the local agent's
//! socket ([`crate::local_api`]), which takes the caller's account from the connection: the
//! MCP server holds no privilege and no secret, and cannot speak for another account.

use std::path::PathBuf;

use rmcp::{
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router, ErrorData as McpError, ServerHandler, ServiceExt,
};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::local_api::{ActionArgs, Call};

/// The action a tool is about.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ActionParams {
    /// A command line as a shell would run it, e.g. `kubectl -n prod delete ns payments`.
    /// Give this or `destination`.
    #[serde(default)]
    pub command: Option<String>,
    /// A network destination `ADDRESS:PORT` (IPv6 as `[ADDRESS]:PORT`), e.g.
    /// `10.20.3.4:5432`. Give this or `command`.
    #[serde(default)]
    pub destination: Option<String>,
    /// For `destination`: `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// The directory the command will run in; default: this MCP server's.
    #[serde(default)]
    pub cwd: Option<String>,
}

impl From<ActionParams> for ActionArgs {
    fn from(p: ActionParams) -> Self {
        Self {
            command: p.command,
            destination: p.destination,
            protocol: p.protocol,
            cwd: p.cwd,
        }
    }
}

/// `airlock_request`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RequestParams {
    /// The action.
    #[serde(flatten)]
    pub action: ActionParams,
    /// Why you need to do this, for the people who approve it. Be specific: ticket, change,
    /// what you verified.
    pub justification: String,
    /// How long the approval should last, in minutes (default 10).
    #[serde(default)]
    pub minutes: Option<u32>,
}

/// `airlock_status`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StatusParams {
    /// The request id (from `airlock_request`, or from an `airlock:` line on stderr).
    pub request_id: String,
    /// Wait up to this many seconds for a decision (at most 600); 0 or absent: answer now.
    #[serde(default)]
    pub wait_secs: Option<u64>,
}

/// `airlock_why`'s parameters.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WhyParams {
    /// How many recent requests (default 10, at most 100).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// The MCP server: four tools, each a call on the agent's socket.
#[derive(Debug, Clone)]
pub struct Airlock {
    socket: PathBuf,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Airlock {
    /// A server that forwards to the agent's socket at `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Dry run: would this command or connection be allowed, held for human approval, or denied for this account on this host? Says which Airlock rule matches, who may approve and how many must, and any grant that already covers it. Asks nobody and records nothing."
    )]
    async fn airlock_check(
        &self,
        Parameters(p): Parameters<ActionParams>,
    ) -> Result<CallToolResult, McpError> {
        self.call(Call::Check { action: p.into() }).await
    }

    #[tool(
        description = "Ask ahead for approval of a command or connection that Airlock would hold, with your justification. Approvers see it marked as asked ahead, your justification shown as your own words. An approval is a grant for that exact action, account, directory and host for the given minutes: the real command then runs at once. Returns a request id for airlock_status."
    )]
    async fn airlock_request(
        &self,
        Parameters(p): Parameters<RequestParams>,
    ) -> Result<CallToolResult, McpError> {
        self.call(Call::Request {
            action: p.action.into(),
            justification: p.justification,
            minutes: p.minutes,
        })
        .await
    }

    #[tool(
        description = "The state of one of your Airlock requests (pending, approved, denied, expired): votes, who decided and why. Can wait up to wait_secs for the decision."
    )]
    async fn airlock_status(
        &self,
        Parameters(p): Parameters<StatusParams>,
    ) -> Result<CallToolResult, McpError> {
        self.call(Call::Status {
            request_id: p.request_id,
            wait_secs: p.wait_secs,
        })
        .await
    }

    #[tool(
        description = "Your account's recent Airlock requests on this host, newest first, with their decisions and the reasons given: why something was held, denied or allowed."
    )]
    async fn airlock_why(
        &self,
        Parameters(p): Parameters<WhyParams>,
    ) -> Result<CallToolResult, McpError> {
        self.call(Call::Why { limit: p.limit }).await
    }
}

impl Airlock {
    /// Sends `call` to the agent and turns its answer into a tool result: the answer as JSON
    /// text, or an error result saying what went wrong (the model can act on it).
    async fn call(&self, call: Call) -> Result<CallToolResult, McpError> {
        match self.ask_agent(&call).await {
            Ok(v) => match (v.get("ok"), v.get("error")) {
                (Some(ok), _) => Ok(CallToolResult::success(vec![ContentBlock::text(
                    serde_json::to_string_pretty(ok).unwrap_or_default(),
                )])),
                (_, Some(Value::String(e))) => {
                    Ok(CallToolResult::error(vec![ContentBlock::text(e.clone())]))
                }
                _ => Ok(CallToolResult::error(vec![ContentBlock::text(
                    "the Airlock agent gave an answer this server does not understand",
                )])),
            },
            Err(e) => Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "cannot reach the Airlock agent at {}: {e}",
                self.socket.display()
            ))])),
        }
    }

    async fn ask_agent(&self, call: &Call) -> std::io::Result<Value> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(call)?;
        line.push(b'\n');
        write.write_all(&line).await?;
        let mut answer = String::new();
        BufReader::new(read).read_line(&mut answer).await?;
        serde_json::from_str(&answer).map_err(std::io::Error::other)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Airlock {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "airlock-agent",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Airlock holds privileged commands and connections on this host until a human \
                 approves them. Before running something that may be held (kubectl delete, \
                 terraform apply, a production database), call airlock_check; if it would be \
                 held, call airlock_request with a specific justification, then airlock_status \
                 with wait_secs, and run the command once approved. A held command prints \
                 `airlock:` lines on its stderr with its request id.",
            )
    }
}

/// Serves MCP on stdin/stdout until the client goes away.
pub async fn serve(socket: PathBuf) -> anyhow::Result<()> {
    let service = Airlock::new(socket).serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}
