//! Build script: records the commit the relay is built from, for `roomcast_build_info` and
//! `--version`. `ROOMCAST_COMMIT` (e.g. a Docker build argument, where there is no `.git`) wins;
//! otherwise `git rev-parse`; otherwise `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=ROOMCAST_COMMIT");
    let commit = std::env::var("ROOMCAST_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves (a checkout, a commit), in a plain clone or a worktree.
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
        let head = Path::new(&git_dir).join("HEAD");
        println!("cargo:rerun-if-changed={}", head.display());
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
                println!(
                    "cargo:rerun-if-changed={}",
                    Path::new(&common).join(reference).display()
                );
                println!(
                    "cargo:rerun-if-changed={}",
                    Path::new(&common).join("packed-refs").display()
                );
            }
        }
    }
    println!("cargo:rustc-env=ROOMCAST_COMMIT={commit}");
}
