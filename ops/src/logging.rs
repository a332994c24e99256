//! Log output for every binary: human text (the default) or JSON lines.
//!
//! JSON logs are for shippers (journald's JSON export, Loki, Elasticsearch):
//! one object per line with the level, target, message, the event's fields
//! (`volume`, `device`, `handle`, ...) and the spans it happened in, so a
//! query can select by volume without parsing prose.

use std::io::IsTerminal;

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line, with every field and the current spans.
    Json,
}

/// Installs the global subscriber writing to stderr with `filter` (tracing
/// directives; an invalid one falls back to `fallback` with a warning).
pub fn init(filter: &str, fallback: &str, format: LogFormat) {
    let (filter, bad) = match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (tracing_subscriber::EnvFilter::new(fallback), Some(format!("{filter:?}: {e}"))),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
    if let Some(bad) = bad {
        tracing::warn!("invalid log filter {bad}; using {fallback:?}");
    }
}
