//! Where a running instance keeps its files, and `state.json`: what
//! `vramswap start` set up, so `stop` and `status` can find it again.
//!
//! `/run/vramswap/NAME/` (0700) holds `nbd.sock` (0600), `nbdkit.pid`,
//! `nbdkit.log` (the plugin's warnings and errors), `server.json` (the
//! plugin's count of failed requests) and `state.json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::name::check_name;
use crate::system::System;

/// Default parent of the instance directories; `VRAMSWAP_RUN_DIR`
/// overrides it (tests, or a system without /run).
pub const RUN_DIR: &str = "/run/vramswap";

pub fn run_dir() -> PathBuf {
    std::env::var_os("VRAMSWAP_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

/// The files of one named instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDir {
    pub name: String,
    pub dir: PathBuf,
}

impl InstanceDir {
    pub fn new(name: &str) -> Result<Self> {
        check_name(name)?;
        Ok(InstanceDir {
            name: name.to_string(),
            dir: run_dir().join(name),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("nbdkit.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("nbdkit.log")
    }
    /// What the serving process reports about itself (see the plugin's
    /// `VRAMSWAP_STATUS_FILE`).
    pub fn server_status(&self) -> PathBuf {
        self.dir.join("server.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// What an elastic area's watcher last did (see `elastic::watch`).
    pub fn elastic(&self) -> PathBuf {
        self.dir.join("elastic.json")
    }
}

/// What `start` recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version of this file.
    pub version: u32,
    pub name: String,
    /// nbdkit's process id.
    pub pid: u32,
    pub socket: PathBuf,
    pub nbd_device: String,
    pub size: u64,
    pub backend: String,
    pub device_name: String,
    pub device_uuid: String,
    pub priority: i32,
    pub connections: u32,
    /// The area's settings as `start` resolved them (config file and
    /// flags), for `resume`.
    pub settings: crate::config::Settings,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// The group this instance belongs to (`start --device all` or a list
    /// of devices: one instance per GPU, all named after the group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The dm-crypt mapping swap runs on (`--encrypt`), over `nbd_device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crypt: Option<String>,
    /// The slices of an elastic area (`--elastic`), on `nbd_device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elastic: Option<crate::elastic::Layout>,
}

impl State {
    /// The block devices the kernel may list this instance's swap area
    /// under in /proc/swaps: the NBD device, or the dm-crypt mapping on
    /// it, or the first slice of an elastic area.
    pub fn swap_paths(&self, system: &dyn System) -> Vec<String> {
        match (&self.crypt, &self.elastic) {
            (Some(mapping), _) => crate::nbd::mapper_paths(system, mapping),
            (None, Some(layout)) => crate::nbd::mapper_paths(system, &layout.slices[0].mapping),
            (None, None) => vec![self.nbd_device.clone()],
        }
    }

    /// Every active swap area of this instance (one, or an elastic area's
    /// online slices), with the path each is listed under.
    pub fn swap_areas(&self, system: &dyn System) -> Vec<(String, crate::nbd::SwapArea)> {
        let candidates: Vec<Vec<String>> = match (&self.crypt, &self.elastic) {
            (None, Some(layout)) => layout
                .slices
                .iter()
                .map(|s| crate::nbd::mapper_paths(system, &s.mapping))
                .collect(),
            _ => vec![self.swap_paths(system)],
        };
        candidates
            .into_iter()
            .filter_map(|paths| {
                paths
                    .into_iter()
                    .find_map(|path| crate::nbd::swap_area(system, &path).map(|area| (path, area)))
            })
            .collect()
    }
}

pub const STATE_VERSION: u32 = 1;

impl State {
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Reads and checks an instance's state; a missing, truncated or
    /// foreign file is one clear error naming it.
    pub fn load(system: &dyn System, instance: &InstanceDir) -> Result<State> {
        let path = instance.state();
        let text = system
            .read(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let state: State = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid vramswap state file", path.display()))?;
        if state.version != STATE_VERSION {
            bail!(
                "{}: state version {} is not the {STATE_VERSION} this vramswap writes",
                path.display(),
                state.version
            );
        }
        if state.name != instance.name {
            bail!(
                "{}: records instance '{}', not '{}'",
                path.display(),
                state.name,
                instance.name
            );
        }
        Ok(state)
    }
}

/// Names of the instances that have a directory under the run dir.
pub fn instances(system: &dyn System) -> Result<Vec<String>> {
    match system.list(&run_dir()) {
        Ok(names) => Ok(names
            .into_iter()
            .filter(|n| check_name(n).is_ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("{}: cannot list", run_dir().display())),
    }
}

/// The instances `start` made as members of `group`, in name order; empty
/// when there is no such group.
pub fn group_members(system: &dyn System, group: &str) -> Result<Vec<String>> {
    let mut members: Vec<String> = instances(system)?
        .into_iter()
        .filter(|name| {
            InstanceDir::new(name)
                .and_then(|i| State::load(system, &i))
                .is_ok_and(|s| s.group.as_deref() == Some(group))
        })
        .collect();
    members.sort();
    Ok(members)
}

/// What a name on the command line of `stop` or `status` stands for: the
/// instance of that name, else the members of the group of that name.
pub fn resolve(system: &dyn System, name: &str) -> Result<Vec<String>> {
    let instance = InstanceDir::new(name)?;
    if system.exists(&instance.dir) {
        return Ok(vec![name.to_string()]);
    }
    let members = group_members(system, name)?;
    if members.is_empty() {
        bail!("no instance '{name}'");
    }
    Ok(members)
}

/// Writes `record` as JSON to `name` in the run directory (0600), making
/// the directory (0700) first where need be: what suspend and the power
/// policy keep for their next run.
pub fn write_record(system: &mut dyn System, name: &str, record: &impl Serialize) -> Result<()> {
    let dir = run_dir();
    if !system.exists(&dir) {
        system.create_dir(&dir, 0o700)?;
    }
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(record)?;
    system
        .write(&path, &text, 0o600)
        .with_context(|| format!("write {}", path.display()))
}

/// What the plugin last wrote to the instance's status file
/// (`VRAMSWAP_STATUS_FILE`), if it wrote one that parses.
pub fn server_report(system: &dyn System, instance: &InstanceDir) -> Option<serde_json::Value> {
    let text = system.read(&instance.server_status()).ok()?;
    serde_json::from_str(&text).ok()
}

/// The pid in nbdkit's pidfile, if it wrote one.
pub fn read_pid(system: &dyn System, pidfile: &Path) -> Option<u32> {
    system.read(pidfile).ok()?.trim().parse().ok()
}

/// A running instance's state, for tests: `name` on `device`, served by
/// `pid`, 256 MiB on lavapipe; a test changes what it needs.
#[cfg(test)]
pub(crate) fn test_state(name: &str, device: &str, pid: u32) -> State {
    State {
        version: STATE_VERSION,
        name: name.into(),
        pid,
        socket: format!("/run/vramswap/{name}/nbd.sock").into(),
        nbd_device: device.into(),
        size: 256 << 20,
        backend: "vulkan".into(),
        device_name: "llvmpipe".into(),
        device_uuid: "00".into(),
        priority: 50,
        connections: 4,
        settings: Default::default(),
        started: 0,
        group: None,
        crypt: None,
        elastic: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::FakeSystem;

    fn state() -> State {
        State {
            version: STATE_VERSION,
            name: "default".into(),
            pid: 4321,
            socket: "/run/vramswap/default/nbd.sock".into(),
            nbd_device: "/dev/nbd0".into(),
            size: 8 << 30,
            backend: "vulkan".into(),
            device_name: "NVIDIA H100 80GB HBM3".into(),
            device_uuid: "3911b20d-250f-381e-70e3-d98316e3fdec".into(),
            priority: 50,
            connections: 4,
            settings: Default::default(),
            started: 1_795_000_000,
            group: None,
            crypt: None,
            elastic: None,
        }
    }

    #[test]
    fn state_round_trips_and_bad_files_are_clear_errors() {
        let system = FakeSystem::new();
        let instance = InstanceDir::new("default").unwrap();
        let path = instance.state().to_string_lossy().into_owned();
        system.fixture(&path, &state().to_json());
        assert_eq!(State::load(&system, &instance).unwrap(), state());

        let full = state().to_json();
        for (contents, needle) in [
            (&full[..full.len() / 2], "not a valid vramswap state file"),
            ("", "not a valid vramswap state file"),
            ("{\"version\": 1}", "not a valid vramswap state file"),
            (
                &full.replace("\"version\": 1", "\"version\": 7"),
                "state version 7",
            ),
            (
                &full.replace("\"name\": \"default\"", "\"name\": \"other\""),
                "records instance 'other'",
            ),
        ] {
            system.fixture(&path, contents);
            let err = format!("{:#}", State::load(&system, &instance).unwrap_err());
            assert!(err.contains(needle), "{err}");
            assert!(err.contains("state.json"), "{err}");
        }
    }
}
