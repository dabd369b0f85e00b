//! The plan of a start: its steps in order, each with what it runs, how
//! it is undone, and how `--dry-run` describes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{debug, info, warn};
use vramswap::backend::{self, BackendKind, DeviceInfo};
use vramswap::export::WarmUp;
use vramswap::ByteSize;

use crate::config::StartOptions;
use crate::elastic::{watch, Layout, Slice};
use crate::nbd;
use crate::state::{self, InstanceDir, State, STATE_VERSION};
use crate::stop::stop_server;
use crate::system::{Cmd, System};

/// `nbd-client -timeout`: the kernel's 30 s drops a stalled server's
/// connections for good (and the pages with them); a longer one holds a
/// dead server's requests (docs/RELIABILITY.md, "Faults", "Known problems").
const NBD_TIMEOUT_SECS: u32 = 300;
/// The largest request the kernel sends (`max_sectors_kb`, Linux's own
/// default for NBD), and so the size of every warm-up read (see [`WarmUp`]).
const MAX_REQUEST: usize = 128 << 10;
/// Rounds of warm-up reads before `start` gives up: one is enough unless
/// a thread that already took one also takes others' reads.
const WARM_UP_ROUNDS: u32 = 10;

/// What preflight found out: enough to run every step.
#[derive(Debug, Clone)]
pub struct Plan {
    pub instance: InstanceDir,
    pub plugin: PathBuf,
    pub nbd_device: String,
    pub backend: BackendKind,
    pub device: DeviceInfo,
    pub size: u64,
    /// On a machine with several NUMA nodes: the GPU's node and its CPUs,
    /// which the server is pinned to.
    pub numa: Option<(u32, String)>,
    pub options: StartOptions,
    /// With `--elastic`: the slices.
    pub elastic: Option<Layout>,
}

/// One step of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    CreateDir,
    StartServer,
    WaitForServer,
    Attach,
    NoThrottling,
    WarmUp,
    Encrypt,
    Slices,
    Mkswap,
    Swapon,
    WriteState,
    Watch,
}

/// Every step, in order; [`Plan::steps`] leaves out those a plan skips.
pub const STEPS: [Step; 12] = [
    Step::CreateDir,
    Step::StartServer,
    Step::WaitForServer,
    Step::Attach,
    Step::NoThrottling,
    Step::WarmUp,
    Step::Encrypt,
    Step::Slices,
    Step::Mkswap,
    Step::Swapon,
    Step::WriteState,
    Step::Watch,
];

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::CreateDir => "create the instance directory",
            Step::StartServer => "start nbdkit",
            Step::WaitForServer => "wait for nbdkit to serve",
            Step::Attach => "attach the NBD device",
            Step::NoThrottling => "turn off writeback throttling",
            Step::WarmUp => "warm up nbdkit's threads",
            Step::Encrypt => "open the dm-crypt mapping",
            Step::Slices => "map the slices",
            Step::Mkswap => "mkswap",
            Step::Swapon => "swapon",
            Step::WriteState => "record state",
            Step::Watch => "start the elastic watcher",
        }
    }
}

impl Plan {
    fn nbdkit_command(&self) -> Cmd {
        let mut export = self.options.export.clone();
        export.backend = Some(self.backend);
        export.warm_up = Some(self.warm_up_plan());
        // Swap-ins (32 KiB at most) never start a read-ahead stream: its
        // windows would only lock RAM (docs/RELIABILITY.md, "Load").
        export.readahead = 0;
        // Reads by DMA straight into nbdkit's per-thread buffers. Safe
        // here, where it is off by default: this nbdkit has no filter that
        // could hand the plugin a temporary buffer (freed, and another
        // later mapped at the same address behind the old pinned pages);
        // nbdkit's own buffer moves only to grow, which the store sees,
        // and the warm-up reads register every thread's before swap is on.
        export.direct = true;
        // Swap depends on this server: a stray SIGTERM (an admin's kill,
        // systemd-shutdown's final kill) must not end it while the kernel
        // is connected, and the final kill at shutdown passes it over
        // (docs/RELIABILITY.md, "How a server stops").
        export.storage_daemon = true;
        let cmd = match &self.numa {
            Some((_, cpus)) => Cmd::new("taskset")
                .arg("--cpu-list")
                .arg(cpus)
                .arg("nbdkit"),
            None => Cmd::new("nbdkit"),
        };
        cmd.arg("--unix")
            .arg(self.instance.socket().to_string_lossy())
            .arg("--pidfile")
            .arg(self.instance.pidfile().to_string_lossy())
            .arg("--threads")
            .arg(self.options.threads.to_string())
            .arg(self.plugin.to_string_lossy())
            .args(export.to_args())
            .env("VRAMSWAP_LOG_FILE", self.instance.log().to_string_lossy())
            .env(
                "VRAMSWAP_STATUS_FILE",
                self.instance.server_status().to_string_lossy(),
            )
            .new_session()
    }

