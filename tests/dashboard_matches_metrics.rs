//! The Grafana dashboard can never drift from the code: every metric name used in any PromQL
//! expression of `grafana/dashboards/roomcast.json` must be exported by a real relay that has seen
//! traffic, and every metric the relay exports must be shown somewhere on the dashboard.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::Value;

/// Every name the dashboard selects, with the panels that use it.
fn dashboard_metric_names(d: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let exprs = dashboard_exprs(d);
    assert!(
        exprs.len() >= 20,
        "the dashboard has only {} PromQL expressions; did the walk miss panels?",
        exprs.len()
    );
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (panel, expr) in &exprs {
        let found = promql_metric_names(expr).unwrap_or_else(|e| panic!("panel {panel:?}: {e}"));
        assert!(
            !found.is_empty(),
            "panel {panel:?}: no metric name found in {expr:?}"
        );
        for n in found {
            names.entry(n).or_default().insert(panel.clone());
        }
    }
    // Variable queries (label_values(...)) select metrics too.
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or("");
        if v["type"] == "query" {
            let inner = q
                .trim()
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or(q);
            // label_values(metric{..}, label): the metric is the first argument.
            let first = inner.rsplit_once(',').map(|(m, _)| m).unwrap_or(inner);
            for n in
                promql_metric_names(first).unwrap_or_else(|e| panic!("variable {}: {e}", v["name"]))
            {
                names
                    .entry(n)
                    .or_default()
                    .insert(format!("variable ${}", v["name"].as_str().unwrap_or("?")));
            }
        }
    }
    names
}

