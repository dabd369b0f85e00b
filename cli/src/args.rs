// The command line, and nothing else: `build.rs` includes this file to
// generate the man pages and shell completions, so it may use only clap
// and std.

use std::fmt;
use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// The instance name when none is given.
pub const DEFAULT_NAME: &str = "default";

#[derive(Parser)]
#[command(
    name = "vramswap",
    propagate_version = true,
    version,
    about = "Use GPU video memory as Linux swap",
    long_about = "Use GPU video memory as Linux swap.\n\n\
        vramswap serves VRAM as a block device through nbdkit and its vramswap plugin, \
        attaches it as /dev/nbdN and enables it as swap, with a priority between disk \
        swap and zram. Swap areas can be configured once in /etc/vramswap.toml and \
        started at boot by vramswap@NAME.service. start, stop, suspend and resume need root.",
    after_help = "Examples:\n  \
        vramswap devices                      list the GPUs\n  \
        vramswap start --size 16G             swap on 16 GiB of the first GPU\n  \
        vramswap start --dry-run              show what start would do\n  \
        vramswap start --all                  every area in /etc/vramswap.toml\n  \
        vramswap status                       is every instance healthy?\n  \
        vramswap stop --all                   swapoff, detach, give the VRAM back\n  \
        vramswap memtest --size 8G            test 8 GiB of VRAM for bad cells"
)]
pub struct Cli {
    /// More output (-v: each step; -vv: every command).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        vramswap start --device all --size 16G       16 GiB on every GPU, pages striped\n  \
        vramswap start scratch --allocation lazy --size 32G --priority 10\n  \
        vramswap start gpu0                          the [gpu0] area of /etc/vramswap.toml\n\n\
        Settings come from the NAME's section of the config file when there is one;\n\
        options given here override it. On failure every step already done is undone,\n\
        in reverse order.")]
    Start(Box<StartArgs>),
    /// Swapoff, detach and stop instances, giving their VRAM back.
    #[command(
        after_help = "Examples:\n  vramswap stop\n  vramswap stop scratch\n  vramswap stop --all\n\n\
        swapoff moves every swapped-out page back into RAM first; if RAM cannot hold\n\
        them it fails, and vramswap stops nothing. Memory cgroups whose limits could not\n\
        take their pages back are lifted for the swapoff, as suspend does, and put\n\
        back after; one left over its memory.max with no swap to push it to keeps\n\
        memory.high at the limit, and memory.max lifted until the next start, rather\n\
        than have a process OOM-killed. An instance whose server has died\n\
        has lost its pages (processes that touch them get SIGBUS): stop says so and\n\
        removes it even if swapoff fails."
    )]
    Stop {
        /// Instances to stop [default: default].
        names: Vec<String>,
        /// Stop every instance.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Show each instance's server, NBD device and swap area; exits 1 if one is unhealthy.
    #[command(after_help = "Examples:\n  vramswap status\n  vramswap status default --json")]
    Status {
        /// Instances to show [default: all].
        names: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop every instance before the machine sleeps, remembering them for resume.
    ///
    /// Run by vramswap-suspend.service: the GPU driver tears down the memory
    /// that holds the swap on suspend, so the pages must be back in RAM first.
    /// Exits 1 (and the machine does not sleep) when swapoff cannot bring
    /// them back. Memory cgroups whose limits could not take their pages
    /// back (memory.max, memory.high) are lifted first, the old values
    /// recorded in /run/vramswap/cgroup-limits.json, so that no swapoff
    /// ends in an OOM kill. Where NVIDIA's driver keeps video memory across
    /// sleep (NVreg_PreserveVideoMemoryAllocations=1) the areas are swapped
    /// off all the same: the driver would save every chunk a server holds,
    /// not only the pages in use, and swap I/O would have to be held from
    /// its save to its restore (RELIABILITY.md).
    Suspend,
    /// Start again the instances `suspend` stopped, then put back the
    /// memory limits it lifted.
    Resume,
    /// Watch an elastic area: give slices back when other programs need
    /// the VRAM, take them again when they are done.
    ///
    /// `start --elastic` runs it in the background, and `stop` ends it; it
    /// is not usually run by hand. Once a second it reads the GPU's free
    /// VRAM (VK_EXT_memory_budget with the vulkan backend; NVML, else
    /// cuMemGetInfo, with cuda; or --budget-file). Under the headroom, it
    /// swaps off the emptiest online slice (swapoff moves its pages to RAM
    /// or to lower-priority swap) and discards the slice's range, which
    /// gives its VRAM back; if swapoff fails, the slice stays online and the
    /// log says why. Above the headroom plus a slice for the settle time, it
    /// turns the next slice back on. Events go to stderr (the journal under
    /// systemd) and to /run/vramswap/NAME/elastic.json, which status shows.
    Elastic {
        /// The elastic instance to watch.
        name: String,
        /// Where the kernel has no NBD (the GPU bench machine): swapoff,
        /// mkswap and swapon are not run, only logged; slices are online or
        /// offline by the watcher's own record, and the range is still
        /// discarded on the server.
        #[arg(long, hide = true)]
        stand_in_swap: bool,
    },
    /// Apply the power policy: stop areas set to `on-battery = "stop"` while
    /// on battery, start them again on AC.
    ///
    /// Run by vramswap-power.service, which a udev rule starts whenever a
    /// power supply changes. Only areas this command stopped are started
    /// again: an area stopped by hand stays stopped.
    Power,
    /// Test GPU memory: write patterns into VRAM and check them on the GPU.
    ///
    /// Consumer GPUs have no ECC: a bad cell under swap silently corrupts a
    /// process. memtest takes VRAM in 4 MiB chunks, runs each pattern over
    /// all of it with compute shaders (the GPU compares every word and
    /// records the mismatches), and lists every bad 64 KiB block with its
    /// offset. Patterns: walking ones and zeros, address in address,
    /// seeded random, moving inversions. Exits 1 when it finds bad blocks.
    /// Needs the vulkan backend (the cuda backend has no compute shaders;
    /// Vulkan tests the same GPU).
    #[command(after_help = "Examples:\n  \
        vramswap memtest                          all available VRAM but 256 MiB, every pattern\n  \
        vramswap memtest --size 8G --passes 3     8 GiB, three passes (new random data each)\n  \
        vramswap memtest --patterns random --json\n\n\
        The progress bar shows when stderr is a terminal; otherwise one line per\n\
        sweep. Throughput counts each sweep over the area once.")]
    Memtest(MemtestArgs),
}

#[derive(Args)]
pub struct MemtestArgs {
    /// GPU API [default: vulkan].
    #[arg(long)]
    pub backend: Option<Backend>,
    /// GPU: index, part of its name, or UUID [default: the first discrete GPU].
    #[arg(long)]
    pub device: Option<String>,
    /// VRAM to test, e.g. 8G [default: available VRAM minus 256M].
    #[arg(long)]
    pub size: Option<String>,
    /// Times to run every pattern.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub passes: u32,
    /// Patterns to run, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub patterns: Vec<MemtestPattern>,
    /// Seed of the random pattern (pass N uses SEED+N).
    #[arg(long, default_value_t = 1)]
    pub seed: u32,
    /// Machine-readable report on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MemtestPattern {
    /// One bit set per word, moving from word to word.
    WalkingOnes,
    /// One bit clear per word, moving from word to word.
    WalkingZeros,
    /// Each word holds its own address.
    Address,
    /// Seeded pseudo-random words.
    Random,
    /// A checkerboard, then sweeps that check each word and write its complement.
    MovingInversions,
}

impl fmt::Display for MemtestPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemtestPattern::WalkingOnes => "walking-ones",
            MemtestPattern::WalkingZeros => "walking-zeros",
            MemtestPattern::Address => "address",
            MemtestPattern::Random => "random",
            MemtestPattern::MovingInversions => "moving-inversions",
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Backend {
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
pub enum Mapped {
    /// Mapped where the device maps nearly all its VRAM.
    Auto,
    /// Mapped, or refuse to start.
    On,
    /// Writes by DMA through pinned staging.
    Off,
}

impl fmt::Display for Mapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mapped::Auto => "auto",
            Mapped::On => "on",
            Mapped::Off => "off",
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Allocation {
    /// All VRAM at start: swap never finds the GPU full later.
    Eager,
    /// A 4 MiB chunk at its first write; trimmed chunks go back.
    Lazy,
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Allocation::Eager => "eager",
            Allocation::Lazy => "lazy",
        })
    }
}

