//! `vramswap`: turn GPU video memory into Linux swap, in one command.
//!
//! This file is arguments only; each subcommand lives in its own module.

mod devices;
mod nbd;
mod start;
mod state;
mod status;
mod stop;
mod system;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use vramswap::ExportConfig;

/// The instance name when none is given.
pub const DEFAULT_NAME: &str = "default";

#[derive(Parser)]
#[command(
    name = "vramswap",
    version,
    about = "Use GPU video memory as Linux swap",
    long_about = "Use GPU video memory as Linux swap.\n\n\
        vramswap serves VRAM as a block device through nbdkit and its vramswap plugin, \
        attaches it as /dev/nbdN and enables it as swap, with a priority between disk \
        swap and zram. Start and stop need root.",
    after_help = "Examples:\n  \
        vramswap devices                      list the GPUs\n  \
        vramswap start --size 16G             swap on 16 GiB of the first GPU\n  \
        vramswap start --dry-run              show what start would do\n  \
        vramswap status                       is every instance healthy?\n  \
        vramswap stop --all                   swapoff, detach, give the VRAM back"
)]
struct Cli {
    /// More output (-v: each step; -vv: every command).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU each built-in backend sees.
    #[command(
        after_help = "Examples:\n  vramswap devices\n  vramswap devices --json | jq '.devices[].uuid'"
    )]
    Devices {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Serve VRAM over NBD and swap on it.
    #[command(after_help = "Examples:\n  \
        vramswap start                               all free VRAM but 256 MiB, first GPU\n  \
        vramswap start --backend vulkan --size 8G    8 GiB through Vulkan\n  \
        vramswap start --device 1 --reserve 2G       second GPU, leave 2 GiB to others\n  \
        vramswap start --name scratch --allocation lazy --size 32G --priority 10\n\n\
        On failure every step already done is undone, in reverse order.")]
    Start(StartArgs),
    /// Swapoff, detach and stop instances, giving their VRAM back.
    #[command(
        after_help = "Examples:\n  vramswap stop\n  vramswap stop scratch\n  vramswap stop --all\n\n\
        swapoff moves every swapped-out page back into RAM first; if RAM cannot hold\n\
        them it fails, and vramswap stops nothing."
    )]
    Stop {
        /// Instances to stop (default: 'default').
        names: Vec<String>,
        /// Stop every instance.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Show each instance's server, NBD device and swap area; exits 1 if one is unhealthy.
    #[command(after_help = "Examples:\n  vramswap status\n  vramswap status default --json")]
    Status {
        /// Instances to show (default: all).
        names: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Vulkan,
    Cuda,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vulkan => "vulkan",
            Backend::Cuda => "cuda",
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Allocation {
    /// All VRAM at start: swap never finds the GPU full later.
    Eager,
    /// A 4 MiB chunk at its first write; trimmed chunks go back.
    Lazy,
}

#[derive(Args)]
struct StartArgs {
    /// GPU API (default: cuda when built in and it sees the device, else vulkan).
    #[arg(long)]
    backend: Option<Backend>,
    /// GPU: index, part of its name, or UUID (default: the first discrete GPU).
    #[arg(long)]
    device: Option<String>,
    /// Size of the swap area, e.g. 8G (default: available VRAM minus --reserve).
    #[arg(long, conflicts_with = "reserve")]
    size: Option<String>,
    /// VRAM to leave to other programs when the size is automatic [default: 256M].
    #[arg(long)]
    reserve: Option<String>,
    /// When VRAM is taken.
    #[arg(long, value_enum, default_value_t = Allocation::Eager)]
    allocation: Allocation,
    /// Swap priority: above disk swap (negative), below zram (100).
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    priority: i32,
    /// NBD device to use (default: the first free /dev/nbdN).
    #[arg(long, value_name = "/dev/nbdN")]
    nbd: Option<String>,
    /// Connections between the kernel and nbdkit.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    connections: u32,
    /// nbdkit worker threads per connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: u32,
    /// Instance name (also the swap label vramswap-NAME).
    #[arg(long, default_value = DEFAULT_NAME)]
    name: String,
    /// The nbdkit plugin (default: next to this program, or nbdkit's plugin directory).
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// Do not let the kernel discard freed swap pages.
    #[arg(long)]
    no_discard: bool,
    /// Seconds to wait for nbdkit to open the GPU and answer.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print the plan and the preflight checks; change nothing.
    #[arg(long)]
    dry_run: bool,
}

impl StartArgs {
    /// The plugin keys, checked by the same parser the plugin uses; errors
    /// name the flag as typed here.
    fn options(&self) -> anyhow::Result<start::StartOptions> {
        let mut export = ExportConfig::default();
        let pairs = [
            ("backend", self.backend.map(|b| b.to_string())),
            ("device", self.device.clone()),
            ("size", self.size.clone()),
            ("reserve", self.reserve.clone()),
            (
                "allocation",
                Some(match self.allocation {
                    Allocation::Eager => "eager".to_string(),
                    Allocation::Lazy => "lazy".to_string(),
                }),
            ),
        ];
        for (key, value) in pairs {
            if let Some(value) = value {
                export.set(key, &value).map_err(|e| {
                    anyhow::anyhow!(e.to_string().replacen(
                        &format!("{key}={value}"),
                        &format!("--{key} {value}"),
                        1
                    ))
                })?;
            }
        }
                export.complete().map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(device) = &self.nbd {
            nbd::kernel_name(device)?;
        }
        state::check_name(&self.name)?;
        Ok(start::StartOptions {
            name: self.name.clone(),
            export,
            priority: self.priority,
            nbd: self.nbd.clone(),
            connections: self.connections,
            threads: self.threads,
            plugin: self.plugin.clone(),
            discard: !self.no_discard,
            timeout: Duration::from_secs(self.timeout),
        })
    }
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
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let mut system = system::RealSystem::new();
    let result = match &cli.command {
        Command::Devices { json } => devices::run(&devices::RealGpus, *json),
        Command::Start(args) => args.options().and_then(|options| {
            start::run(&mut system, &devices::RealGpus, &options, args.dry_run)
        }),
        Command::Stop { names, all } => stop::run(&mut system, names, *all),
        Command::Status { names, json } => status::run(&system, names, *json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vramswap: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
