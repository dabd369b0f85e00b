//! `vramswap start`: preflight, then the plan, step by step, undoing the
//! steps already done in reverse order if one fails.

#[cfg(test)]
mod fixtures;
mod plan;
mod preflight;

use anyhow::{anyhow, bail, Result};
use tracing::warn;
use vramswap::ByteSize;

use crate::cgroups;
use crate::config::StartOptions;
use crate::devices::Gpus;
use crate::system::System;
use crate::{nbd, sleep};

use preflight::preflight;

/// `vramswap start`.
pub fn run(
    system: &mut dyn System,
    gpus: &dyn Gpus,
    options: &StartOptions,
    dry_run: bool,
) -> Result<()> {
    let (checks, plan) = preflight(system, gpus, options, dry_run);
    if dry_run {
        if let Some(plan) = &plan {
            plan.print();
        }
        println!("preflight:");
        for c in &checks {
            match &c.result {
                Ok(detail) => println!("  ok    {:<7} {detail}", c.what),
                Err(why) => println!("  FAIL  {:<7} {why}", c.what),
            }
        }
        if checks.iter().any(|c| c.result.is_err()) {
            bail!("preflight failed: a start would change nothing and exit here");
        }
        return Ok(());
    }
    if let Some(failed) = checks.iter().find(|c| c.result.is_err()) {
        bail!("{}", failed.result.clone().err().unwrap_or_default());
    }
    let plan = plan.ok_or_else(|| anyhow!("preflight gave no plan"))?;
    if let Some(why) = plan.caution() {
        warn!("{} on {}: {why}", plan.backend, plan.device.name);
    }
    plan.execute(system)?;
    // Limits a suspend lifted and no resume put back (it crashed, or the
    // areas did not come back): with an area swapping, they can be.
    if cgroups::pending(system) && !sleep::resume_pending(system) {
        if let Err(err) = cgroups::restore(system) {
            warn!("{err:#}");
        }
    }
    let area = nbd::swap_area(system, &plan.nbd_device);
    println!(
        "vramswap: '{}' is swapping to {} on {} ({}, {}), priority {}",
        plan.instance.name,
        ByteSize(area.map_or(plan.size, |a| a.size_kib << 10)),
        plan.device.name,
        plan.backend,
        plan.nbd_device,
        plan.options.priority
    );
    Ok(())
}
