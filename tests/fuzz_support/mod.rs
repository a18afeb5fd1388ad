//! The runner shared by the property tests (`tests/fuzz_*.rs`, docs/FUZZING.md).
//!
//! Every property runs with a fixed seed and a small number of cases by default, so `cargo test`
//! is deterministic and adds only a few seconds. Environment variables turn the same test into a
//! long run:
//!
//! - `FUZZ_CASES=N`: how many cases each property runs (default: the property's own, small);
//! - `FUZZ_SEED=N` (or `FUZZ_SEED=random`): the seed of the case generator (default: fixed);
//! - `FUZZ_SECONDS=S`: run each property for at least S seconds, in batches of `FUZZ_CASES`
//!   cases (default: 10 × the property's own), the batch after seed N with seed N + 1.
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

/// How many cases a property runs, with which seed, for how long.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Cases per batch (one batch unless `seconds` is set).
    pub cases: u32,
    /// The first batch's seed.
    pub seed: u64,
    /// Keep running batches until this much time has passed.
    pub seconds: Option<u64>,
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
    )
}

impl Budget {
    /// What the environment asks for, with `default_cases` and [`DEFAULT_SEED`] when it asks
    /// for nothing.
    pub fn from_env(default_cases: u32) -> Budget {
        let seconds = env_number("FUZZ_SECONDS");
        let cases = env_number("FUZZ_CASES").unwrap_or(match seconds {
            Some(_) => default_cases.saturating_mul(10),
            None => default_cases,
        });
        let seed = match std::env::var("FUZZ_SEED") {
            Ok(v) if v.trim() == "random" => {
                // Not cryptographic, only different from run to run; printed so it can be replayed.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
            }
            Ok(_) => env_number("FUZZ_SEED").expect("set"),
            Err(_) => DEFAULT_SEED,
        };
        Budget {
            cases,
            seed,
            seconds,
        }
    }
}

/// A deterministic runner for `cases` cases from `seed`: ChaCha, no failure files, and a bound
/// on shrinking so a long run that fails still ends.
pub fn runner(cases: u32, seed: u64) -> TestRunner {
    let config = Config {
        cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 1024,
        max_shrink_time: 20_000,
        // Every case is generated directly: no strategy here rejects inputs.
        max_global_rejects: 1024,
        ..Config::default()
    };
    TestRunner::new(config)
}

/// Run `property` over `strategy` for the cases, seed and time the environment asks for
/// (default: `default_cases` from [`DEFAULT_SEED`]); panic with the shrunk failing input on any
/// failure, model mismatch or panic. Prints a one-line summary (visible with `--nocapture`).
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
    let started = Instant::now();
    let deadline = budget.seconds.map(|s| started + Duration::from_secs(s));
    let (mut total, mut batches) = (0u64, 0u64);
    loop {
        let seed = budget.seed.wrapping_add(batches);
        let outcome = runner(budget.cases, seed).run(&strategy, &property);
        let took = started.elapsed();
        match outcome {
            Ok(()) => {}
            Err(TestError::Fail(why, input)) => panic!(
                "property {name} failed after {} and {total} passing cases (seed {seed}): \
                 {why}\nminimal failing input: {input:?}\n\
                 run again with: FUZZ_SEED={seed} FUZZ_CASES={} cargo test --release --test {} \
                 {name}",
                seconds(took),
                budget.cases,
                env!("CARGO_CRATE_NAME")
            ),
            Err(TestError::Abort(why)) => panic!("property {name} aborted: {why}"),
        }
        total += u64::from(budget.cases);
        batches += 1;
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    eprintln!(
        "property {name}: {total} cases passed in {} ({batches} batch{} from seed {})",
        seconds(started.elapsed()),
        if batches == 1 { "" } else { "es" },
        budget.seed
    );
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
