//! Preflight: every check `start` makes before it touches anything, and
//! the plan they add up to.

use std::path::{Path, PathBuf};

use vramswap::backend::{select_device, BackendKind, DeviceInfo};
use vramswap::store::resolve_size;
use vramswap::{ByteSize, ExportConfig};

use super::plan::Plan;
use crate::config::StartOptions;
use crate::devices::Gpus;
use crate::elastic::Layout;
use crate::nbd;
use crate::state::{self, InstanceDir, State};
use crate::system::{Cmd, System};

/// Oldest nbdkit known to work (Debian 12's): after_fork, the plugin ABI.
const NBDKIT_MIN: (u32, u32) = (1, 32);
/// File name nbdkit looks for in its plugin directory for `nbdkit vramswap`.
const INSTALLED_PLUGIN: &str = "nbdkit-vramswap-plugin.so";
/// File name cargo gives the plugin (found next to the CLI in a build tree).
const BUILT_PLUGIN: &str = "libnbdkit_vramswap_plugin.so";

/// What a check found, or why start must not go on.
pub type Verdict = std::result::Result<String, String>;

/// One preflight check's verdict.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: &'static str,
    pub result: Verdict,
}

/// A check: `None` where it does not apply to this start.
type CheckFn = fn(&mut Preflight) -> Option<Verdict>;

/// Every check, in the order they run; a check may use what the ones
/// before it found.
const CHECKS: [(&str, CheckFn); 11] = [
    ("root", |p| Some(root(p))),
    ("name", |p| Some(name_is_free(p))),
    ("nbdkit", |p| Some(nbdkit_version(p.system))),
    ("plugin", |p| Some(plugin(p))),
    ("tools", |p| Some(tools(p))),
    ("nbd", |p| Some(nbd(p))),
    ("gpu", |p| Some(gpu(p))),
    ("size", size),
    ("elastic", elastic),
    ("memtest", memtest),
    ("numa", numa),
];

/// The machine, the options, and what the checks have found so far.
struct Preflight<'a> {
    system: &'a mut dyn System,
    gpus: &'a dyn Gpus,
    options: &'a StartOptions,
    dry_run: bool,
    instance: InstanceDir,
    plugin: Option<PathBuf>,
    nbd_device: Option<String>,
    /// `None` until the gpu check has run.
    gpu: Option<std::result::Result<(BackendKind, DeviceInfo), String>>,
    size: Option<u64>,
    elastic: Option<Layout>,
    numa: Option<(u32, String)>,
}

/// Runs every check, in order; on a real start the first failure stops
/// everything before anything is touched.
pub fn preflight(
    system: &mut dyn System,
    gpus: &dyn Gpus,
    options: &StartOptions,
    dry_run: bool,
) -> (Vec<Check>, Option<Plan>) {
    let instance = match InstanceDir::new(&options.name) {
        Ok(instance) => instance,
        Err(e) => {
            let check = Check {
                what: "name",
                result: Err(e.to_string()),
            };
            return (vec![check], None);
        }
    };
    let mut found = Preflight {
        system,
        gpus,
        options,
        dry_run,
        instance,
        plugin: None,
        nbd_device: None,
        gpu: None,
        size: None,
        elastic: None,
        numa: None,
    };
    let mut checks = Vec::new();
    for (what, check) in CHECKS {
        let Some(result) = check(&mut found) else {
            continue;
        };
        let failed = result.is_err();
        checks.push(Check { what, result });
        if failed && !dry_run {
            return (checks, None);
        }
    }
    (checks, found.plan())
}

impl Preflight<'_> {
    /// The plan, where the checks found everything it needs.
    fn plan(self) -> Option<Plan> {
        let Some(Ok((backend, device))) = self.gpu else {
            return None;
        };
        Some(Plan {
            instance: self.instance,
            plugin: self.plugin?,
            nbd_device: self.nbd_device?,
            backend,
            device,
            size: self.size?,
            numa: self.numa,
            options: self.options.clone(),
            elastic: match &self.options.elastic {
                Some(_) => Some(self.elastic?),
                None => None,
            },
        })
    }
}

fn root(p: &mut Preflight) -> Verdict {
    if p.system.is_root() {
        Ok("running as root".into())
    } else {
        Err("vramswap start must run as root: it attaches /dev/nbdN and runs swapon".into())
    }
}

