//! Everything the CLI does to the machine goes through [`System`]: running
//! programs, signals, files. The real one acts; the recording fake in the
//! unit tests stands in for process execution only, so the start plan and
//! its rollback can be checked step by step without root or `/dev/nbd`.
//!
//! Files are read and written under a root directory (`/` for real), so
//! tests run against fixture trees: a fake `/proc/swaps`, `/sys/block`,
//! `/run/vramswap`.

use std::fmt;
use std::io::{self, IsTerminal};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A program to run, with its arguments and extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run it in a session of its own (`setsid`): see [`Cmd::new_session`].
    pub new_session: bool,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            new_session: false,
        }
    }

    /// Runs the program in a new session and process group, away from the
    /// caller's terminal: signals sent to the caller's process group (^C
    /// in the script that ran `vramswap start`, `timeout`, `kill 0`) must
    /// not reach a server that holds swapped-out pages. nbdkit daemonizes
    /// without calling setsid itself.
    pub fn new_session(mut self) -> Self {
        self.new_session = true;
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

impl fmt::Display for Cmd {
    /// As a shell would read it, for plans and error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let quote = |s: &str| {
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c))
            {
                s.to_string()
            } else {
                format!("'{}'", s.replace('\'', "'\\''"))
            }
        };
        for (k, v) in &self.env {
            write!(f, "{k}={} ", quote(v))?;
        }
        if self.new_session {
            write!(f, "setsid ")?;
        }
        write!(f, "{}", quote(&self.program))?;
        for a in &self.args {
            write!(f, " {}", quote(a))?;
        }
        Ok(())
    }
}

/// How a program ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The most useful line of what the program said about failing.
    pub fn reason(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let line = lines
            .iter()
            .rev()
            .find(|l| l.to_lowercase().contains("error"))
            .or(lines.last())
            .copied();
        match (line, self.code) {
            (Some(line), _) => line.to_string(),
            (None, Some(code)) => format!("exit status {code}"),
            (None, None) => "killed by a signal".into(),
        }
    }
}

/// The machine, as far as the CLI touches it.
pub trait System {
    /// Runs a program to completion. `Ok` whatever its exit status; `Err`
    /// only when it could not be started.
    fn run(&mut self, cmd: &Cmd) -> io::Result<Output>;

    /// Like `run`, calling `tick` about every `every` while it runs
    /// (progress for slow commands such as swapoff).
    fn run_watching(
        &mut self,
        cmd: &Cmd,
        every: Duration,
        tick: &mut dyn FnMut(),
    ) -> io::Result<Output>;

    /// Starts a program in the background and returns its pid without
    /// waiting for it. Its stderr goes where ours does, or when ours is a
    /// terminal (which will not be there for long), to the end of `log`.
    fn spawn(&mut self, cmd: &Cmd, log: &Path) -> io::Result<u32>;

    /// Discards `len` bytes at `offset` of the NBD export on `socket`.
    fn discard(&mut self, socket: &Path, offset: u64, len: u64) -> io::Result<()>;

    /// Whether a program is on PATH (or is an executable path).
    fn has_program(&self, program: &str) -> bool;

    fn signal(&mut self, pid: u32, signal: i32) -> io::Result<()>;
    fn alive(&self, pid: u32) -> bool;
    /// True once a server on this Unix socket sends the NBD greeting.
    fn answers_nbd(&self, socket: &Path) -> bool;
    fn sleep(&mut self, duration: Duration);
    fn is_root(&self) -> bool;

    /// Reads `len` bytes at each `(cpu, offset)` of `readers` from a block
    /// device, bypassing the page cache (`O_DIRECT`), all at once: one
    /// thread per reader, pinned to its CPU (which picks the device's
    /// hardware queue, and so the NBD connection, the read goes out on).
    /// Returns when every read has; fails if any did.
    fn read_direct(&mut self, device: &Path, readers: &[(u32, u64)], len: usize) -> io::Result<()>;

