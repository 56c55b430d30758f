//! Fan-out of request events to notification channels (Slack, Teams, generic webhooks).

/// Tables of the notification channels (delivery log, posted Slack messages).
pub const SCHEMA: &str = "";