    fn attach_command(&self) -> Cmd {
        Cmd::new("nbd-client")
            .arg("-unix")
            .arg(self.instance.socket().to_string_lossy())
            .arg(&self.nbd_device)
            .args(["-b", "4096", "-swap", "-timeout"])
            .arg(NBD_TIMEOUT_SECS.to_string())
            .arg("-C")
            .arg(self.options.connections.to_string())
    }

    /// The device's writeback throttling, which start turns off: swap has
    /// no buffered writeback for it to protect, and after a server died it
    /// hung the next swap-out on the device (docs/RELIABILITY.md, "Faults").
    fn wbt_attribute(&self) -> PathBuf {
        self.queue_attribute("wbt_lat_usec")
    }

    /// Bytes of the swap area: the VRAM size, or with compression the
    /// export that many times larger.
    pub fn area_size(&self) -> u64 {
        let export = &self.options.export;
        match export.compress.is_on() {
            true => export.ratio.apply(self.size),
            false => self.size,
        }
    }

    /// `/sys/block/nbdN/queue/NAME` of the plan's device.
    fn queue_attribute(&self, name: &str) -> PathBuf {
        Path::new("/sys/block")
            .join(nbd::kernel_name(&self.nbd_device).unwrap_or("nbd0"))
            .join("queue")
            .join(name)
    }

    fn warm_up_plan(&self) -> WarmUp {
        WarmUp {
            threads: self.options.threads as usize,
            size: MAX_REQUEST,
        }
    }

    /// Caps the kernel's requests at [`MAX_REQUEST`], then reads that much
    /// through the device, twice as many reads at once on each hardware
    /// queue (each queue is one connection) as nbdkit has threads per
    /// connection, until the plugin reports every connection in use warm.
    fn warm_up(&self, system: &mut dyn System) -> Result<()> {
        let limit = self.queue_attribute("max_sectors_kb");
        let kib = (MAX_REQUEST >> 10).to_string();
        system
            .write_attribute(&limit, &kib)
            .with_context(|| format!("echo {kib} > {}", limit.display()))?;
        let name = nbd::kernel_name(&self.nbd_device)?;
        let cpus = nbd::queue_cpus(system, name)?;
        let plan = self.warm_up_plan();
        let blocks = (self.size / MAX_REQUEST as u64).max(1);
        let readers: Vec<(u32, u64)> = cpus
            .iter()
            .flat_map(|&cpu| std::iter::repeat_n(cpu, 2 * plan.threads))
            .enumerate()
            .map(|(i, cpu)| (cpu, (i as u64 % blocks) * MAX_REQUEST as u64))
            .collect();
        let mut warm = 0;
        for _ in 0..WARM_UP_ROUNDS {
            system
                .read_direct(Path::new(&self.nbd_device), &readers, MAX_REQUEST)
                .with_context(|| format!("read {}", self.nbd_device))?;
            warm = self.warm_connections(system);
            if warm >= cpus.len() as u64 {
                debug!("warm-up: {warm} connections warm");
                return Ok(());
            }
        }
        bail!(
            "after {WARM_UP_ROUNDS} rounds of reads, {warm} of the {} connections in use had \
             every one of their {} nbdkit threads take a {} request (see {})",
            cpus.len(),
            plan.threads,
            ByteSize(MAX_REQUEST as u64),
            self.instance.server_status().display()
        )
    }

    /// `warm_connections` from the plugin's status file; 0 if unreadable.
    fn warm_connections(&self, system: &dyn System) -> u64 {
        state::server_report(system, &self.instance)
            .and_then(|status| status["warm_connections"].as_u64())
            .unwrap_or(0)
    }

    /// The steps this plan runs, in order.
    pub fn steps(&self) -> Vec<Step> {
        STEPS
            .into_iter()
            .filter(|s| *s != Step::Encrypt || self.options.encrypt)
            .filter(|s| !matches!(s, Step::Slices | Step::Watch) || self.elastic.is_some())
            .collect()
    }

    /// The dm-crypt mapping swap runs on, with `--encrypt`.
    pub fn crypt_mapping(&self) -> Option<String> {
        self.options
            .encrypt
            .then(|| format!("vramswap-{}", self.instance.name))
    }

    /// The device that becomes swap: the mapping, or the NBD device.
    fn swap_device(&self) -> String {
        match self.crypt_mapping() {
            Some(mapping) => format!("/dev/mapper/{mapping}"),
            None => self.nbd_device.clone(),
        }
    }

    /// Plain dm-crypt, the way crypttab's `swap` option sets up disk swap:
    /// a random key read from /dev/urandom, held only by the kernel, gone
    /// when the mapping is closed. 4 KiB sectors match the pages swapped.
    fn encrypt_command(&self, mapping: &str) -> Cmd {
        Cmd::new("cryptsetup")
            .args(["open", "--type", "plain", "--cipher", "aes-xts-plain64"])
            .args(["--key-size", "512", "--key-file", "/dev/urandom"])
            .args(["--sector-size", "4096"])
            .arg(&self.nbd_device)
            .arg(mapping)
    }

    fn mkswap_command(&self) -> Cmd {
        nbd::mkswap_command(
            &format!("vramswap-{}", self.instance.name),
            &self.swap_device(),
        )
    }

