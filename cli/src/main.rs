//! `vramswap`: turn GPU video memory into Linux swap, in one command.
//!
//! The command line is in `args.rs` (shared with `build.rs`, which makes the
//! man pages and completions from it); each subcommand has its own module.

mod args;
mod cgroups;
mod config;
mod devices;
mod elastic;
mod group;
mod memtest;
mod name;
mod nbd;
mod power;
mod sleep;
mod start;
mod state;
mod status;
mod stop;
mod system;
mod trim;

use std::fmt;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use args::{Cli, Command, StartArgs, DEFAULT_NAME};
use config::{Config, Settings};
use devices::{Gpus, RealGpus};
use system::System;

/// `vramswap start`: each named area (or all configured ones) from its
/// config section with the options on top.
fn start(system: &mut dyn System, gpus: &dyn Gpus, args: &StartArgs) -> Result<()> {
    let config = Config::load(system, args.config.as_deref())?;
    let names: Vec<String> = if args.all {
        if config.areas.is_empty() {
            bail!(
                "--all: no areas configured (in {} or {}/*.toml)",
                config::MAIN_FILE,
                config::DROP_IN_DIR
            );
        }
        config.areas.keys().cloned().collect()
    } else if args.names.is_empty() {
        vec![DEFAULT_NAME.to_string()]
    } else {
        args.names.clone()
    };
    let flags = Settings::from(args);
    let mut failed = Vec::new();
    for name in &names {
        let (file, origin) = config.areas.get(name).cloned().unwrap_or_default();
        let settings = file.overlay(&flags);
        let result = group::start_area(system, gpus, name, &settings, &origin, args.dry_run);
        if let Err(err) = result {
            if names.len() == 1 {
                return Err(err);
            }
            eprintln!("vramswap: error: {name}: {err:#}");
            failed.push(name.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("could not start: {}", failed.join(", "));
    }
    Ok(())
}

/// `vramswap: message`, `vramswap: warning: message` on stderr.
struct Lines;

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "vramswap: ")?;
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "error: ")?,
            Level::WARN => write!(writer, "warning: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => Level::ERROR,
        (false, 0) => Level::WARN,
        (false, 1) => Level::INFO,
        _ => Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .event_format(Lines)
        .init();
}

fn main() -> ExitCode {
    system::die_on_closed_pipe();
    let cli = Cli::parse();
    // The watcher runs for as long as its area: what it does is its output.
    let verbose = match cli.command {
        Command::Elastic { .. } => cli.verbose.max(1),
        _ => cli.verbose,
    };
    init_logging(verbose, cli.quiet);
    let mut system = system::RealSystem::new();
    let result = match &cli.command {
        Command::Devices { json } => devices::run(&RealGpus, *json),
        Command::Start(args) => start(&mut system, &RealGpus, args),
        Command::Stop { names, all } => stop::run(&mut system, names, *all),
        Command::Status { names, json } => status::run(&system, names, *json),
        Command::Suspend => sleep::suspend(&mut system, &RealGpus),
        Command::Resume => sleep::resume(&mut system, &RealGpus),
        Command::Power => power::run(&mut system, &RealGpus),
        Command::Elastic {
            name,
            stand_in_swap,
        } => elastic::watch::run(&mut system, name, *stand_in_swap),
        Command::Memtest(args) => memtest::run(args, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vramswap: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
