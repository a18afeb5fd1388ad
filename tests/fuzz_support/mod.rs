//! The runner shared by the property tests (`tests/fuzz_*.rs`, docs/FUZZING.md).
//!
//! Every property runs with a fixed seed and a small number of cases by default, so `cargo test`
//! is deterministic and adds only a few seconds. Two environment variables turn the same test
//! into a long run:
//!
//! - `FUZZ_CASES=N`: how many cases each property runs (default: the property's own, small);
//! - `FUZZ_SEED=N` (or `FUZZ_SEED=random`): the seed of the case generator (default: fixed).
//!
//! A failing case is shrunk, then reported with its seed, the minimal failing input and the
//! command that runs it again. Failures are not persisted to files: the seed is the record.
#![allow(dead_code)]

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestCaseError, TestError, TestRunner};

/// The seed of every default run (any fixed value; this one is `"roomcast"` in ASCII).
pub const DEFAULT_SEED: u64 = 0x726f_6f6d_6361_7374;

/// How many cases a property runs and with which seed.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub cases: u32,
    pub seed: u64,
}

impl Budget {
    /// `default_cases` unless `FUZZ_CASES` says otherwise; the fixed seed unless `FUZZ_SEED`
    /// says otherwise.
    pub fn from_env(default_cases: u32) -> Budget {
        let cases = match std::env::var("FUZZ_CASES") {
            Ok(v) => v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("FUZZ_CASES must be a number of cases, not {v:?}")),
            Err(_) => default_cases,
        };
        let seed = match std::env::var("FUZZ_SEED") {
            Ok(v) if v.trim() == "random" => {
                // Not cryptographic, only different from run to run; printed so it can be replayed.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
            }
            Ok(v) => v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("FUZZ_SEED must be a number or `random`, not {v:?}")),
            Err(_) => DEFAULT_SEED,
        };
        Budget { cases, seed }
    }

    /// Whether this is a long run (more cases than the default asked for).
    pub fn is_long(&self, default_cases: u32) -> bool {
        self.cases > default_cases
    }
}

/// A deterministic runner for `budget`: ChaCha with the fixed seed, no failure files, and a
/// bound on shrinking so a long run that fails still ends.
pub fn runner(budget: Budget) -> TestRunner {
    let config = Config {
        cases: budget.cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(budget.seed),
        failure_persistence: None,
        max_shrink_iters: 1024,
        max_shrink_time: 20_000,
        // Every case is generated directly: no strategy here rejects inputs.
        max_global_rejects: 1024,
        ..Config::default()
    };
    TestRunner::new(config)
}

/// Run `property` over `strategy` for the cases and seed the environment asks for (default:
/// `default_cases`, [`DEFAULT_SEED`]); panic with the shrunk failing input on any failure,
/// model mismatch or panic. Prints a one-line summary (visible with `--nocapture`).
pub fn check<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let budget = Budget::from_env(default_cases);
    let mut runner = runner(budget);
    let started = Instant::now();
    let outcome = runner.run(&strategy, property);
    let took = started.elapsed();
    match outcome {
        Ok(()) => eprintln!(
            "property {name}: {} cases passed in {} (seed {})",
            budget.cases,
            seconds(took),
            budget.seed
        ),
        Err(TestError::Fail(why, input)) => panic!(
            "property {name} failed after {} (seed {}): {why}\nminimal failing input: {input:?}\n\
             run again with: FUZZ_SEED={} FUZZ_CASES={} cargo test --test {} {name}",
            seconds(took),
            budget.seed,
            budget.seed,
            budget.cases,
            env!("CARGO_CRATE_NAME")
        ),
        Err(TestError::Abort(why)) => panic!("property {name} aborted: {why}"),
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// `Err` unless `actual == expected`, with both in the message (proptest's `prop_assert_eq`
/// without the macro, for helpers that are not the property itself).
pub fn expect_eq<T: PartialEq + Debug>(
    actual: T,
    expected: T,
    what: impl FnOnce() -> String,
) -> Result<(), TestCaseError> {
    if actual == expected {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{}\n  expected: {expected:?}\n       got: {actual:?}",
            what()
        )))
    }
}
