//! Starting the real nbdkit with the vramswap plugin, and running real NBD
//! clients against it.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
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

/// A running nbdkit serving the plugin on a Unix socket in its own
/// temporary directory: `nbdkit -f`, or daemonized as nbdkit is usually
/// run. Stopped (and reaped, when it is our child) on drop.
pub struct Server {
    process: Process,
    dir: tempfile::TempDir,
}

enum Process {
    /// `nbdkit -f --exit-with-parent`, our child.
    Foreground(Child),
    /// A server nbdkit forked into the background, by its pidfile.
    Daemon(u32),
}

/// What a daemonized nbdkit left when it did not serve.
pub struct Refusal {
    /// The exit status of the nbdkit that was run: what a unit or a
    /// script sees.
    pub status: ExitStatus,
    /// What that nbdkit printed on stderr.
    pub stderr: String,
    /// What the plugin wrote to `VRAMSWAP_LOG_FILE`.
    pub log_file: String,
    /// Whether the Unix socket was left on disk.
    pub socket_left: bool,
    /// Processes that still run with the socket's path on their command
    /// line (servers, or children of nbdkit); killed after they are noted.
    pub processes_left: Vec<u32>,
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
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = command(dir.path(), &["-f", "--exit-with-parent"], flags, args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn nbdkit (is it installed?)");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(_status) = child.try_wait().expect("wait for nbdkit") {
                let mut output = child.wait_with_output().expect("nbdkit output");
                output.stderr = std::fs::read(dir.path().join("nbdkit.log")).expect("nbdkit log");
                return Err(output);
            }
            if handshake(&dir.path().join("nbd.sock")) {
                let process = Process::Foreground(child);
                return Ok(Server { process, dir });
            }
            assert!(Instant::now() < deadline, "nbdkit did not answer in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs nbdkit daemonized (no `-f`, with `--pidfile`), as its man page
    /// and a hand-written unit run it. `Ok` once the server it forked
    /// answers the handshake; otherwise what it left behind, having
    /// killed any process that was left.
    pub fn daemonize(args: &[&str]) -> Result<Server, Refusal> {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("nbdkit.pid");
        let status = command(
            dir.path(),
            &["--pidfile", pidfile.to_str().expect("pidfile path")],
            &[],
            args,
        )
        .stdout(Stdio::null())
        .status()
        .expect("run nbdkit (is it installed?)");
        let deadline = Instant::now() + Duration::from_secs(60);
        while status.success() {
            // The server writes the pidfile after the fork: it may not be
            // there yet when the first process has exited.
            match read_pid(&pidfile) {
                Some(pid) if !alive(pid) => break,
                Some(pid) if handshake(&dir.path().join("nbd.sock")) => {
                    let process = Process::Daemon(pid);
                    return Ok(Server { process, dir });
                }
                _ => {}
            }
            assert!(Instant::now() < deadline, "nbdkit did not answer in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let processes_left = processes_naming(dir.path());
        for &pid in &processes_left {
            stop(pid);
        }
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        Err(Refusal {
            status,
            stderr: read("nbdkit.log"),
            log_file: read("vramswap.log"),
            socket_left: dir.path().join("nbd.sock").exists(),
            processes_left,
        })
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
        match &self.process {
            Process::Foreground(child) => child.id(),
            Process::Daemon(pid) => *pid,
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.process {
            Process::Foreground(child) => child.try_wait().expect("wait").is_none(),
            Process::Daemon(pid) => alive(*pid),
        }
    }

    /// Stops the server and returns what it printed on stderr.
    pub fn stop(mut self) -> String {
        self.kill();
        std::fs::read_to_string(self.dir.path().join("nbdkit.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        match &mut self.process {
            Process::Foreground(child) => {
                signal(child.id(), "TERM");
                let deadline = Instant::now() + Duration::from_secs(10);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            Process::Daemon(pid) => stop(*pid),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nbdkit with the plugin, `args` and the test environment: a Unix socket,
/// stderr, a status file and a log file in `dir`.
fn command(dir: &Path, mode: &[&str], flags: &[&str], args: &[&str]) -> Command {
    super::init_logging();
    let mut command = Command::new("nbdkit");
    command
        .args(mode)
        .args(flags)
        .arg("-U")
        .arg(dir.join("nbd.sock"))
        .arg(plugin_path())
        .args(args)
        .stdin(Stdio::null())
        // A file, not a pipe: nothing reads it while the server runs,
        // and a full pipe would stop a chatty (`-v`) nbdkit.
        .stderr(std::fs::File::create(dir.join("nbdkit.log")).expect("log file"))
        // Mesa's loader warns without it.
        .env("XDG_RUNTIME_DIR", dir)
        .env("VRAMSWAP_STATUS_FILE", dir.join("server.json"))
        .env("VRAMSWAP_LOG_FILE", dir.join("vramswap.log"));
    if let Ok(device) = std::env::var("VRAMSWAP_TEST_DEVICE") {
        if !args.iter().any(|a| a.starts_with("device=")) {
            command.arg(format!("device={device}"));
        }
    }
    command
}

fn read_pid(pidfile: &Path) -> Option<u32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Whether `pid` runs: a zombie has exited, though `kill -0` still finds
/// it until whoever inherited it reaps it.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Running processes whose command line names something under `dir`.
fn processes_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
        })
        .filter(|&pid| alive(pid))
        .collect()
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Stops a process that is not our child: TERM, then KILL after 10 s.
fn stop(pid: u32) {
    signal(pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        signal(pid, "KILL");
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
