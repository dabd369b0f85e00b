//! The SPIR-V that build.rs generates from `shaders/*.wgsl` is valid:
//! read back by naga's SPIR-V front end and validated, and checked by
//! `spirv-val` (Khronos' validator, for the Vulkan 1.1 environment) where
//! it is installed (`scripts/setup-deps` installs it).

use std::process::Command;

use naga::valid::{Capabilities, ValidationFlags, Validator};

const MEMTEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtest.spv"));

#[test]
fn memtest_spirv_reads_back_and_validates_in_naga() {
    let module = naga::front::spv::parse_u8_slice(MEMTEST, &Default::default())
        .expect("naga reads the generated SPIR-V");
    Validator::new(ValidationFlags::all(), Capabilities::PUSH_CONSTANT)
        .validate(&module)
        .expect("the SPIR-V read back validates");
    let mut entries: Vec<(&str, [u32; 3])> = module
        .entry_points
        .iter()
        .filter(|e| e.stage == naga::ShaderStage::Compute)
        .map(|e| (e.name.as_str(), e.workgroup_size))
        .collect();
    entries.sort();
    // The Vulkan backend makes one pipeline per entry point, by name.
    assert_eq!(
        entries,
        [
            ("check", [256, 1, 1]),
            ("check_invert", [256, 1, 1]),
            ("fill", [256, 1, 1])
        ]
    );
}

#[test]
fn memtest_spirv_passes_spirv_val_where_installed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("memtest.spv");
    std::fs::write(&file, MEMTEST).unwrap();
    let out = match Command::new("spirv-val")
        .args(["--target-env", "vulkan1.1"])
        .arg(&file)
        .output()
    {
        Ok(out) => out,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("spirv-val is not installed; naga's validator alone checked the SPIR-V");
            return;
        }
        Err(err) => panic!("spirv-val: {err}"),
    };
    assert!(
        out.status.success(),
        "spirv-val: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