fn plugin(p: &mut Preflight) -> Verdict {
    let found = find_plugin(p.system, p.options.plugin.as_deref());
    let verdict = found
        .as_ref()
        .map(|path| path.display().to_string())
        .map_err(Clone::clone);
    p.plugin = found.ok();
    verdict
}

fn tools(p: &mut Preflight) -> Verdict {
    let mut tools = vec!["nbd-client", "mkswap", "swapon", "swapoff"];
    if p.options.encrypt {
        tools.push("cryptsetup");
    }
    if p.options.elastic.is_some() {
        tools.push("dmsetup");
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !p.system.has_program(t))
        .collect();
    if missing.is_empty() {
        Ok(tools.join(", "))
    } else {
        Err(format!(
            "{} not found (install nbd-client, util-linux{})",
            missing.join(", "),
            match (p.options.encrypt, p.options.elastic.is_some()) {
                (true, _) => ", cryptsetup-bin",
                (false, true) => ", dmsetup",
                (false, false) => "",
            }
        ))
    }
}

fn nbd(p: &mut Preflight) -> Verdict {
    let found = nbd_device(p.system, p.options, p.dry_run);
    // A dry run shows the plan even where the kernel has no NBD devices yet
    // (a start would load the module and use the first free one).
    p.nbd_device = match &found {
        Ok(device) => Some(device.clone()),
        Err(_) if p.dry_run => Some("/dev/nbdN".to_string()),
        Err(_) => None,
    };
    found
}

fn gpu(p: &mut Preflight) -> Verdict {
    let found = pick_gpu(p.gpus, &p.options.export);
    let verdict = found
        .as_ref()
        .map(|(kind, d)| format!("{} ({kind}, {})", d.name, d.uuid_string()))
        .map_err(Clone::clone);
    p.gpu = Some(found);
    verdict
}

/// The size to serve: the options' on this GPU's free memory.
fn size(p: &mut Preflight) -> Option<Verdict> {
    let (_, device) = match p.gpu.as_ref()? {
        Ok(gpu) => gpu,
        // No GPU, no size: a dry run says so under both.
        Err(why) => return Some(Err(why.clone())),
    };
    let export = &p.options.export;
    let store = export.store_config();
    let size = resolve_size(store.size, store.allocation, device.memory, &device.name)
        .map(|r| r.bytes)
        .map_err(|e| match export.given("size") {
            Some(given) => format!("--size {given}: {e}"),
            None => e.to_string(),
        });
    p.size = size.as_ref().ok().copied();
    Some(size.map(|s| format!("{} ({})", ByteSize(s), export.allocation)))
}

/// With `--elastic`: the area cut into slices.
fn elastic(p: &mut Preflight) -> Option<Verdict> {
    let options = p.options.elastic.as_ref()?;
    let size = p.size?;
    let layout = crate::elastic::layout(&p.options.name, size, p.options.priority, options)
        .map_err(|e| e.to_string());
    p.elastic = layout.as_ref().ok().cloned();
    Some(layout.map(|l| {
        format!(
            "{} slices of {}, headroom {}",
            l.slices.len(),
            ByteSize(l.slices[0].size),
            ByteSize(l.headroom)
        )
    }))
}

/// With `--memtest`: the quick memory test over the area about to be
/// served, the same VRAM the server takes next (it is given back just
/// before).
fn memtest(p: &mut Preflight) -> Option<Verdict> {
    let (true, Some(Ok((_, device))), Some(size)) = (p.options.memtest, &p.gpu, p.size) else {
        return None;
    };
    Some(test_vram(p.gpus, device, size))
}

/// On a machine with several NUMA nodes: the GPU's, for the server.
fn numa(p: &mut Preflight) -> Option<Verdict> {
    let Some(Ok((_, device))) = &p.gpu else {
        return None;
    };
    let (node, cpus) = numa_node(p.system, device)?;
    let verdict = format!("GPU on node {node}: the server runs on its CPUs {cpus}");
    p.numa = Some((node, cpus));
    Some(Ok(verdict))
}

