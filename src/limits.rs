//! The process's open-file limit: raised to the hard limit at start, read for the default
//! connection limit. One idle connection costs one file descriptor.

/// Raise the soft open-file limit to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            nofile_limit()
        }
    }
}

/// The current soft open-file limit.
pub fn nofile_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}
