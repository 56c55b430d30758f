//! How agent-supplied text is shown to people: one line naming an action by the executable the
//! kernel ran (not the `argv[0]` the caller chose), and escapes for terminals and spreadsheets.
//!
//! Everything in a request except its host id comes from the agent's host, where the person
//! asking controls argv, the working directory, environment values and even the hostname.

use std::borrow::Cow;
use std::fmt::Write as _;

use airlock_proto::v1::{action_request::Action, ExecAction, Protocol};

/// Whether `c` must not reach a terminal or a one-line field as it is: C0 and C1 controls
/// (ESC starts the sequences that hide, recolour or rewrite text), DEL, line and paragraph
/// separators, and the bidirectional overrides that reorder what is shown.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `s` with every control character (newlines too) written as `\u{..}`, `\n`, `\t`..., so that
/// it shows as one inert line on a terminal.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON text `json` with the characters [`escape_control`] escapes that JSON encoders leave raw
/// (DEL, C1 controls, bidirectional overrides) written as `\uXXXX`: the same value, inert on a
/// terminal.
pub fn escape_json(json: &str) -> Cow<'_, str> {
    if !json.chars().any(unsafe_char) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if unsafe_char(c) {
            // Every such character is in the Basic Multilingual Plane: one \u escape.
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The last path component of `p`.
fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// One exec action as a line: the executable the kernel ran (the script for an interpreter,
/// the program for a loader when the agent named it), then the arguments after `argv[0]`, then
/// `argv[0]` when it is not that executable's name, since the caller chooses it freely
/// (`exec -a echo terraform destroy`).
pub fn exec_line(e: &ExecAction) -> String {
    let exe = if !e.program.is_empty() && e.via != "loader" {
        e.program.as_str()
    } else {
        e.path.as_str()
    };
    let mut out = if exe.is_empty() {
        e.argv.first().cloned().unwrap_or_default()
    } else {
        exe.to_owned()
    };
    for a in e.argv.iter().skip(1) {
        out.push(' ');
        out.push_str(a);
    }
    if let Some(a0) = e.argv.first() {
        if !exe.is_empty() && base(a0) != base(exe) {
            let _ = write!(out, " [argv[0]: {a0}]");
        }
    }
    out
}

/// What a request would do, in one line: [`exec_line`], or `connect host:port/proto`.
pub fn action_line(action: Option<&Action>) -> String {
    match action {
        Some(Action::Exec(e)) => exec_line(e),
        Some(Action::Connect(c)) => {
            let proto = if c.protocol == Protocol::Udp as i32 {
                "udp"
            } else {
                "tcp"
            };
            // A name the address stood for: `orders-db.prod.internal (10.20.3.4):5432`. The
            // agent sends it (from its own rules); escaped wherever it is shown, like the rest.
            match (c.name.is_empty(), c.address.contains(':')) {
                (true, true) => format!("connect [{}]:{}/{proto}", c.address, c.port),
                (true, false) => format!("connect {}:{}/{proto}", c.address, c.port),
                (false, _) => format!("connect {} ({}):{}/{proto}", c.name, c.address, c.port),
            }
        }
        None => String::new(),
    }
}

/// `s` as literal text in an Adaptive Card field, which Teams renders as Markdown: controls
/// escaped ([`escape_control`]), every Markdown punctuation character backslash-escaped, and a
/// zero-width space after each `]` and `<` so that `[text](url)` and `<url>` cannot become
/// links even in clients that ignore backslash escapes (Teams mobile shows them as written).
pub fn teams_text(s: &str) -> String {
    let s = escape_control(s);
    let mut out = String::with_capacity(s.len() + 8);
    // A leading list or heading marker ("- x", "1. x", "# x") would restyle the whole value.
    let digits = s.chars().take_while(char::is_ascii_digit).count();
    if matches!(s.chars().next(), Some('-' | '+' | '#' | '>'))
        || (digits > 0 && s[digits..].starts_with(['.', ')']))
    {
        out.push('\\');
    }
    for c in s.chars() {
        // Emphasis, code, links and autolinks: the Markdown Teams renders.
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '[' | ']' | '(' | ')' | '<' | '>' | '~'
        ) {
            out.push('\\');
        }
        out.push(c);
        if matches!(c, ']' | '<') {
            out.push('\u{200b}');
        }
    }
    out
}

/// `s` as a CSV cell a spreadsheet shows as text: a leading `=`, `+`, `-`, `@`, tab or CR
/// (which start a formula in Excel, LibreOffice and Sheets) gets a `'` before it.
pub fn csv_text(s: &str) -> Cow<'_, str> {
    match s.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => Cow::Owned(format!("'{s}")),
        _ => Cow::Borrowed(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_shows_the_name_beside_the_address() {
        let c = |name: &str, address: &str| {
            Action::Connect(airlock_proto::v1::ConnectAction {
                address: address.into(),
                port: 5432,
                name: name.into(),
                ..Default::default()
            })
        };
        assert_eq!(
            action_line(Some(&c("orders-db.prod.internal", "10.20.3.4"))),
            "connect orders-db.prod.internal (10.20.3.4):5432/tcp"
        );
        assert_eq!(
            action_line(Some(&c("", "2001:db8::1"))),
            "connect [2001:db8::1]:5432/tcp"
        );
    }

    #[test]
    fn escapes_terminal_controls() {
        assert_eq!(escape_control("kubectl get pods"), "kubectl get pods");
        assert_eq!(
            escape_control("get pods\u{1b}[8m delete\nok\u{202e}x\u{9b}"),
            "get pods\\u{1b}[8m delete\\nok\\u{202e}x\\u{9b}"
        );
    }

    #[test]
    fn json_stays_json() {
        let j = serde_json::to_string(&"a\u{9b}b\u{202e}").unwrap();
        let safe = escape_json(&j);
        assert!(!safe.chars().any(unsafe_char), "{safe}");
        let back: String = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, "a\u{9b}b\u{202e}");
    }

    #[test]
    fn names_the_executable_not_argv0() {
        let e = ExecAction {
            path: "/usr/bin/terraform".into(),
            argv: vec!["echo".into(), "destroy".into()],
            ..Default::default()
        };
        assert_eq!(exec_line(&e), "/usr/bin/terraform destroy [argv[0]: echo]");
        let e = ExecAction {
            path: "/usr/bin/kubectl".into(),
            argv: vec!["kubectl".into(), "get".into()],
            ..Default::default()
        };
        assert_eq!(exec_line(&e), "/usr/bin/kubectl get");
        let script = ExecAction {
            path: "/usr/bin/python3".into(),
            program: "/opt/deploy.py".into(),
            via: "script".into(),
            argv: vec!["/opt/deploy.py".into(), "--prod".into()],
            ..Default::default()
        };
        assert_eq!(exec_line(&script), "/opt/deploy.py --prod");
    }

    #[test]
    fn teams_links_stay_text() {
        let t = teams_text("[Approve here](https://evil.example)");
        assert!(!t.contains("]("), "{t}");
        assert!(t.starts_with("\\[Approve here\\]\u{200b}\\("), "{t}");
        assert_eq!(teams_text("web-1"), "web-1");
        assert_eq!(teams_text("- item"), "\\- item");
        assert_eq!(teams_text("12. x"), "\\12. x");
    }

    #[test]
    fn csv_formulas_become_text() {
        assert_eq!(csv_text("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(csv_text("-1+2"), "'-1+2");
        assert_eq!(csv_text("kubectl"), "kubectl");
    }
}
