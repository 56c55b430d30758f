//! Reading Prometheus text expositions and PromQL, to check that a dashboard's queries name
//! metrics a live `/metrics` really exports.

use std::collections::BTreeSet;

/// The sample names a text exposition can hold, from its `# TYPE` lines (a family with no
/// samples yet still has one): a counter's `_total`, a histogram's `_bucket`, `_sum` and
/// `_count`, a gauge's own name. Panics on a malformed TYPE line.
pub fn exposition_names(exposition: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            panic!("bad TYPE line {line:?}");
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// The metric names in a PromQL expression: words starting `airlock_`.
pub fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("airlock_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_lines_name_their_samples() {
        let names = exposition_names(
            "# TYPE airlock_a counter\n# TYPE airlock_b histogram\n# TYPE airlock_c gauge\nairlock_c 1\n",
        );
        let want = [
            "airlock_a_total",
            "airlock_b_bucket",
            "airlock_b_count",
            "airlock_b_sum",
            "airlock_c",
        ];
        assert_eq!(names.into_iter().collect::<Vec<_>>(), want);
    }

    #[test]
    fn promql_names_every_airlock_metric() {
        assert_eq!(
            metrics_in("sum(rate(airlock_x_total[5m])) / airlock_y{a=\"b\"}"),
            ["airlock_x_total", "airlock_y"]
        );
    }
}
