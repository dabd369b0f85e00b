//! `vramswap power`: the laptop power policy, run by vramswap-power.service
//! whenever a power supply changes (a udev rule starts it).
//!
//! An area configured with `on-battery = "stop"` is stopped while the
//! machine runs on battery (with `battery-below = N`, only once the charge
//! is under N %), and started again when the machine is back on AC (or the
//! charge back at N % or more). Only areas this policy stopped are started
//! again, from the list it keeps in /run/vramswap/power.json: an area the
//! admin stopped by hand stays stopped.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::config::{Config, Settings};
use crate::devices::Gpus;
use crate::state::{self, run_dir};
use crate::system::System;

const POWER_SUPPLY: &str = "/sys/class/power_supply";

/// What the power supplies say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Power {
    pub on_battery: bool,
    /// The lowest charge of the batteries, in percent.
    pub charge: Option<u8>,
}

/// Reads /sys/class/power_supply: on battery when there is a battery and
/// no mains or USB supply is online. A machine without a battery is on AC.
pub fn read(system: &dyn System) -> Power {
    let base = Path::new(POWER_SUPPLY);
    let mut batteries = 0;
    let mut online = false;
    let mut charge: Option<u8> = None;
    for supply in system.list(base).unwrap_or_default() {
        let dir = base.join(&supply);
        let attr = |name: &str| system.read(&dir.join(name)).map(|s| s.trim().to_string());
        match attr("type").unwrap_or_default().as_str() {
            "Battery" => {
                batteries += 1;
                if let Some(c) = attr("capacity").ok().and_then(|c| c.parse::<u8>().ok()) {
                    charge = Some(charge.map_or(c, |m| m.min(c)));
                }
            }
            "Mains" | "USB" => online |= attr("online").is_ok_and(|o| o == "1"),
            _ => {}
        }
    }
    Power {
        on_battery: batteries > 0 && !online,
        charge,
    }
}

/// Whether `settings` want the area stopped in `power`.
pub fn wants_stop(settings: &Settings, power: Power) -> bool {
    settings.on_battery.as_deref() == Some("stop")
        && power.on_battery
        && match (settings.battery_below, power.charge) {
            (Some(threshold), Some(charge)) => charge < threshold,
            // No threshold, or a battery that does not report its charge.
            _ => true,
        }
}

/// The areas this policy stopped, to start again on AC.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stopped {
    areas: Vec<String>,
}

const RECORD_FILE: &str = "power.json";

fn record_file() -> PathBuf {
    run_dir().join(RECORD_FILE)
}

fn load(system: &dyn System) -> Result<Stopped> {
    match system.read(&record_file()) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a vramswap power file", record_file().display())),
        Err(_) => Ok(Stopped::default()),
    }
}

fn save(system: &mut dyn System, stopped: &Stopped) -> Result<()> {
    if stopped.areas.is_empty() {
        if system.exists(&record_file()) {
            system.remove_file(&record_file())?;
        }
        return Ok(());
    }
    state::write_record(system, RECORD_FILE, stopped)
}