    fn swapon_command(&self) -> Cmd {
        nbd::swapon_command(
            self.options.priority,
            &self.swap_device(),
            self.options.discard,
        )
    }

    /// What a step does, as `--dry-run` prints it.
    pub fn describe(&self, step: Step) -> String {
        match step {
            Step::CreateDir => format!("mkdir -m 0700 {}", self.instance.dir.display()),
            Step::StartServer => self.nbdkit_command().to_string(),
            Step::WaitForServer => format!(
                "wait until nbdkit answers on {} (up to {} s), then chmod 0600 it",
                self.instance.socket().display(),
                self.options.timeout.as_secs()
            ),
            Step::Attach => self.attach_command().to_string(),
            Step::NoThrottling => format!("echo 0 > {}", self.wbt_attribute().display()),
            Step::WarmUp => format!(
                "echo {} > {}; read {} through {}, {} at a time per hardware queue, \
                 until each connection's {} nbdkit threads have taken one",
                MAX_REQUEST >> 10,
                self.queue_attribute("max_sectors_kb").display(),
                ByteSize(MAX_REQUEST as u64),
                self.nbd_device,
                2 * self.options.threads,
                self.options.threads
            ),
            Step::Encrypt => match self.crypt_mapping() {
                Some(mapping) => self.encrypt_command(&mapping).to_string(),
                None => "no encryption".into(),
            },
            Step::Slices => self.each_slice(|s| self.slice_command(s)),
            Step::Mkswap => match &self.elastic {
                Some(_) => self.each_slice(|s| nbd::mkswap_command(&s.mapping, &s.path())),
                None => self.mkswap_command().to_string(),
            },
            Step::Swapon => match &self.elastic {
                Some(_) => self.each_slice(|s| {
                    nbd::swapon_command(s.priority, &s.path(), self.options.discard)
                }),
                None => self.swapon_command().to_string(),
            },
            Step::WriteState => format!("write {}", self.instance.state().display()),
            Step::Watch => format!("{} &", watch::command(&self.instance.name)),
        }
    }

    /// `dmsetup create` of one slice over the NBD device.
    fn slice_command(&self, slice: &Slice) -> Cmd {
        Cmd::new("dmsetup")
            .args(["create", &slice.mapping, "--table"])
            .arg(slice.table(&self.nbd_device))
    }

