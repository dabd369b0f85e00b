//! Instance and area names: they become directory names under
//! `/run/vramswap` and swap labels, so only plain ones are taken.

use anyhow::{bail, Result};

/// Refuses a name that is not 1 to 32 letters, digits, '-' or '_' (and
/// does not start with '-', which commands would read as an option).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if !ok {
        bail!("invalid name '{name}': use 1 to 32 letters, digits, '-' or '_'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["default", "gpu0", "a-b_c", "X"] {
            check_name(good).unwrap();
        }
        for bad in ["", "../etc", "a b", "-x", "é", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
