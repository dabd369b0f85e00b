//! Makes the man pages and shell completions from the clap definitions in
//! `src/args.rs` (and the plugin's key list from the core), so they cannot
//! drift from the program. Output: `$OUT_DIR/man/*.{1,5,8}` and
//! `$OUT_DIR/completions/`; `packaging/build-deb` installs them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

#[allow(dead_code)] // build.rs needs the parser's shape, not its values
mod args {
    include!("src/args.rs");
}
use args::Cli;

/// Section 8 pages for `vramswap` and each subcommand (`vramswap-start.8`…).
fn pages(cmd: &clap::Command, dir: &Path, top: bool) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, dir, false)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Manager's Manual")
        .source(format!("vramswap {}", env!("CARGO_PKG_VERSION")));
    let path = dir.join(man.get_filename());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    man.render_subcommands_section(&mut out)?;
    man.render_extra_section(&mut out)?;
    if top {
        out.write_all(FILES.as_bytes())?;
    }
    out.write_all(SEE_ALSO.as_bytes())?;
    man.render_version_section(&mut out)?;
    fs::write(path, out)
}

const FILES: &str = r#".SH FILES
.TP
.I /etc/vramswap.toml\fR, \fI/etc/vramswap/*.toml
Swap areas, one table each; see
.BR vramswap.toml (5).
.TP
.I /run/vramswap/NAME/
A running instance: nbdkit's Unix socket (0600, in a 0700 directory),
pidfile, the plugin's log of warnings and errors, and \fIstate.json\fR.
.TP
.I vramswap@NAME.service\fR, \fIvramswap-suspend.service\fR, \fIvramswap-resume.service
Start an area at boot; stop every area before the machine sleeps (the GPU
driver tears down video memory on suspend) and start them again after.
.SH EXIT STATUS
0 on success; 1 on any error (one line on standard error), and for
\fBstatus\fR when an instance is unhealthy; 2 for a bad command line.
"#;

const SEE_ALSO: &str = r#".SH SEE ALSO
.BR vramswap.toml (5),
.BR nbdkit-vramswap-plugin (1),
.BR nbdkit (1),
.BR nbd-client (8),
.BR swapon (8)
"#;

/// The plugin's page: the hand-written template with the parameter list
/// the plugin itself prints for `--help`.
fn plugin_page(dir: &Path) -> std::io::Result<()> {
    let template = fs::read_to_string("../man/nbdkit-vramswap-plugin.1.in")?;
    let help = vramswap::export::HELP
        .replace('\\', "\\\\")
        .replace('-', "\\-");
    fs::write(
        dir.join("nbdkit-vramswap-plugin.1"),
        template.replace("@HELP@", &help),
    )
}

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=src/args.rs");
    println!("cargo:rerun-if-changed=../man");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;

    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    pages(&cmd, &man, true)?;
    plugin_page(&man)?;
    fs::copy("../man/vramswap.toml.5", man.join("vramswap.toml.5"))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "vramswap", &completions)?;
    }
    Ok(())
}
