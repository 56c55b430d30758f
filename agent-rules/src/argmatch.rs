//! Argument patterns: a rule's `args` entries, matched against a command's arguments as tokens.
//!
//! A pattern is a list of tokens, written as one string split the way a shell splits words
//! (`"delete ns \"two words\""`), or as a TOML array of tokens. Each token matches one argument
//! as a glob (`*`, `?`, `[a-z]` within that argument), except a token that is `*` alone (or
//! `**`), which matches any number of arguments, none included. The pattern must account for
//! every argument:
//!
//! | pattern         | matches                                                      |
//! |-----------------|--------------------------------------------------------------|
//! | `delete *`      | `delete`, `delete ns prod`; not `-n prod delete ns x`        |
//! | `* delete *`    | `delete` wherever it is: `-n prod delete ns x`               |
//! | `* --force`     | a command line whose last argument is `--force`              |
//! | `apply -f prod*`| exactly three arguments, the last starting with `prod`       |
//!
//! Arguments are the command's own, after the program (argv[0], which the caller chooses, is
//! never one of them). Empty arguments are arguments too.

use globset::{Glob, GlobMatcher};

/// One compiled pattern.
#[derive(Debug, Clone)]
pub struct ArgPattern {
    text: String,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone)]
enum Token {
    /// Any number of arguments.
    Rest,
    /// Exactly one argument matching the glob.
    One(GlobMatcher),
}

impl ArgPattern {
    /// Compiles the pattern `text`; the error says which token is wrong and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let words = shell_words::split(text).map_err(|e| format!("{text:?}: {e}"))?;
        Self::from_tokens(text, &words)
    }

    /// Compiles a pattern given as tokens already.
    pub fn from_tokens(text: &str, words: &[String]) -> Result<Self, String> {
        let tokens = words
            .iter()
            .map(|w| {
                if w == "*" || w == "**" {
                    return Ok(Token::Rest);
                }
                Glob::new(w)
                    .map(|g| Token::One(g.compile_matcher()))
                    .map_err(|e| format!("{text:?}: token {w:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            text: text.to_owned(),
            tokens,
        })
    }

    /// The pattern as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether `args` (the arguments after the program) match the whole pattern.
    pub fn matches(&self, args: &[String]) -> bool {
        // ok[j]: the tokens seen so far can match exactly the first j arguments.
        let mut ok = vec![false; args.len() + 1];
        ok[0] = true;
        for token in &self.tokens {
            let mut next = vec![false; args.len() + 1];
            match token {
                Token::Rest => {
                    let mut reachable = false;
                    for j in 0..=args.len() {
                        reachable |= ok[j];
                        next[j] = reachable;
                    }
                }
                Token::One(glob) => {
                    for j in 0..args.len() {
                        next[j + 1] = ok[j] && glob.is_match(&args[j]);
                    }
                }
            }
            ok = next;
        }
        ok[args.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    fn m(pattern: &str, a: &[&str]) -> bool {
        ArgPattern::parse(pattern).unwrap().matches(&args(a))
    }

    #[test]
    fn rest_token_matches_any_number_of_arguments() {
        assert!(m("delete *", &["delete"]));
        assert!(m("delete *", &["delete", "ns", "prod"]));
        assert!(!m("delete *", &["get", "delete"]));
        assert!(m("* delete *", &["-n", "prod", "delete", "ns", "x"]));
        assert!(m("** delete **", &["delete"]));
        assert!(!m("* delete *", &["get", "pods", "--selector=delete"]));
    }

    #[test]
    fn globs_stay_within_one_argument() {
        assert!(m("apply -f prod*", &["apply", "-f", "prod/main.tf"]));
        assert!(!m("apply -f prod*", &["apply", "-f", "prod", "x"]));
        assert!(m("* --namespace=prod*", &["get", "--namespace=prod-eu"]));
        assert!(!m("run", &["run", "x"]));
    }

    #[test]
    fn empty_arguments_are_arguments() {
        assert!(m("* \"\" *", &["a", "", "b"]));
        assert!(!m("a b", &["a", "", "b"]));
        assert!(m("run *", &["run", "", "x"]));
    }

    #[test]
    fn quoted_tokens_keep_their_spaces() {
        assert!(m("* \"two words\"", &["--ns", "two words"]));
        assert!(!m("* \"two words\"", &["two", "words"]));
    }

    #[test]
    fn bad_patterns_say_which_token() {
        let err = ArgPattern::parse("delete [ns").unwrap_err();
        assert!(err.contains("[ns"), "{err}");
        let err = ArgPattern::parse("delete \"ns").unwrap_err();
        assert!(err.contains("delete"), "{err}");
    }
}