/// Applies the policy to every configured area.
pub fn run(system: &mut dyn System, gpus: &dyn Gpus) -> Result<()> {
    let config = Config::load(system, None)?;
    let power = read(system);
    info!(
        "power: on {}{}",
        if power.on_battery { "battery" } else { "AC" },
        power
            .charge
            .map_or(String::new(), |c| format!(", {c} % charged"))
    );
    let mut stopped = load(system)?;
    let mut failed = Vec::new();
    for (name, (settings, origin)) in &config.areas {
        let running = !state::resolve(system, name).unwrap_or_default().is_empty();
        let was_stopped_here = stopped.areas.contains(name);
        if wants_stop(settings, power) {
            if running {
                info!("power: stopping '{name}' (on battery)");
                match crate::stop::run(system, std::slice::from_ref(name), false) {
                    Ok(()) => {
                        stopped.areas.push(name.clone());
                        save(system, &stopped)?;
                    }
                    Err(err) => {
                        error!("power: cannot stop '{name}': {err:#}");
                        failed.push(name.clone());
                    }
                }
            }
        } else if was_stopped_here {
            info!("power: starting '{name}' again (on AC)");
            if let Err(err) = crate::group::start_area(system, gpus, name, settings, origin, false)
            {
                error!("power: cannot start '{name}' again: {err:#}");
                failed.push(name.clone());
            }
            stopped.areas.retain(|n| n != name);
            save(system, &stopped)?;
        }
    }
    if !failed.is_empty() {
        bail!("power policy failed for: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fake::{gpu, FakeGpus};
    use crate::system::fake::FakeSystem;

    fn supplies(system: &FakeSystem, ac: bool, charge: u8) {
        system.fixture("/sys/class/power_supply/AC/type", "Mains\n");
        system.fixture(
            "/sys/class/power_supply/AC/online",
            if ac { "1\n" } else { "0\n" },
        );
        system.fixture("/sys/class/power_supply/BAT0/type", "Battery\n");
        system.fixture(
            "/sys/class/power_supply/BAT0/capacity",
            &format!("{charge}\n"),
        );
    }

    #[test]
    fn batteries_mains_and_desktops_are_read_from_sysfs() {
        let system = FakeSystem::new();
        assert_eq!(
            read(&system),
            Power {
                on_battery: false,
                charge: None
            },
            "no battery: a desktop, on AC"
        );
        supplies(&system, false, 40);
        assert_eq!(
            read(&system),
            Power {
                on_battery: true,
                charge: Some(40)
            }
        );
        supplies(&system, true, 40);
        assert!(!read(&system).on_battery);
    }

    #[test]
    fn the_policy_stops_on_battery_below_the_threshold_only() {
        let mut settings = Settings::default();
        let battery = |charge| Power {
            on_battery: true,
            charge: Some(charge),
        };
        assert!(!wants_stop(&settings, battery(5)), "no policy: keep");
        settings.on_battery = Some("stop".into());
        assert!(wants_stop(&settings, battery(90)));
        assert!(!wants_stop(
            &settings,
            Power {
                on_battery: false,
                charge: Some(5)
            }
        ));
        settings.battery_below = Some(30);
        assert!(!wants_stop(&settings, battery(30)));
        assert!(wants_stop(&settings, battery(29)));
    }

    fn machine() -> FakeSystem {
        let system = FakeSystem::ready_to_start(1, &["laptop", "always"]);
        system.fixture(
            "/etc/vramswap.toml",
            "[laptop]\nsize = \"1G\"\non-battery = \"stop\"\nbattery-below = 50\n\
             plugin = \"/usr/lib/nbdkit/plugins/nbdkit-vramswap-plugin.so\"\n\n\
             [always]\nsize = \"1G\"\n",
        );
        system
    }

    fn gpus() -> FakeGpus {
        FakeGpus {
            devices: vec![gpu("Laptop GPU", 8 << 30)],
            bad_blocks: Vec::new(),
        }
    }

    fn running(system: &FakeSystem, name: &str) -> bool {
        system.exists(&crate::state::InstanceDir::new(name).unwrap().dir)
    }

    #[test]
    fn stops_on_battery_starts_on_ac_and_never_undoes_a_manual_stop() {
        let mut system = machine();
        let gpus = gpus();
        let config = Config::load(&system, None).unwrap();
        let (settings, origin) = &config.areas["laptop"];
        crate::group::start_area(&mut system, &gpus, "laptop", settings, origin, false).unwrap();
        assert!(running(&system, "laptop"));

        // On battery, above the threshold: nothing happens.
        supplies(&system, false, 80);
        run(&mut system, &gpus).unwrap();
        assert!(running(&system, "laptop"));
        // Below it: stopped, and remembered.
        supplies(&system, false, 20);
        run(&mut system, &gpus).unwrap();
        assert!(!running(&system, "laptop"));
        assert!(system.exists(&record_file()));
        // Back on AC: started again, and forgotten.
        supplies(&system, true, 20);
        run(&mut system, &gpus).unwrap();
        assert!(running(&system, "laptop"));
        assert!(!system.exists(&record_file()));
        // 'always' has no policy: never started by it.
        assert!(!running(&system, "always"));

        // Stopped by hand: AC does not bring it back.
        crate::stop::run(&mut system, &["laptop".into()], false).unwrap();
        run(&mut system, &gpus).unwrap();
        assert!(!running(&system, "laptop"));
    }
}