    /// The root that absolute paths of the file methods are under.
    fn root(&self) -> &Path;

    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(under(self.root(), path))
    }
    fn exists(&self, path: &Path) -> bool {
        under(self.root(), path).exists()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(under(self.root(), dir))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        Ok(names)
    }
    fn create_dir(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        let real = under(self.root(), path);
        if let Some(parent) = real.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::create_dir(&real)?;
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode))
    }
    fn write(&mut self, path: &Path, contents: &str, mode: u32) -> io::Result<()> {
        let real = under(self.root(), path);
        let temp = real.with_extension("tmp");
        std::fs::write(&temp, contents)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(temp, real)
    }
    /// Writes to a file that must exist, in place: a sysfs attribute.
    fn write_attribute(&mut self, path: &Path, value: &str) -> io::Result<()> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .open(under(self.root(), path))?
            .write_all(value.as_bytes())
    }
    fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()> {
        std::fs::set_permissions(
            under(self.root(), path),
            std::fs::Permissions::from_mode(mode),
        )
    }
    fn remove_dir_all(&mut self, path: &Path) -> io::Result<()> {
        match std::fs::remove_dir_all(under(self.root(), path)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    fn remove_file(&mut self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(under(self.root(), path)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// `path` (absolute) inside `root`.
pub fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The machine itself.
pub struct RealSystem {
    root: PathBuf,
}

impl RealSystem {
    pub fn new() -> Self {
        RealSystem {
            root: PathBuf::from("/"),
        }
    }
}

/// Where a program is: on PATH, else in the sbin directories a non-login
/// root shell may not have on its PATH.
fn resolve(program: &str) -> Option<PathBuf> {
    let path = Path::new(program);
    if path.is_absolute() {
        return is_executable(path).then(|| path.to_path_buf());
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    let found = dirs
        .iter()
        .map(PathBuf::as_path)
        .chain([Path::new("/usr/sbin"), Path::new("/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate));
    found
}

fn command(cmd: &Cmd) -> Command {
    let program = resolve(&cmd.program).unwrap_or_else(|| PathBuf::from(&cmd.program));
    let mut command = Command::new(program);
    command.args(&cmd.args).stdin(Stdio::null());
    for (k, v) in &cmd.env {
        command.env(k, v);
    }
    if cmd.new_session {
        // SAFETY: runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed; setsid(2) is one, and it
        // touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    command
}

fn output(out: std::process::Output) -> Output {
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl System for RealSystem {
    fn run(&mut self, cmd: &Cmd) -> io::Result<Output> {
        tracing::debug!("running: {cmd}");
        command(cmd).output().map(output)
    }

    fn spawn(&mut self, cmd: &Cmd, log: &Path) -> io::Result<u32> {
        tracing::debug!("starting in the background: {cmd}");
        let mut command = command(cmd);
        command.stdout(Stdio::null());
        if std::io::stderr().is_terminal() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(under(&self.root, log))?;
            command.stderr(file);
        }
        // Not waited for: it outlives this process, and init reaps it.
        Ok(command.spawn()?.id())
    }

    fn discard(&mut self, socket: &Path, offset: u64, len: u64) -> io::Result<()> {
        crate::trim::trim(&under(&self.root, socket), offset, len)
    }

    fn run_watching(
        &mut self,
        cmd: &Cmd,
        every: Duration,
        tick: &mut dyn FnMut(),
    ) -> io::Result<Output> {
        tracing::debug!("running: {cmd}");
        let mut child = command(cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        while child.try_wait()?.is_none() {
            tick();
            std::thread::sleep(every);
        }
        child.wait_with_output().map(output)
    }

    fn has_program(&self, program: &str) -> bool {
        resolve(program).is_some()
    }

    fn signal(&mut self, pid: u32, signal: i32) -> io::Result<()> {
        // SAFETY: kill(2) with a plain pid and signal number.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn alive(&self, pid: u32) -> bool {
        // Zombies (exited, not yet reaped) count as gone.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    fn answers_nbd(&self, socket: &Path) -> bool {
        use std::io::Read;
        let Ok(mut stream) = UnixStream::connect(under(&self.root, socket)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut magic = [0u8; 8];
        stream.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }

    fn is_root(&self) -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    fn root(&self) -> &Path {
        &self.root
    }

    fn read_direct(&mut self, device: &Path, readers: &[(u32, u64)], len: usize) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(under(&self.root, device))?;
        std::thread::scope(|scope| {
            let mut threads = Vec::with_capacity(readers.len());
            for &(cpu, offset) in readers {
                let file = &file;
                threads.push(
                    std::thread::Builder::new()
                        .stack_size(256 << 10)
                        .spawn_scoped(scope, move || read_on_cpu(file, cpu, offset, len))?,
                );
            }
            threads.into_iter().try_for_each(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a reader thread panicked")))
            })
        })
    }
}

/// One `O_DIRECT` read on `cpu`, into a 4 KiB-aligned buffer.
fn read_on_cpu(file: &std::fs::File, cpu: u32, offset: u64, len: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes one
    // bit inside it (checked below against its size).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu as usize >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::other(format!("CPU {cpu} is out of range")));
    }
    // SAFETY: `cpu` is inside the set (checked above).
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: pid 0 is this thread; the set is valid for its size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("cannot run a reader on CPU {cpu}: {err}"),
        ));
    }
    const ALIGN: usize = 4096;
    let mut memory = vec![0u8; len + ALIGN];
    let skip = memory.as_ptr().align_offset(ALIGN);
    file.read_exact_at(&mut memory[skip..skip + len], offset)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
pub mod fake {
    //! A [`System`] that records what would run and answers from a script;
    //! files live in a temporary fixture root.

    use super::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Run(String),
        Signal(u32, i32),
        CreateDir(PathBuf),
        Write(PathBuf),
        RemoveDir(PathBuf),
        SetMode(PathBuf, u32),
        /// `read_direct`: the device, the number of readers, the read size
        /// and the CPUs used.
        ReadDirect(PathBuf, usize, usize, Vec<u32>),
        /// `spawn`: the command line; the process gets pid 7000.
        Spawn(String),
        /// `discard`: the socket, offset and length.
        Discard(PathBuf, u64, u64),
    }

    pub struct FakeSystem {
        pub root: tempfile::TempDir,
        pub calls: Vec<Call>,
        /// Program (or `program arg`) prefix → answer; first match wins.
        pub answers: Vec<(String, Output)>,
        pub missing_programs: Vec<String>,
        pub alive: HashMap<u32, bool>,
        pub answers_nbd: bool,
        pub root_user: bool,
        /// Calls whose rendering starts with this fail (io error).
        pub fail_on: Option<String>,
        /// Running a program that starts with the prefix writes a file:
        /// (prefix, path, contents), e.g. nbdkit writing its pidfile.
        pub on_run: Vec<(String, String, String)>,
        /// `read_direct` writes this as the `server.json` of every
        /// instance directory: the plugin reporting its warm connections.
        pub warm_status: Option<String>,
    }

    impl FakeSystem {
        pub fn new() -> Self {
            FakeSystem {
                root: tempfile::tempdir().expect("tempdir"),
                calls: Vec::new(),
                answers: Vec::new(),
                missing_programs: Vec::new(),
                alive: HashMap::new(),
                answers_nbd: true,
                root_user: true,
                fail_on: None,
                on_run: Vec::new(),
                warm_status: Some(r#"{"failure":null,"warm_connections":64}"#.into()),
            }
        }

        /// A machine where `start` can succeed: the plugin installed,
        /// nbdkit 1.32, `nbd_devices` free NBD devices, and an nbdkit that
        /// "starts" (writes its pidfile, pid 4000 + i, alive) for each of
        /// `instances`.
        pub fn ready_to_start(nbd_devices: u32, instances: &[&str]) -> Self {
            let mut system = FakeSystem::new();
            system.fixture("/usr/lib/nbdkit/plugins/nbdkit-vramswap-plugin.so", "");
            for n in 0..nbd_devices {
                system.free_nbd(n);
            }
            system.fixture("/run/vramswap/.keep", "");
            system.answer("nbdkit --version", 0, "nbdkit 1.32.5\n", "");
            for (i, name) in instances.iter().enumerate() {
                let pid = 4000 + i as u32;
                system.on_run.push((
                    format!("nbdkit --unix /run/vramswap/{name}/"),
                    format!("/run/vramswap/{name}/nbdkit.pid"),
                    format!("{pid}\n"),
                ));
                system.alive.insert(pid, true);
            }
            system
        }

        /// A free `/dev/nbdN` with one hardware queue.
        pub fn free_nbd(&self, n: u32) {
            self.fixture(&format!("/sys/block/nbd{n}/size"), "0\n");
            self.fixture(&format!("/sys/block/nbd{n}/queue/max_sectors_kb"), "1280\n");
            self.fixture(&format!("/sys/block/nbd{n}/mq/0/cpu_list"), "0-3\n");
        }

        /// Writes a fixture file (absolute path inside the fake root).
        pub fn fixture(&self, path: &str, contents: &str) {
            let real = under(self.root.path(), Path::new(path));
            std::fs::create_dir_all(real.parent().expect("parent")).expect("fixture dir");
            std::fs::write(real, contents).expect("fixture");
        }

        pub fn answer(&mut self, prefix: &str, code: i32, stdout: &str, stderr: &str) {
            self.answers.push((
                prefix.to_string(),
                Output {
                    code: Some(code),
                    stdout: stdout.into(),
                    stderr: stderr.into(),
                },
            ));
        }

        /// What ran, as shell lines.
        pub fn ran(&self) -> Vec<String> {
            self.calls
                .iter()
                .filter_map(|c| match c {
                    Call::Run(line) => Some(line.clone()),
                    _ => None,
                })
                .collect()
        }

        fn check(&self, rendered: &str) -> io::Result<()> {
            match &self.fail_on {
                Some(prefix) if rendered.starts_with(prefix.as_str()) => {
                    Err(io::Error::other(format!("injected failure: {rendered}")))
                }
                _ => Ok(()),
            }
        }
    }

    impl System for FakeSystem {
        fn run(&mut self, cmd: &Cmd) -> io::Result<Output> {
            let line = cmd.to_string();
            self.calls.push(Call::Run(line.clone()));
            let bare = format!("{} {}", cmd.program, cmd.args.join(" "));
            self.check(bare.trim())?;
            for (prefix, path, contents) in &self.on_run {
                if bare.starts_with(prefix.as_str()) {
                    self.fixture(path, contents);
                }
            }
            Ok(self
                .answers
                .iter()
                .find(|(prefix, _)| bare.starts_with(prefix.as_str()))
                .map(|(_, out)| out.clone())
                .unwrap_or(Output {
                    code: Some(0),
                    ..Default::default()
                }))
        }

        fn run_watching(
            &mut self,
            cmd: &Cmd,
            _every: Duration,
            tick: &mut dyn FnMut(),
        ) -> io::Result<Output> {
            tick();
            self.run(cmd)
        }

        fn spawn(&mut self, cmd: &Cmd, _log: &Path) -> io::Result<u32> {
            let line = cmd.to_string();
            self.calls.push(Call::Spawn(line.clone()));
            self.check(&format!("spawn {} {}", cmd.program, cmd.args.join(" ")))?;
            self.alive.insert(7000, true);
            Ok(7000)
        }

        fn discard(&mut self, socket: &Path, offset: u64, len: u64) -> io::Result<()> {
            self.calls
                .push(Call::Discard(socket.to_path_buf(), offset, len));
            self.check(&format!("discard {offset} {len}"))
        }

        fn has_program(&self, program: &str) -> bool {
            !self.missing_programs.iter().any(|p| p == program)
        }

        fn signal(&mut self, pid: u32, signal: i32) -> io::Result<()> {
            self.calls.push(Call::Signal(pid, signal));
            self.check(&format!("signal {pid} {signal}"))?;
            if signal == libc::SIGTERM || signal == libc::SIGKILL {
                self.alive.insert(pid, false);
            }
            Ok(())
        }

        fn alive(&self, pid: u32) -> bool {
            self.alive.get(&pid).copied().unwrap_or(false)
        }

        fn answers_nbd(&self, _socket: &Path) -> bool {
            self.answers_nbd
        }

        fn sleep(&mut self, _duration: Duration) {}

        fn read_direct(
            &mut self,
            device: &Path,
            readers: &[(u32, u64)],
            len: usize,
        ) -> io::Result<()> {
            let mut cpus: Vec<u32> = readers.iter().map(|r| r.0).collect();
            cpus.dedup();
            self.calls.push(Call::ReadDirect(
                device.to_path_buf(),
                readers.len(),
                len,
                cpus,
            ));
            self.check(&format!("read {}", device.display()))?;
            if let Some(status) = &self.warm_status {
                for name in self.list(Path::new("/run/vramswap")).unwrap_or_default() {
                    let dir = format!("/run/vramswap/{name}");
                    if under(self.root.path(), Path::new(&dir)).is_dir() {
                        self.fixture(&format!("{dir}/server.json"), status);
                    }
                }
            }
            Ok(())
        }

        fn is_root(&self) -> bool {
            self.root_user
        }

        fn root(&self) -> &Path {
            self.root.path()
        }

        fn create_dir(&mut self, path: &Path, mode: u32) -> io::Result<()> {
            self.calls.push(Call::CreateDir(path.to_path_buf()));
            self.check(&format!("mkdir {}", path.display()))?;
            let real = under(self.root.path(), path);
            std::fs::create_dir_all(real.parent().expect("parent"))?;
            std::fs::create_dir(&real)?;
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode))
        }

        fn write(&mut self, path: &Path, contents: &str, mode: u32) -> io::Result<()> {
            self.calls.push(Call::Write(path.to_path_buf()));
            self.check(&format!("write {}", path.display()))?;
            let real = under(self.root.path(), path);
            std::fs::write(&real, contents)?;
            std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode))
        }

        fn write_attribute(&mut self, path: &Path, value: &str) -> io::Result<()> {
            self.calls.push(Call::Write(path.to_path_buf()));
            self.check(&format!("write {}", path.display()))?;
            let real = under(self.root.path(), path);
            if !real.exists() {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            std::fs::write(real, value)
        }

        fn set_mode(&mut self, path: &Path, mode: u32) -> io::Result<()> {
            self.calls.push(Call::SetMode(path.to_path_buf(), mode));
            Ok(())
        }

        fn remove_dir_all(&mut self, path: &Path) -> io::Result<()> {
            self.calls.push(Call::RemoveDir(path.to_path_buf()));
            match std::fs::remove_dir_all(under(self.root.path(), path)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_render_as_shell_lines() {
        let cmd = Cmd::new("nbdkit")
            .args(["-U", "/run/vramswap/a b/nbd.sock", "size=8G"])
            .env("VRAMSWAP_LOG_FILE", "/run/x.log");
        assert_eq!(
            cmd.to_string(),
            "VRAMSWAP_LOG_FILE=/run/x.log nbdkit -U '/run/vramswap/a b/nbd.sock' size=8G"
        );
        assert_eq!(
            Cmd::new("nbdkit").arg("-U").new_session().to_string(),
            "setsid nbdkit -U"
        );
    }

    #[test]
    fn the_reason_is_the_last_error_line() {
        let out = Output {
            code: Some(1),
            stdout: String::new(),
            stderr: "nbdkit: warning: x\nnbdkit: error: size=9G: too big\n\n".into(),
        };
        assert_eq!(out.reason(), "nbdkit: error: size=9G: too big");
        assert_eq!(
            Output {
                code: Some(3),
                ..Default::default()
            }
            .reason(),
            "exit status 3"
        );
    }
}

/// Lets a closed pipe end this process as it ends other command-line
/// tools (`vramswap status --json | head` stops quietly), instead of Rust's
/// default of ignoring SIGPIPE and panicking at the next write.
pub fn die_on_closed_pipe() {
    // SAFETY: restoring a signal's default disposition has no
    // preconditions; no handler of ours is replaced.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