/// The GPU's NUMA node and its CPUs, where sysfs shows several nodes:
/// pinned there, the server's threads and the staging they first touch
/// stay next to the GPU.
fn numa_node(system: &dyn System, device: &DeviceInfo) -> Option<(u32, String)> {
    let nodes = system
        .list(Path::new("/sys/devices/system/node"))
        .ok()?
        .into_iter()
        .filter(|n| {
            n.strip_prefix("node")
                .is_some_and(|i| i.parse::<u32>().is_ok())
        })
        .count();
    if nodes < 2 {
        return None;
    }
    let bus = device.pci_bus_id.as_deref()?;
    let node: u32 = system
        .read(
            &Path::new("/sys/bus/pci/devices")
                .join(bus)
                .join("numa_node"),
        )
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cpus = system
        .read(Path::new(&format!(
            "/sys/devices/system/node/node{node}/cpulist"
        )))
        .ok()?
        .trim()
        .to_string();
    (!cpus.is_empty()).then_some((node, cpus))
}

fn test_vram(gpus: &dyn Gpus, device: &DeviceInfo, size: u64) -> Verdict {
    let report = gpus
        .memtest(device, size)
        .map_err(|e| format!("memtest: {e:#}"))?;
    if !report.bad_blocks.is_empty() {
        return Err(format!(
            "memtest found {} in {}: refusing to swap to bad VRAM (details: vramswap memtest --device {})",
            crate::memtest::bad_summary(&report),
            device.name,
            device.uuid_string()
        ));
    }
    let patterns: Vec<&str> = report.patterns.iter().map(|p| p.name()).collect();
    Ok(format!(
        "{} clean ({}; {:.1} GB/s)",
        ByteSize(report.size),
        patterns.join(", "),
        report.gb_per_s()
    ))
}

fn name_is_free(p: &mut Preflight) -> Verdict {
    let instance = &p.instance;
    if p.system.exists(&instance.dir) {
        return Err(format!(
            "instance '{}' exists ({}): see 'vramswap status {0}', or 'vramswap stop {0}' first",
            instance.name,
            instance.dir.display()
        ));
    }
    Ok(format!("'{}' is free", instance.name))
}

fn nbdkit_version(system: &mut dyn System) -> Verdict {
    if !system.has_program("nbdkit") {
        return Err("nbdkit not found (install the nbdkit package)".into());
    }
    let out = system
        .run(&Cmd::new("nbdkit").arg("--version"))
        .map_err(|e| format!("nbdkit --version: {e}"))?;
    let text = out.stdout.trim();
    let version = text.split_whitespace().nth(1).unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if !out.success() || found < NBDKIT_MIN {
        return Err(format!(
            "nbdkit {version} is too old or did not answer: vramswap needs {}.{} or newer",
            NBDKIT_MIN.0, NBDKIT_MIN.1
        ));
    }
    Ok(text.to_string())
}

