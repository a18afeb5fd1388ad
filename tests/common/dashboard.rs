//! The Grafana dashboard's PromQL: every expression of every panel, and the metric names an
//! expression selects (for the tests that keep the dashboard and `/metrics` in step).

use serde_json::Value;

use super::process::repo_root;

/// `grafana/dashboards/roomcast.json`, parsed; panics if it is missing or not JSON.
pub fn load_dashboard() -> Value {
    let path = repo_root().join("grafana/dashboards/roomcast.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// Every `expr` of every target of every panel (rows and nested panels included), with the
/// panel title it belongs to.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        let Some(list) = panels.as_array() else {
            return;
        };
        for p in list {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            if let Some(targets) = p["targets"].as_array() {
                for t in targets {
                    if let Some(e) = t["expr"].as_str() {
                        out.push((title.clone(), e.to_string()));
                    }
                }
            }
            // Rows keep collapsed panels in `panels`; some schemas nest panels further.
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    // Old-style dashboards keep panels under rows[].panels.
    if let Some(rows) = dashboard["rows"].as_array() {
        for r in rows {
            walk(&r["panels"], &mut out);
        }
    }
    out
}

/// PromQL functions and aggregation operators (Prometheus 2.x), and keywords.
const PROMQL_WORDS: &[&str] = &[
    // aggregation operators
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // keywords and binary operators spelled as words
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "start",
    "end",
    // functions
    "abs",
    "absent",
    "absent_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_sum",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "holt_winters",
    "double_exponential_smoothing",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "ln",
    "log2",
    "log10",
    "minute",
    "month",
    "predict_linear",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sort_by_label",
    "sort_by_label_desc",
    "sqrt",
    "time",
    "timestamp",
    "vector",
    "year",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "last_over_time",
    "present_over_time",
    "mad_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "cos",
    "cosh",
    "sin",
    "sinh",
    "tan",
    "tanh",
    "deg",
    "rad",
    "pi",
    "info",
    "inf",
    "nan",
];

/// The metric names an expression selects. Label matchers (`{...}`), range/subquery durations
/// (`[...]`), string literals, numbers, Grafana variables (`$x`, `${x}`), functions, aggregation
/// operators, keywords, and the label lists after `by`/`without`/`on`/`ignoring`/`group_left`/
/// `group_right` are all skipped; what is left are metric names (bare selectors, or selectors
/// followed by `{` or `[`, or function arguments).
pub fn promql_metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_cont = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // Skip to the character after the matching `close`, honouring quotes.
    let skip_group = |mut i: usize, open: char, close: char| -> Result<usize, String> {
        let mut depth = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '"' || c == '\'' || c == '`' {
                i = skip_string(&chars, i)?;
                continue;
            }
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Err(format!("unbalanced {open}{close} in {expr:?}"))
    };
    let mut expect_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
        } else if c == '#' {
            // comment to end of line
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '{' {
            i = skip_group(i, '{', '}')?;
        } else if c == '[' {
            i = skip_group(i, '[', ']')?;
        } else if c == '(' && expect_label_list {
            i = skip_group(i, '(', ')')?;
            expect_label_list = false;
        } else if c == '$' {
            // Grafana variable: $name, ${name}, ${name:fmt}, [[name]]
            i += 1;
            if i < chars.len() && chars[i] == '{' {
                i = skip_group(i, '{', '}')?;
            } else {
                while i < chars.len() && is_cont(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // number or duration (1e-3, 0x1f, 5m, 1h30m)
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
            {
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_cont(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next = chars.get(j).copied();
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&lower.as_str())
            {
                // `group_left` may stand without a label list; only skip one if it follows.
                expect_label_list = next == Some('(');
                continue;
            }
            if PROMQL_WORDS.contains(&lower.as_str()) {
                continue;
            }
            if next == Some('(') {
                return Err(format!("unknown PromQL function {word:?} in {expr:?}"));
            }
            names.push(word);
        } else {
            i += 1;
        }
    }
    Ok(names)
}

fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return Ok(i + 1);
        }
        i += 1;
    }
    Err("unterminated string literal".into())
}
