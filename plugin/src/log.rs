//! `tracing` events from the core and the plugin, written through nbdkit's
//! own logging so they land where nbdkit's do (stderr, or syslog once
//! nbdkit is a daemon): warnings and errors always, the rest with `-v`.

use std::ffi::{c_char, CString};
use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

extern "C" {
    // Provided by the nbdkit binary that loads this plugin.
    fn nbdkit_error(fmt: *const c_char, ...);
    fn nbdkit_debug(fmt: *const c_char, ...);
}

/// Installs the bridge. `VRAMSWAP_LOG` filters like `RUST_LOG`
/// (default `info`; nbdkit shows info and debug only with `-v`).
///
/// `VRAMSWAP_LOG_FILE` names a file that warnings and errors are also
/// appended to. A daemonized nbdkit sends its own stderr to /dev/null and
/// has exited 0 by the time the GPU is opened, so should that open fail
/// (the device checked before the fork went away), this file is how
/// `vramswap start` learns why a server it started is not serving.
pub fn init() {
    let filter = EnvFilter::try_from_env("VRAMSWAP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(NbdkitLog)
        .try_init();
}

/// Appends a line to `VRAMSWAP_LOG_FILE`, if set. Best effort: the file is
/// a convenience for `vramswap start`; nbdkit's own log is the record.
pub fn append_to_file(line: &str) {
    if let Some(path) = std::env::var_os("VRAMSWAP_LOG_FILE") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

struct NbdkitLog;

impl<S: Subscriber> Layer<S> for NbdkitLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        let mut line = Line(String::new());
        if level == Level::WARN {
            line.0.push_str("warning: ");
        }
        event.record(&mut line);
        if level <= Level::WARN {
            append_to_file(&line.0);
        }
        let Ok(text) = CString::new(line.0.replace('\0', " ")) else {
            return;
        };
        // SAFETY: "%s" with one valid NUL-terminated string; both functions
        // are nbdkit's printf-style loggers and are thread-safe.
        unsafe {
            if level <= Level::WARN {
                nbdkit_error(c"%s".as_ptr(), text.as_ptr());
            } else {
                nbdkit_debug(c"%s".as_ptr(), text.as_ptr());
            }
        }
    }
}

/// The event's message, then its other fields as `key=value`.
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}