#[test]
fn promql_name_extraction_handles_the_syntax_the_dashboard_uses() {
    let cases: &[(&str, &[&str])] = &[
        ("roomcast_connections", &["roomcast_connections"]),
        (
            r#"sum by (instance) (rate(roomcast_connections_opened_total{job=~"$job", instance=~"$instance"}[$__rate_interval]))"#,
            &["roomcast_connections_opened_total"],
        ),
        (
            r#"histogram_quantile(0.99, sum by (instance, le) (rate(roomcast_publish_to_write_seconds_bucket{code!="x{y}"}[5m])))"#,
            &["roomcast_publish_to_write_seconds_bucket"],
        ),
        (
            r#"time() - process_start_time_seconds{instance=~"${instance:regex}"}"#,
            &["process_start_time_seconds"],
        ),
        (r#"a / on (instance) group_left b"#, &["a", "b"]),
        (
            r#"a / on (instance) group_left (code) b offset 5m"#,
            &["a", "b"],
        ),
        (
            r#"sum without (le) (x) > bool 1e3 and y unless z[1h30m:1m]"#,
            &["x", "y", "z"],
        ),
        (
            r#"clamp_min(roomcast_connections, 1) # a comment with fake_metric{}"#,
            &["roomcast_connections"],
        ),
        (r#"{__name__="x"}"#, &[]),
        ("label_replace(up, \"a\", \"$1\", \"b\", \"(.*)\")", &["up"]),
    ];
    for (expr, want) in cases {
        let got = promql_metric_names(expr).unwrap();
        assert_eq!(
            got,
            want.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "names in {expr}"
        );
    }
    assert!(
        promql_metric_names("sum(rate(x[5m]").is_err()
            || promql_metric_names("nosuchfn(x)").is_err()
    );
    assert!(
        promql_metric_names("nosuchfn(x)").is_err(),
        "an unknown function must not be taken for a metric"
    );
}

#[test]
fn dashboard_is_importable_and_parametrised() {
    let d = load_dashboard();
    assert!(
        d["title"].as_str().is_some_and(|t| !t.is_empty()),
        "dashboard needs a title"
    );
    assert!(
        d["uid"].as_str().is_some_and(|t| !t.is_empty()),
        "dashboard needs a stable uid"
    );
    assert!(
        d["id"].is_null(),
        "an importable dashboard has \"id\": null"
    );
    assert!(
        d["schemaVersion"].as_u64().is_some(),
        "schemaVersion missing"
    );

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let inst = var("instance");
    assert_eq!(inst["multi"], true, "$instance must be multi-select");
    assert_eq!(inst["includeAll"], true, "$instance must include All");

    // Every panel with queries uses the datasource variable, and every id is unique.
    let mut ids = BTreeSet::new();
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    walk(&d["panels"], &mut all);
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?} has no id"));
        assert!(ids.insert(id), "panel id {id} used twice");
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "panel {title:?} has no gridPos"
        );
        if let Some(targets) = p["targets"].as_array() {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {title:?} must use the datasource variable"
            );
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "a target of {title:?} must use the datasource variable"
                );
                let e = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("target of {title:?} has no expr"));
                // Every selector is narrowed to the selected relays.
                let selectors = e.matches('{').count();
                let scoped = e.matches(r#"instance=~"$instance""#).count();
                assert_eq!(
                    selectors, scoped,
                    "panel {title:?}: every selector must filter instance=~\"$instance\": {e}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported_by_a_relay_with_traffic() {
    let dashboard = load_dashboard();
    let used = dashboard_metric_names(&dashboard);

    let relay = Relay::start(&[("HEARTBEAT_MS", "600000"), ("PRESENCE_INTERVAL_MS", "20")]);
    // Traffic: two clients in one room, a message each way, an invalid message, a rejection.
    let (mut a, _) = Client::join_and_greet(&relay, "ann", "dash").await;
    let (mut b, _) = Client::join_and_greet(&relay, "ben", "dash").await;
    a.expect_presence("ben", 2).await;
    a.publish("hello from ann").await;
    a.expect_message("hello from ann").await;
    b.expect_message("hello from ann").await;
    b.publish("hi ann").await;
    a.expect_message("hi ann").await;
    b.expect_message("hi ann").await;
    b.send_text("not json").await;
    b.expect_error("bad_json").await;
    match Client::connect_to(
        &relay,
        "/chat?token=wrong&name=x&room=dash",
        Some(&relay.origin()),
        &[],
    )
    .await
    {
        Err(ConnectError::Status(401)) => {}
        other => panic!("wrong token should get 401, got {:?}", other.map(|_| "101")),
    }
    let text = metrics_text(&relay).await;
    let exp = Exposition::parse(&text).unwrap_or_else(|e| panic!("cannot parse /metrics: {e}"));
    let exported = exp.sample_names();

    let mut problems = Vec::new();
    for (name, panels) in &used {
        if !exported.contains(name) {
            problems.push(format!(
                "{name} (used by {panels:?}) is not in the relay's /metrics"
            ));
            continue;
        }
        // A histogram suffix must belong to a family exported as a histogram.
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if !exp.types.contains_key(name)
                    && exp.types.get(base).map(String::as_str) != Some("histogram")
                {
                    problems.push(format!("{name} (used by {panels:?}): {base} is not exported as a histogram (TYPE {:?})", exp.types.get(base)));
                }
            }
        }
    }
    // rate()/increase() only over counters (or histogram series).
    for (panel, expr) in dashboard_exprs(&dashboard) {
        for func in ["rate(", "increase(", "irate("] {
            for (at, _) in expr.match_indices(func) {
                if at > 0 && expr[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                    continue; // e.g. `irate(` inside `rate(` search
                }
                let arg = &expr[at + func.len()..];
                let metric: String = arg
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let family_type = exp.types.get(&metric).map(String::as_str).or_else(|| {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| metric.strip_suffix(s))
                        .and_then(|b| exp.types.get(b))
                        .map(String::as_str)
                });
                if !matches!(family_type, Some("counter") | Some("histogram")) {
                    problems.push(format!(
                        "panel {panel:?}: {func}{metric}...) over a {family_type:?}, not a counter"
                    ));
                }
            }
        }
    }
    // The other way round: everything the relay exports is on the dashboard.
    let families: BTreeSet<&String> = exp
        .types
        .keys()
        .filter(|n| n.starts_with("roomcast_") || n.starts_with("process_"))
        .collect();
    for fam in families {
        let shown = used.keys().any(|u| {
            u == fam
                || u.strip_prefix(fam.as_str())
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
        });
        if !shown {
            problems.push(format!("{fam} is exported but no dashboard panel uses it"));
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard and /metrics disagree:\n  {}\n--- /metrics ---\n{text}",
        problems.join("\n  ")
    );
    a.close_normally().await;
    b.close_normally().await;
}
