//! Compiles the compute shaders in `shaders/` (WGSL) to SPIR-V with naga,
//! a pure-Rust compiler, so building needs no system shader tools. Output:
//! `$OUT_DIR/<name>.spv`, included by the Vulkan backend with
//! `include_bytes!`.

use std::path::PathBuf;

/// Shaders to compile, by file stem.
const SHADERS: &[&str] = &["memtest"];

fn compile(name: &str, source: &str) -> Result<Vec<u32>, String> {
    let path = format!("shaders/{name}.wgsl");
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| e.emit_to_string_with_path(source, &path))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::PUSH_CONSTANT,
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string_with_path(source, &path))?;
    let options = naga::back::spv::Options {
        // SPIR-V 1.0: every Vulkan 1.1 driver takes it.
        lang_version: (1, 0),
        ..Default::default()
    };
    naga::back::spv::write_vec(&module, &info, &options, None).map_err(|e| e.to_string())
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in SHADERS {
        let path = format!("shaders/{name}.wgsl");
        println!("cargo:rerun-if-changed={path}");
        let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let words = compile(name, &source).unwrap_or_else(|e| panic!("{path}:\n{e}"));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(out.join(format!("{name}.spv")), bytes)
            .unwrap_or_else(|e| panic!("writing {name}.spv: {e}"));
    }
}