/// `--plugin`, then `$VRAMSWAP_PLUGIN`, then next to this program (a build
/// tree), then nbdkit's plugin directory (an installed plugin).
fn find_plugin(
    system: &mut dyn System,
    given: Option<&Path>,
) -> std::result::Result<PathBuf, String> {
    if let Some(path) = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("VRAMSWAP_PLUGIN").map(PathBuf::from))
    {
        // nbdkit daemonizes into /: hand it an absolute path.
        let path = std::path::absolute(&path).unwrap_or(path);
        return if system.exists(&path) {
            Ok(path)
        } else {
            Err(format!("plugin {} does not exist", path.display()))
        };
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(BUILT_PLUGIN));
    }
    if let Ok(out) = system.run(&Cmd::new("nbdkit").arg("--dump-config")) {
        if let Some(dir) = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("plugindir="))
        {
            candidates.push(Path::new(dir.trim()).join(INSTALLED_PLUGIN));
        }
    }
    candidates
        .iter()
        .find(|p| system.exists(p))
        .cloned()
        .ok_or_else(|| {
            format!(
                "the vramswap plugin is not installed (looked for {}); see README: install it, or pass --plugin",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
}

fn nbd_device(system: &mut dyn System, options: &StartOptions, dry_run: bool) -> Verdict {
    if !nbd::kernel_has_nbd(system) {
        if dry_run {
            return Err(
                "no NBD devices (/sys/block/nbd0); a start would run 'modprobe nbd'".into(),
            );
        }
        if !system.has_program("modprobe") {
            return Err("no NBD support: /sys/block/nbd0 does not exist and there is no modprobe to load the nbd module".into());
        }
        let out = system
            .run(&Cmd::new("modprobe").arg("nbd"))
            .map_err(|e| format!("modprobe nbd: {e}"))?;
        if !nbd::kernel_has_nbd(system) {
            return Err(format!(
                "no NBD support in this kernel: modprobe nbd failed ({})",
                out.reason()
            ));
        }
    }
    let taken = taken_devices(system);
    match &options.nbd {
        Some(device) => {
            let name = nbd::kernel_name(device).map_err(|e| e.to_string())?;
            if !system.exists(&Path::new("/sys/block").join(name)) {
                Err(format!("{device} does not exist"))
            } else if !nbd::is_free(system, name) || taken.contains(device) {
                Err(format!("{device} is in use"))
            } else {
                Ok(format!("/dev/{name}"))
            }
        }
        None => {
            nbd::first_free(system, &taken).ok_or_else(|| "every /dev/nbdN is in use".to_string())
        }
    }
}

/// NBD devices other vramswap instances hold (attached or not yet).
fn taken_devices(system: &dyn System) -> Vec<String> {
    state::instances(system)
        .unwrap_or_default()
        .iter()
        .filter_map(|name| InstanceDir::new(name).ok())
        .filter_map(|instance| State::load(system, &instance).ok())
        .map(|s| s.nbd_device)
        .collect()
}

fn pick_gpu(
    gpus: &dyn Gpus,
    export: &ExportConfig,
) -> std::result::Result<(BackendKind, DeviceInfo), String> {
    let kind = match export.backend {
        Some(kind) => kind,
        None => gpus
            .default_backend(&export.device)
            .map_err(|e| e.to_string())?,
    };
    let devices = gpus.devices(kind).map_err(|e| e.to_string())?;
    let device = select_device(&devices, &export.device).map_err(|e| e.to_string())?;
    Ok((kind, device.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fake::FakeGpus;
    use crate::start::fixtures::{gpus, machine, options, with_server};
    use crate::start::plan::Step;
    use crate::start::run;
    use crate::system::fake::{Call, FakeSystem};

    #[test]
    fn on_several_numa_nodes_the_server_is_pinned_to_the_gpus_node() {
        let mut system = machine();
        system.fixture("/sys/devices/system/node/node0/cpulist", "0-7\n");
        let (_, plan) = preflight(&mut system, &gpus(), &options(), false);
        assert_eq!(plan.unwrap().numa, None, "one node: nothing to pin");

        system.fixture("/sys/devices/system/node/node1/cpulist", "8-15,24-31\n");
        system.fixture("/sys/bus/pci/devices/0000:01:00.0/numa_node", "1\n");
        let (checks, plan) = preflight(&mut system, &gpus(), &options(), false);
        let plan = plan.unwrap();
        assert_eq!(plan.numa, Some((1, "8-15,24-31".to_string())));
        assert!(checks.iter().any(|c| c.what == "numa"), "{checks:?}");
        assert!(
            plan.describe(Step::StartServer)
                .contains("taskset --cpu-list 8-15,24-31 nbdkit --unix"),
            "{}",
            plan.describe(Step::StartServer)
        );

        // The kernel does not know the GPU's node: no pinning.
        system.fixture("/sys/bus/pci/devices/0000:01:00.0/numa_node", "-1\n");
        let (_, plan) = preflight(&mut system, &gpus(), &options(), false);
        assert_eq!(plan.unwrap().numa, None);
    }

    #[test]
    fn preflight_failures_are_one_line_and_touch_nothing() {
        type Setup = Box<dyn Fn(&mut FakeSystem)>;
        let cases: Vec<(&str, Setup, &str)> = vec![
            ("not root", Box::new(|s| s.root_user = false), "must run as root"),
            ("no nbdkit", Box::new(|s| s.missing_programs.push("nbdkit".into())), "nbdkit not found"),
            (
                "old nbdkit",
                Box::new(|s| {
                    s.answers.retain(|(p, _)| p != "nbdkit --version");
                    s.answer("nbdkit --version", 0, "nbdkit 1.24.1\n", "");
                }),
                "nbdkit 1.24.1 is too old",
            ),
            ("no nbd-client", Box::new(|s| s.missing_programs.push("nbd-client".into())), "nbd-client not found"),
            (
                "no nbd module",
                Box::new(|s| {
                    std::fs::remove_dir_all(s.root.path().join("sys")).unwrap();
                    s.answer("modprobe nbd", 1, "", "modprobe: FATAL: Module nbd not found in directory /lib/modules/6.1\n");
                }),
                "no NBD support in this kernel: modprobe nbd failed (modprobe: FATAL: Module nbd not found",
            ),
            (
                "all nbd busy",
                Box::new(|s| {
                    s.fixture("/sys/block/nbd0/pid", "1\n");
                    s.fixture("/sys/block/nbd1/size", "8\n");
                }),
                "every /dev/nbdN is in use",
            ),
            (
                "name in use",
                Box::new(|s| s.fixture("/run/vramswap/default/state.json", "{}")),
                "instance 'default' exists",
            ),
        ];
        for (label, setup, needle) in cases {
            let mut system = machine();
            setup(&mut system);
            let err = run(&mut system, &gpus(), &options(), false)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{label}: {err}");
            assert!(!err.contains('\n'), "{label}: {err}");
            let changed: Vec<&Call> = system
                .calls
                .iter()
                .filter(|c| match c {
                    Call::Run(l) => !l.starts_with("nbdkit --") && !l.starts_with("modprobe"),
                    _ => true,
                })
                .collect();
            assert!(changed.is_empty(), "{label}: touched {changed:?}");
        }
    }

    #[test]
    fn memtest_runs_in_preflight_and_bad_vram_stops_start_before_anything() {
        let mut system = machine();
        with_server(&mut system);
        let mut opts = options();
        opts.memtest = true;
        let (checks, plan) = preflight(&mut system, &gpus(), &opts, false);
        let memtest = checks.iter().find(|c| c.what == "memtest").unwrap();
        assert_eq!(
            memtest.result.as_deref(),
            Ok("8 GiB clean (address, random; 34.4 GB/s)")
        );
        assert!(plan.is_some());

        let mut system = machine();
        let bad = FakeGpus {
            bad_blocks: vec![0x10000, 0x7_0000],
            ..gpus()
        };
        let err = run(&mut system, &bad, &opts, false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "memtest found 2 bad 64 KiB blocks at 0x10000, 0x70000 (2 mismatching words) in \
             NVIDIA H100 80GB HBM3: refusing to swap to bad VRAM (details: vramswap memtest \
             --device 39393939-3939-3939-3939-393939393939)"
        );
        assert!(
            system.calls.iter().all(|c| match c {
                Call::Run(l) => l.starts_with("nbdkit --"),
                _ => false,
            }),
            "touched {:?}",
            system.calls
        );
    }

    #[test]
    fn size_and_device_problems_name_both_numbers() {
        let mut system = machine();
        let mut opts = options();
        opts.export = ExportConfig::default();
        opts.export.set("size", "100G").unwrap();
        let err = run(&mut system, &gpus(), &opts, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--size 100G: size 100 GiB is larger than the 79 GiB available"),
            "{err}"
        );

        let mut opts = options();
        opts.export.set("device", "7").unwrap();
        let err = run(&mut system, &gpus(), &opts, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no device 7; devices: 0: NVIDIA H100"),
            "{err}"
        );
    }

    #[test]
    fn dry_run_prints_and_changes_nothing_even_when_checks_fail() {
        let mut system = machine();
        std::fs::remove_dir_all(system.root.path().join("sys")).unwrap();
        let (checks, plan) = preflight(&mut system, &gpus(), &options(), true);
        assert_eq!(
            plan.unwrap().describe(Step::Swapon),
            "swapon --priority 50 --discard /dev/nbdN"
        );
        let failed: Vec<&str> = checks
            .iter()
            .filter(|c| c.result.is_err())
            .map(|c| c.what)
            .collect();
        assert_eq!(failed, ["nbd"]);
        assert!(
            system.ran().iter().all(|l| !l.starts_with("modprobe")),
            "dry run loaded a module"
        );
        assert!(system.calls.iter().all(|c| matches!(c, Call::Run(_))));
    }
}
