//! Free VRAM as `VK_EXT_memory_budget` reports it, for the swap watcher
//! ([`crate::budget`]): the VRAM heap's budget less its usage, read from
//! the physical device, so that no logical device is made and no VRAM
//! taken.

use super::instance::{Adapter, Instance};
use crate::backend::{format_uuid, BackendKind, OpenError};
use crate::budget::{BudgetError, VramBudget};

/// One Vulkan device's free VRAM, read again at each call.
pub(crate) struct VulkanBudget {
    instance: Instance,
    adapter: Adapter,
}

impl VulkanBudget {
    /// Finds the device with `uuid`. One without `VK_EXT_memory_budget` is
    /// refused: Vulkan then reports only the heap's size, blind to what
    /// other programs use.
    pub(crate) fn open(uuid: &[u8; 16]) -> Result<Self, BudgetError> {
        let instance = Instance::new()?;
        let adapter = instance
            .adapters()
            .map_err(OpenError::from)?
            .into_iter()
            .find(|a| a.info.uuid == *uuid)
            .ok_or_else(|| BudgetError::NoDevice {
                backend: BackendKind::Vulkan,
                uuid: format_uuid(uuid),
            })?;
        if !adapter.has_memory_budget {
            return Err(BudgetError::Unsupported {
                device: format!("Vulkan device '{}'", adapter.info.name),
                reason: "it lacks VK_EXT_memory_budget, without which Vulkan cannot see \
                         what other programs use"
                    .into(),
            });
        }
        Ok(VulkanBudget { instance, adapter })
    }
}

impl VramBudget for VulkanBudget {
    fn free(&mut self) -> Result<u64, BudgetError> {
        Ok(self.instance.memory(&self.adapter, 0, None).available)
    }

    fn source(&self) -> String {
        format!("VK_EXT_memory_budget ({})", self.adapter.info.name)
    }
}
