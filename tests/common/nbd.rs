//! Starting the real nbdkit with the vramswap plugin, and running real NBD
//! clients against it.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The plugin built for tests (with the `fault-injection` keys), built once
/// per test binary by cargo itself so it is never stale; or the one that
/// `VRAMSWAP_TEST_PLUGIN` names (on machines without cargo, such as the GPU
/// machine the binaries are carried to).
pub fn plugin_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::var_os("VRAMSWAP_TEST_PLUGIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                build(
                    &[
                        "-p",
                        "nbdkit-vramswap-plugin",
                        "--features",
                        "fault-injection",
                    ],
                    "nbdkit_vramswap_plugin",
                )
            })
    })
}

/// The `vramswap` CLI, built the same way (or `VRAMSWAP_TEST_CLI`).
pub fn cli_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::var_os("VRAMSWAP_TEST_CLI")
            .map(PathBuf::from)
            .unwrap_or_else(|| build(&["-p", "vramswap-cli", "--bin", "vramswap"], "vramswap"))
    })
}

/// Runs `cargo build ARGS` and returns the file of the artifact of target
/// `target` (a cdylib's .so or a binary).
fn build(args: &[&str], target: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .arg("build")
        .arg("--quiet")
        .args(args)
        .arg("--message-format=json")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(out.status.success(), "cargo build {args:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target)
        .find_map(|m| {
            m["executable"].as_str().map(PathBuf::from).or_else(|| {
                m["filenames"]
                    .as_array()?
                    .iter()
                    .filter_map(|f| f.as_str())
                    .find(|f| f.ends_with(".so"))
                    .map(PathBuf::from)
            })
        })
        .unwrap_or_else(|| panic!("cargo build {args:?} reported no artifact for {target}"))
}

/// A running `nbdkit -f` serving the plugin on a Unix socket in its own
/// temporary directory. Killed and reaped on drop.
pub struct Server {
    child: Child,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts nbdkit with the plugin and `args` (`key=value`s), and waits
    /// until it answers the NBD handshake.
    pub fn start(args: &[&str]) -> Server {
        Self::try_start(args).unwrap_or_else(|output| {
            panic!(
                "nbdkit {args:?} did not start: {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// Like [`Server::start`], but returns nbdkit's output when it exits
    /// instead of serving.
    pub fn try_start(args: &[&str]) -> Result<Server, Output> {
        Self::try_start_with(&[], args)
    }

    /// Like [`Server::start`], with nbdkit's own `flags` (e.g. `-v`, which
    /// shows the plugin's info lines on stderr).
    pub fn start_with(flags: &[&str], args: &[&str]) -> Server {
        Self::try_start_with(flags, args).unwrap_or_else(|output| {
            panic!(
                "nbdkit {flags:?} {args:?} did not start: {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    fn try_start_with(flags: &[&str], args: &[&str]) -> Result<Server, Output> {
        super::init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let mut command = Command::new("nbdkit");
        command
            .args(["-f", "--exit-with-parent"])
            .args(flags)
            .arg("-U")
            .arg(&socket)
            .arg(plugin_path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // A file, not a pipe: nothing reads it while the server runs,
            // and a full pipe would stop a chatty (`-v`) nbdkit.
            .stderr(std::fs::File::create(dir.path().join("nbdkit.log")).expect("log file"))
            // Mesa's loader warns without it.
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("VRAMSWAP_STATUS_FILE", dir.path().join("server.json"));
        if let Ok(device) = std::env::var("VRAMSWAP_TEST_DEVICE") {
            if !args.iter().any(|a| a.starts_with("device=")) {
                command.arg(format!("device={device}"));
            }
        }
        let mut child = command.spawn().expect("spawn nbdkit (is it installed?)");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(_status) = child.try_wait().expect("wait for nbdkit") {
                let mut output = child.wait_with_output().expect("nbdkit output");
                output.stderr = std::fs::read(dir.path().join("nbdkit.log")).expect("nbdkit log");
                return Err(output);
            }
            if handshake(&socket) {
                return Ok(Server { child, dir });
            }
            assert!(Instant::now() < deadline, "nbdkit did not answer in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// The NBD URI clients connect to.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket().display())
    }

    /// What the plugin reports in its status file, once `ready` accepts it
    /// (the file may be up to half a second behind); panics after 5 s.
    pub fn status_when(&self, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text =
                std::fs::read_to_string(self.dir.path().join("server.json")).expect("status file");
            let status: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
            if ready(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "status never became as expected: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Stops the server and returns what it printed on stderr.
    pub fn stop(mut self) -> String {
        self.kill();
        std::fs::read_to_string(self.dir.path().join("nbdkit.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True once the server sends the NBD greeting (after `after_fork` opened
/// the GPU and nbdkit started accepting).
fn handshake(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

/// Runs a client program; panics with its output unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e} (is it installed?)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{text}",
        output.status
    );
    text
}

/// Runs a Python snippet in `nbdsh` connected to `uri` (the handle is `h`).
/// Debian's libnbd bindings belong to Debian's Python, which a `python3`
/// earlier on PATH (pyenv, venv) lacks.
pub fn nbdsh(uri: &str, code: &str) -> String {
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("nbdsh")
        .args(["-u", uri, "-c", code])
        .env("PATH", path)
        .output()
        .expect("run nbdsh (is python3-libnbd installed?)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "nbdsh failed: {}\n{code}\n{text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    text
}