    /// `describe` of a step run once per slice.
    fn each_slice(&self, cmd: impl Fn(&Slice) -> Cmd) -> String {
        let slices = self.elastic.iter().flat_map(|l| &l.slices);
        slices
            .map(|s| cmd(s).to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Runs a step's command for each slice, in order, given the slice's
    /// block device (see [`watch::device`]).
    fn run_each(&self, system: &mut dyn System, cmd: impl Fn(&str, &Slice) -> Cmd) -> Result<()> {
        for slice in self.elastic.iter().flat_map(|l| &l.slices) {
            let device = watch::device(system, slice);
            run_ok(system, &cmd(&device, slice))?;
        }
        Ok(())
    }

    /// Why this plan's backend is a poor choice for its GPU, if it is:
    /// said before a start and in a dry run, never refused (Vulkan serves
    /// correctly everywhere).
    pub fn caution(&self) -> Option<&'static str> {
        backend::caution(self.backend, &self.device)
    }

    pub fn print(&self) {
        let d = &self.device;
        println!("plan for instance '{}':", self.instance.name);
        println!(
            "  gpu     {} ({}, {}, {})",
            d.name,
            self.backend,
            d.uuid_string(),
            d.pci_bus_id.as_deref().unwrap_or("no PCI id")
        );
        println!(
            "  size    {} ({} allocation)",
            ByteSize(self.size),
            self.options.export.allocation
        );
        let export = &self.options.export;
        if export.compress.is_on() {
            println!(
                "  compress {}: a {} swap area on that VRAM (ratio {})",
                export.compress,
                ByteSize(self.area_size()),
                export.ratio
            );
        }
        println!(
            "  swap    {}, {} connections, priority {}{}",
            self.nbd_device,
            self.options.connections,
            self.options.priority,
            if self.options.discard {
                ", discard"
            } else {
                ""
            }
        );
        if let Some(layout) = &self.elastic {
            println!(
                "  elastic {} slices of {}, priorities {} to {}; headroom {}, settle {} s",
                layout.slices.len(),
                ByteSize(layout.slices[0].size),
                layout.slices[0].priority,
                layout.slices[layout.slices.len() - 1].priority,
                ByteSize(layout.headroom),
                layout.settle
            );
        }
        if let Some(why) = self.caution() {
            println!("  note    {why}");
        }
        for (i, step) in self.steps().iter().enumerate() {
            println!("  {}. {}", i + 1, self.describe(*step));
        }
    }

    fn state(&self, pid: u32) -> State {
        State {
            version: STATE_VERSION,
            name: self.instance.name.clone(),
            pid,
            socket: self.instance.socket(),
            nbd_device: self.nbd_device.clone(),
            size: self.area_size(),
            backend: self.backend.to_string(),
            device_name: self.device.name.clone(),
            device_uuid: self.device.uuid_string(),
            priority: self.options.priority,
            connections: self.options.connections,
            settings: self.options.settings.clone(),
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            group: self.options.group.clone(),
            crypt: self.crypt_mapping(),
            elastic: self.elastic.clone(),
        }
    }

    fn run_step(&self, system: &mut dyn System, step: Step) -> Result<()> {
        match step {
            Step::CreateDir => system
                .create_dir(&self.instance.dir, 0o700)
                .with_context(|| format!("mkdir {}", self.instance.dir.display())),
            Step::StartServer => {
                let out = system
                    .run(&self.nbdkit_command())
                    .context("cannot run nbdkit")?;
                if !out.success() {
                    bail!("{}", out.reason());
                }
                Ok(())
            }
            Step::WaitForServer => self.wait_for_server(system),
            Step::Attach => run_ok(system, &self.attach_command()),
            Step::NoThrottling => {
                let attribute = self.wbt_attribute();
                if !system.exists(&attribute) {
                    // A kernel without writeback throttling.
                    debug!("{} does not exist", attribute.display());
                    return Ok(());
                }
                system
                    .write_attribute(&attribute, "0")
                    .with_context(|| format!("echo 0 > {}", attribute.display()))
            }
            Step::WarmUp => self.warm_up(system),
            Step::Encrypt => match self.crypt_mapping() {
                Some(mapping) => run_ok(system, &self.encrypt_command(&mapping)),
                None => Ok(()),
            },
            Step::Slices => self.run_each(system, |_, s| self.slice_command(s)),
            Step::Mkswap => match &self.elastic {
                Some(_) => {
                    self.run_each(system, |device, s| nbd::mkswap_command(&s.mapping, device))
                }
                None => run_ok(system, &self.mkswap_command()),
            },
            Step::Swapon => match &self.elastic {
                Some(_) => self.run_each(system, |device, s| {
                    nbd::swapon_command(s.priority, device, self.options.discard)
                }),
                None => run_ok(system, &self.swapon_command()),
            },
            Step::Watch => {
                let cmd = watch::command(&self.instance.name);
                system
                    .spawn(&cmd, &self.instance.dir.join("elastic.log"))
                    .with_context(|| format!("cannot run {}", cmd.program))?;
                Ok(())
            }
            Step::WriteState => {
                let pid = state::read_pid(system, &self.instance.pidfile())
                    .ok_or_else(|| anyhow!("nbdkit wrote no pidfile"))?;
                system
                    .write(&self.instance.state(), &self.state(pid).to_json(), 0o600)
                    .with_context(|| format!("write {}", self.instance.state().display()))
            }
        }
    }

    /// Undoes a step; `None` for steps with nothing to undo.
    fn undo_step(&self, system: &mut dyn System, step: Step) -> Option<Result<()>> {
        match step {
            Step::CreateDir => Some(
                system
                    .remove_dir_all(&self.instance.dir)
                    .with_context(|| format!("remove {}", self.instance.dir.display())),
            ),
            Step::StartServer => Some(stop_server(system, &self.instance)),
            Step::Attach => Some(run_ok(
                system,
                &Cmd::new("nbd-client").arg("-d").arg(&self.nbd_device),
            )),
            Step::Encrypt => self
                .crypt_mapping()
                .map(|mapping| run_ok(system, &Cmd::new("cryptsetup").arg("close").arg(mapping))),
            Step::Swapon => Some(match &self.elastic {
                // Each slice that is on; the first failure is the error.
                Some(layout) => {
                    let mut result = Ok(());
                    for slice in &layout.slices {
                        if watch::is_mapped(system, slice) {
                            let device = watch::device(system, slice);
                            let off = run_ok(system, &Cmd::new("swapoff").arg(device));
                            result = result.and(off);
                        }
                    }
                    result
                }
                None => run_ok(system, &Cmd::new("swapoff").arg(self.swap_device())),
            }),
            Step::Slices => self
                .elastic
                .as_ref()
                .map(|layout| watch::remove_mappings(system, layout)),
            Step::Watch => Some(watch::stop_watcher(system, &self.instance)),
            // Left off: the device is only ever vramswap's swap, and the
            // hang it prevents outlives the instance (see wbt_attribute).
            Step::WaitForServer
            | Step::NoThrottling
            | Step::WarmUp
            | Step::Mkswap
            | Step::WriteState => None,
        }
    }

    fn wait_for_server(&self, system: &mut dyn System) -> Result<()> {
        const POLL: Duration = Duration::from_millis(100);
        let socket = self.instance.socket();
        let mut waited = Duration::ZERO;
        loop {
            if system.answers_nbd(&socket) {
                return system
                    .set_mode(&socket, 0o600)
                    .with_context(|| format!("chmod 0600 {}", socket.display()));
            }
            if let Some(pid) = state::read_pid(system, &self.instance.pidfile()) {
                if !system.alive(pid) {
                    bail!("nbdkit exited: {}", self.server_error(system));
                }
            }
            if waited >= self.options.timeout {
                bail!(
                    "nbdkit did not answer within {} s{}",
                    self.options.timeout.as_secs(),
                    match self.server_error(system).as_str() {
                        "" => String::new(),
                        reason => format!(": {reason}"),
                    }
                );
            }
            system.sleep(POLL);
            waited += POLL;
        }
    }

    /// The plugin's last error from its log file (see `VRAMSWAP_LOG_FILE`).
    fn server_error(&self, system: &dyn System) -> String {
        let log = system.read(&self.instance.log()).unwrap_or_default();
        log.lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .map(str::to_string)
            .unwrap_or_else(|| {
                format!(
                    "no error recorded in {}; see the system log (journalctl -t nbdkit)",
                    self.instance.log().display()
                )
            })
    }

    /// Runs the plan. If a step fails, the steps done so far (and the
    /// failed one, where undoing is harmless) are undone in reverse order,
    /// and the error says which step failed, why, and what was undone.
    pub fn execute(&self, system: &mut dyn System) -> Result<()> {
        let steps = self.steps();
        for (i, step) in steps.iter().enumerate() {
            info!("{}: {}", step.name(), self.describe(*step));
            if let Err(err) = self.run_step(system, *step) {
                let mut undone = Vec::new();
                let mut not_undone = Vec::new();
                for (j, done) in steps[..=i].iter().enumerate().rev() {
                    match self.undo_step(system, *done) {
                        None => {}
                        // The failed step itself was not done; undoing it
                        // only cleans up whatever part of it happened.
                        Some(Ok(())) if j == i => {}
                        Some(Ok(())) => undone.push(done.name()),
                        // The failed step may not have happened at all;
                        // undoing it is best effort.
                        Some(Err(e)) if j == i => debug!("undo {}: {e:#}", done.name()),
                        Some(Err(e)) => {
                            warn!("could not undo '{}': {e:#}", done.name());
                            not_undone.push(done.name());
                        }
                    }
                }
                let mut message = format!("step {} ({}) failed: {err:#}", i + 1, step.name());
                if !undone.is_empty() {
                    message += &format!("; undone: {}", undone.join(", "));
                }
                if !not_undone.is_empty() {
                    message += &format!("; could NOT undo: {}", not_undone.join(", "));
                }
                bail!(message);
            }
        }
        Ok(())
    }
}

fn run_ok(system: &mut dyn System, cmd: &Cmd) -> Result<()> {
    let out = system
        .run(cmd)
        .with_context(|| format!("cannot run {}", cmd.program))?;
    if !out.success() {
        bail!("{cmd}: {}", out.reason());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::start::fixtures::{gpus, machine, options, with_server};
    use crate::start::preflight::preflight;
    use crate::start::run;
    use crate::system::fake::Call;

    #[test]
    fn vulkan_on_an_nvidia_gpu_is_cautioned_where_cuda_is_built_in() {
        let mut system = machine();
        let (_, plan) = preflight(&mut system, &gpus(), &options(), false);
        let plan = plan.unwrap();
        assert_eq!(plan.backend, BackendKind::Vulkan);
        let cuda_here = BackendKind::compiled_in().contains(&BackendKind::Cuda);
        assert_eq!(plan.caution().is_some(), cuda_here, "{:?}", plan.caution());
    }

    #[test]
    fn encrypt_puts_swap_on_a_plain_dm_crypt_mapping_with_a_random_key() {
        let mut system = machine();
        with_server(&mut system);
        let mut opts = options();
        opts.encrypt = true;
        let (_, plan) = preflight(&mut system, &gpus(), &opts, false);
        let plan = plan.unwrap();
        let lines: Vec<String> = plan.steps().iter().map(|s| plan.describe(*s)).collect();
        assert_eq!(
            lines[6..9],
            [
                "cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 \
                 --key-file /dev/urandom --sector-size 4096 /dev/nbd0 vramswap-default",
                "mkswap -L vramswap-default /dev/mapper/vramswap-default",
                "swapon --priority 50 --discard /dev/mapper/vramswap-default",
            ]
        );
        plan.execute(&mut system).unwrap();
        let state = State::load(&system, &plan.instance).unwrap();
        assert_eq!(state.crypt.as_deref(), Some("vramswap-default"));
        assert_eq!(state.nbd_device, "/dev/nbd0");
        // Without --encrypt there is no such step at all.
        let (_, plain) = preflight(&mut machine(), &gpus(), &options(), false);
        assert!(!plain.unwrap().steps().contains(&Step::Encrypt));
    }

    #[test]
    fn the_plan_is_the_documented_sequence_of_commands() {
        let mut system = machine();
        let (checks, plan) = preflight(&mut system, &gpus(), &options(), false);
        assert!(checks.iter().all(|c| c.result.is_ok()), "{checks:?}");
        let plan = plan.unwrap();
        assert_eq!(plan.nbd_device, "/dev/nbd0");
        assert_eq!(plan.size, 8 << 30);
        let lines: Vec<String> = plan.steps().iter().map(|s| plan.describe(*s)).collect();
        assert_eq!(
            lines,
            [
                "mkdir -m 0700 /run/vramswap/default",
                                "VRAMSWAP_LOG_FILE=/run/vramswap/default/nbdkit.log \
                 VRAMSWAP_STATUS_FILE=/run/vramswap/default/server.json setsid nbdkit --unix /run/vramswap/default/nbd.sock \
                 --pidfile /run/vramswap/default/nbdkit.pid --threads 16 \
                 /usr/lib/nbdkit/plugins/nbdkit-vramswap-plugin.so backend=vulkan size=8589934592 \
                 readahead=0 direct=on storage-daemon=on warm-up=16:131072",
                "wait until nbdkit answers on /run/vramswap/default/nbd.sock (up to 300 s), then chmod 0600 it",
                "nbd-client -unix /run/vramswap/default/nbd.sock /dev/nbd0 -b 4096 -swap -timeout 300 -C 4",
                "echo 0 > /sys/block/nbd0/queue/wbt_lat_usec",
                "echo 128 > /sys/block/nbd0/queue/max_sectors_kb; read 128 KiB through /dev/nbd0, \
                 32 at a time per hardware queue, until each connection's 16 nbdkit threads have taken one",
                "mkswap -L vramswap-default /dev/nbd0",
                "swapon --priority 50 --discard /dev/nbd0",
                "write /run/vramswap/default/state.json",
            ]
        );
    }

    #[test]
    fn compression_reaches_the_plugin_and_sizes_the_area() {
        let mut system = machine();
        let mut opts = options();
        opts.export.set("compress", "lz4").unwrap();
        opts.export.set("ratio", "2.5").unwrap();
        let (_, plan) = preflight(&mut system, &gpus(), &opts, false);
        let plan = plan.unwrap();
        let server = plan.describe(Step::StartServer);
        assert!(
            server.contains("size=8589934592 readahead=0 direct=on storage-daemon=on")
                && server.ends_with("compress=lz4 ratio=2.5"),
            "{server}"
        );
        // The VRAM is what is tested and taken; the area is larger.
        assert_eq!(plan.size, 8 << 30);
        assert_eq!(plan.area_size(), 20 << 30);
    }

    #[test]
    fn verify_reaches_the_plugin_as_verify_on() {
        let mut system = machine();
        let mut opts = options();
        opts.export.set("verify", "on").unwrap();
        let (_, plan) = preflight(&mut system, &gpus(), &opts, false);
        let server = plan.unwrap().describe(Step::StartServer);
        assert!(
            server.ends_with(
                "size=8589934592 readahead=0 verify=on direct=on storage-daemon=on warm-up=16:131072"
            ),
            "{server}"
        );
    }

    #[test]
    fn a_full_start_runs_every_step_and_records_state() {
        let mut system = machine();
        with_server(&mut system);
        let (_, plan) = preflight(&mut system, &gpus(), &options(), false);
        plan.unwrap().execute(&mut system).unwrap();
        let instance = InstanceDir::new("default").unwrap();
        let state = State::load(&system, &instance).unwrap();
        assert_eq!(
            (state.pid, state.nbd_device.as_str(), state.size),
            (4321, "/dev/nbd0", 8 << 30)
        );
        assert!(system
            .calls
            .contains(&Call::SetMode(instance.socket(), 0o600)));
        let ran = system.ran();
        assert!(ran.iter().any(|l| l.starts_with("swapon")), "{ran:?}");
        assert_eq!(
            system
                .read(Path::new("/sys/block/nbd0/queue/wbt_lat_usec"))
                .unwrap(),
            "0"
        );
    }

    #[test]
    fn warm_up_caps_requests_and_reads_on_every_queue_until_the_plugin_says_warm() {
        let mut system = machine();
        with_server(&mut system);
        let (_, plan) = preflight(&mut system, &gpus(), &options(), false);
        plan.unwrap().execute(&mut system).unwrap();
        assert_eq!(
            system
                .read(Path::new("/sys/block/nbd0/queue/max_sectors_kb"))
                .unwrap(),
            "128"
        );
        let reads: Vec<&Call> = system
            .calls
            .iter()
            .filter(|c| matches!(c, Call::ReadDirect(..)))
            .collect();
        // Warm after one round: 32 readers on each of the two queues' CPUs.
        assert_eq!(
            reads,
            [&Call::ReadDirect(
                "/dev/nbd0".into(),
                64,
                128 << 10,
                vec![0, 1]
            )]
        );
        // The warm-up comes before anything is written to the device.
        let order: Vec<usize> = [
            |c: &Call| matches!(c, Call::ReadDirect(..)),
            |c: &Call| matches!(c, Call::Run(l) if l.starts_with("mkswap")),
        ]
        .iter()
        .map(|f| system.calls.iter().position(f).unwrap())
        .collect();
        assert!(order[0] < order[1], "{order:?}");
    }

    #[test]
    fn a_server_whose_threads_never_all_take_a_read_fails_start() {
        let mut system = machine();
        with_server(&mut system);
        // One of the two connections never gets warm.
        system.warm_status = Some(r#"{"failure":null,"warm_connections":1}"#.into());
        let err = run(&mut system, &gpus(), &options(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "step 6 (warm up nbdkit's threads) failed: after 10 rounds of reads, 1 of the 2 \
                 connections in use had every one of their 16 nbdkit threads take a 128 KiB request"
            ),
            "{err}"
        );
        assert!(
            err.ends_with(
                "undone: attach the NBD device, start nbdkit, create the instance directory"
            ),
            "{err}"
        );
        let rounds = system
            .calls
            .iter()
            .filter(|c| matches!(c, Call::ReadDirect(..)))
            .count();
        assert_eq!(rounds, 10);
        assert!(!system.ran().iter().any(|l| l.starts_with("mkswap")));
    }

    #[test]
    fn a_kernel_without_writeback_throttling_is_fine() {
        let mut system = machine();
        with_server(&mut system);
        std::fs::remove_file(system.root.path().join("sys/block/nbd0/queue/wbt_lat_usec")).unwrap();
        let (_, plan) = preflight(&mut system, &gpus(), &options(), false);
        plan.unwrap().execute(&mut system).unwrap();
        assert!(system.ran().iter().any(|l| l.starts_with("swapon")));
    }

    /// For every step: make it fail, and check that exactly the steps
    /// before it are undone, newest first, and nothing is left behind.

    #[test]
    fn a_failure_at_any_step_undoes_the_earlier_steps_in_reverse() {
        let failing = [
            (Step::CreateDir, "mkdir /run/vramswap/default"),
            (Step::StartServer, "nbdkit --unix"),
            (Step::WaitForServer, ""),
            (Step::Attach, "nbd-client -unix"),
            (
                Step::NoThrottling,
                "write /sys/block/nbd0/queue/wbt_lat_usec",
            ),
            (Step::WarmUp, "read /dev/nbd0"),
            (Step::Encrypt, "cryptsetup open"),
            (Step::Mkswap, "mkswap"),
            (Step::Swapon, "swapon"),
            (Step::WriteState, "write /run/vramswap/default/state.json"),
        ];
        let runs = [false, true]
            .into_iter()
            .flat_map(|encrypt| failing.iter().map(move |f| (encrypt, *f)))
            .filter(|(encrypt, (step, _))| *encrypt || *step != Step::Encrypt);
        for (encrypt, (step, prefix)) in runs {
            let mut system = machine();
            with_server(&mut system);
            let mut opts = options();
            opts.encrypt = encrypt;
            if step == Step::WaitForServer {
                // Alive but never answering: the wait times out.
                system.answers_nbd = false;
                opts.timeout = Duration::from_secs(1);
                system.on_run.push((
                    "nbdkit --unix".into(),
                    "/run/vramswap/default/nbdkit.log".into(),
                    "warning: x\nerror: size=8G: too big\n".into(),
                ));
            } else {
                system.fail_on = Some(prefix.to_string());
            }
            let (_, plan) = preflight(&mut system, &gpus(), &opts, false);
            let plan = plan.unwrap();
            let err = plan.execute(&mut system).unwrap_err().to_string();
            let index = plan.steps().iter().position(|s| *s == step).unwrap();
            assert!(
                err.starts_with(&format!("step {} ({})", index + 1, step.name())),
                "{err}"
            );
            if step == Step::WaitForServer {
                assert!(
                    err.contains("nbdkit did not answer within 1 s: size=8G: too big"),
                    "{err}"
                );
            }

            // What ran after the failure, in order: the undo actions.
            let failed_at = system
                .calls
                .iter()
                .position(|c| match c {
                    Call::Run(l) => !prefix.is_empty() && l.contains(prefix),
                    Call::CreateDir(_) => step == Step::CreateDir,
                    Call::ReadDirect(..) => step == Step::WarmUp,
                    Call::Write(p) => {
                        (step == Step::WriteState && p.ends_with("state.json"))
                            || (step == Step::NoThrottling && p.ends_with("wbt_lat_usec"))
                    }
                    _ => false,
                })
                .unwrap_or_else(|| {
                    // WaitForServer fails without a call of its own.
                    system
                        .ran()
                        .iter()
                        .position(|l| l.contains("nbdkit --unix"))
                        .unwrap()
                        + 1
                });
            let after: Vec<String> = system.calls[failed_at..]
                .iter()
                .filter_map(|c| match c {
                    Call::Run(l) if l.starts_with("swapoff") => Some("swapoff".to_string()),
                    Call::Run(l) if l.starts_with("nbd-client -d") => Some("detach".to_string()),
                    Call::Run(l) if l.starts_with("cryptsetup close") => Some("close".to_string()),
                    Call::Signal(_, sig) if *sig == libc::SIGTERM => {
                        Some("stop nbdkit".to_string())
                    }
                    Call::RemoveDir(_) => Some("remove dir".to_string()),
                    _ => None,
                })
                .collect();
            let mut expected: Vec<&str> = match step {
                Step::CreateDir => vec!["remove dir"],
                // nbdkit failed to run: it wrote no pidfile, nothing to stop.
                Step::StartServer => vec!["remove dir"],
                Step::WaitForServer => vec!["stop nbdkit", "remove dir"],
                Step::Attach | Step::NoThrottling | Step::WarmUp => {
                    vec!["detach", "stop nbdkit", "remove dir"]
                }
                // A failed open is closed too, in case it half happened.
                Step::Encrypt | Step::Mkswap => {
                    vec!["close", "detach", "stop nbdkit", "remove dir"]
                }
                Step::Swapon | Step::WriteState => {
                    vec!["swapoff", "close", "detach", "stop nbdkit", "remove dir"]
                }
                Step::Slices | Step::Watch => unreachable!("only in elastic plans"),
            };
            if !encrypt {
                expected.retain(|s| *s != "close");
            }

            assert_eq!(after, expected, "{step:?}, encrypt {encrypt}: {err}");
            assert!(
                !system.exists(Path::new("/run/vramswap/default")),
                "{step:?}: left the directory"
            );
        }
    }

    fn elastic_options() -> StartOptions {
        let settings = crate::config::Settings {
            size: Some("2G".into()),
            elastic: Some(true),
            slices: Some(4),
            settle: Some(5),
            plugin: options().plugin,
            ..Default::default()
        };
        settings.to_options("default", &Default::default()).unwrap()
    }

    #[test]
    fn an_elastic_plan_maps_slices_swaps_on_each_and_starts_the_watcher() {
        let mut system = machine();
        with_server(&mut system);
        let (checks, plan) = preflight(&mut system, &gpus(), &elastic_options(), false);
        assert!(checks.iter().all(|c| c.result.is_ok()), "{checks:?}");
        let plan = plan.unwrap();
        // Lazy allocation: a discarded slice gives its chunks back.
        assert!(plan
            .describe(Step::StartServer)
            .contains(" allocation=lazy"));
        let line = |step| plan.describe(step);
        assert_eq!(
            line(Step::Slices),
            "dmsetup create vramswap-default-s0 --table '0 1048576 linear /dev/nbd0 0'; \
             dmsetup create vramswap-default-s1 --table '0 1048576 linear /dev/nbd0 1048576'; \
             dmsetup create vramswap-default-s2 --table '0 1048576 linear /dev/nbd0 2097152'; \
             dmsetup create vramswap-default-s3 --table '0 1048576 linear /dev/nbd0 3145728'"
        );
        assert!(line(Step::Swapon).starts_with(
            "swapon --priority 50 --discard /dev/mapper/vramswap-default-s0; \
             swapon --priority 49 --discard /dev/mapper/vramswap-default-s1;"
        ));
        assert!(
            line(Step::Watch).ends_with(" elastic default &"),
            "{}",
            line(Step::Watch)
        );
        plan.execute(&mut system).unwrap();
        let state = State::load(&system, &plan.instance).unwrap();
        let layout = state.elastic.unwrap();
        assert_eq!(layout.slices.len(), 4);
        assert_eq!((layout.settle, layout.headroom), (5, 1 << 30));
        assert!(
            matches!(system.calls.last(), Some(Call::Spawn(l)) if l.ends_with("elastic default"))
        );
    }

    #[test]
    fn an_elastic_start_that_fails_removes_the_slices_it_mapped() {
        let mut system = machine();
        with_server(&mut system);
        for i in 0..4 {
            let mapping = format!("vramswap-default-s{i}");
            system.on_run.push((
                format!("dmsetup create {mapping} "),
                format!("/sys/block/dm-{i}/dm/name"),
                format!("{mapping}\n"),
            ));
        }
        system.fail_on = Some("swapon --priority 48".into());
        let (_, plan) = preflight(&mut system, &gpus(), &elastic_options(), false);
        let err = plan.unwrap().execute(&mut system).unwrap_err().to_string();
        assert!(err.starts_with("step 9 (swapon) failed"), "{err}");
        assert!(
            err.ends_with(
                "undone: map the slices, attach the NBD device, start nbdkit, \
                 create the instance directory"
            ),
            "{err}"
        );
        // Every slice swapped off, the mappings removed newest first, and
        // no watcher started.
        let ran = system.ran();
        let failed = ran
            .iter()
            .position(|l| l.starts_with("swapon --priority 48"))
            .unwrap();
        let after: Vec<&str> = ran[failed + 1..].iter().map(String::as_str).collect();
        assert_eq!(
            after[..6],
            [
                "swapoff /dev/dm-0",
                "swapoff /dev/dm-1",
                "swapoff /dev/dm-2",
                "swapoff /dev/dm-3",
                "dmsetup remove vramswap-default-s3",
                "dmsetup remove vramswap-default-s2",
            ]
        );
        assert!(!system.calls.iter().any(|c| matches!(c, Call::Spawn(_))));
        assert!(!system.exists(Path::new("/run/vramswap/default")));
    }

    #[test]
    fn a_server_that_dies_while_starting_is_reported_with_its_error() {
        let mut system = machine();
        with_server(&mut system);
        system.answers_nbd = false;
        system.alive.insert(4321, false);
        system.on_run.push((
            "nbdkit --unix".into(),
            "/run/vramswap/default/nbdkit.log".into(),
            "warning: mlockall failed\nerror: device=7: no device 7\n".into(),
        ));
        let err = run(&mut system, &gpus(), &options(), false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "step 3 (wait for nbdkit to serve) failed: nbdkit exited: device=7: no device 7; \
             undone: start nbdkit, create the instance directory"
        );
        assert!(!system.exists(Path::new("/run/vramswap/default")));
    }
}