#[derive(Args)]
pub struct StartArgs {
    /// Instances to start: sections of the config file, or new names [default: default].
    pub names: Vec<String>,
    /// Start every area of the config file.
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
    /// Config file to read instead of /etc/vramswap.toml and /etc/vramswap/*.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// GPU API [default: cuda when built in and it sees the device, else vulkan].
    #[arg(long)]
    pub backend: Option<Backend>,
    /// GPU: index, part of its name, or UUID [default: the first discrete GPU];
    /// `all` or a comma-separated list: one swap area per GPU, all at the
    /// same priority (NAME-gpuI each, stopped and shown together as NAME).
    #[arg(long)]
    pub device: Option<String>,
    /// Size of the swap area, e.g. 8G [default: available VRAM minus --reserve].
    #[arg(long)]
    pub size: Option<String>,
    /// VRAM to leave to other programs when the size is automatic [default: 256M].
    #[arg(long)]
    pub reserve: Option<String>,
    /// When VRAM is taken [default: eager].
    #[arg(long, value_enum)]
    pub allocation: Option<Allocation>,
    /// Keep the area in VRAM the CPU maps (resizable BAR), so swap-out is
    /// CPU stores straight into VRAM with no staging copy or DMA; auto
    /// where the mappable window covers nearly all VRAM, on refuses to
    /// start without it (the plugin's mapped=) [default: auto].
    #[arg(long, value_enum)]
    pub mapped: Option<Mapped>,
    /// Swap priority: above disk swap (negative), below zram (100) [default: 50].
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// NBD device to use [default: the first free /dev/nbdN].
    #[arg(long, value_name = "/dev/nbdN")]
    pub nbd: Option<String>,
    /// Connections between the kernel and nbdkit [default: 4].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: Option<u32>,
    /// nbdkit worker threads per connection [default: 16].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,
    /// The nbdkit plugin [default: next to this program, or nbdkit's plugin directory].
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// Do not let the kernel discard freed swap pages.
    #[arg(long)]
    pub no_discard: bool,
    /// Checksum every 64 KiB block on write and check it on read: a block
    /// whose VRAM changed fails its read with EIO instead of handing a
    /// process corrupt memory (the plugin's verify=on).
    #[arg(long)]
    pub verify: bool,
    /// With --verify: re-check every written block once per PERIOD (e.g.
    /// 24h) in the background, so VRAM that went bad is found before a
    /// process reads it (the plugin's scrub=).
    #[arg(long, value_name = "PERIOD")]
    pub scrub: Option<String>,
    /// Compress each 4 KiB page on its own, as zram does: off, lz4, zstd or
    /// zstd:LEVEL (1 to 19). --size is then the VRAM the area may take,
    /// and the swap area is --ratio times larger; a swap-out that finds
    /// that VRAM full fails (the kernel keeps the page in RAM) and nothing
    /// stored is lost. Excludes --encrypt (the plugin's compress=)
    /// [default: off].
    #[arg(long, value_name = "ALGORITHM")]
    pub compress: Option<String>,
    /// With --compress: the swap area's size over the VRAM behind it, 1.0
    /// to 8.0 (program memory packs about 2.6:1 with lz4, 3.4:1 with
    /// zstd) [default: 2.0].
    #[arg(long, value_name = "R")]
    pub ratio: Option<f64>,
    /// Test the VRAM first (one quick pass of memtest over the size to
    /// serve) and refuse to start on bad memory.
    #[arg(long)]
    pub memtest: bool,
    /// Swap on dm-crypt (plain, aes-xts-plain64) over the NBD device, with a
    /// fresh random key each start: VRAM only ever holds ciphertext, and
    /// nothing is readable after stop or reboot.
    #[arg(long)]
    pub encrypt: bool,
    /// Give VRAM back when other programs need it: the area is cut into
    /// slices, each its own swap area at descending priority, and a
    /// watcher swaps off the emptiest slice and frees its VRAM whenever
    /// free VRAM falls under --headroom, and turns slices back on once it
    /// has stayed above it for --settle. Allocates lazily; excludes
    /// --compress and --encrypt.
    #[arg(long)]
    pub elastic: bool,
    /// With --elastic: the number of slices, 1 to 16 [default: about 8,
    /// none under 512 MiB].
    #[arg(long, value_name = "N")]
    pub slices: Option<u32>,
    /// With --elastic: free VRAM to keep for other programs, e.g. 2G
    /// [default: 1G].
    #[arg(long, value_name = "SIZE")]
    pub headroom: Option<String>,
    /// With --elastic: seconds free VRAM must stay above the headroom plus
    /// a slice before that slice comes back [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub settle: Option<u64>,
    /// With --elastic: read the free VRAM from FILE (a size such as 3G),
    /// not from the GPU: for tests, or a budget some other tool manages.
    #[arg(long, value_name = "FILE")]
    pub budget_file: Option<PathBuf>,
    /// Seconds to wait for nbdkit to open the GPU and answer [default: 300].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Print the plan and the preflight checks; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}
