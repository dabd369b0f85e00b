//! Just enough of an NBD client to discard a range of an export on a Unix
//! socket, so that a plugin with lazy allocation gives those VRAM chunks
//! back to the GPU (see doc/proto.md in NetworkBlockDevice/nbd).

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vramswap::ByteSize;

/// NBD_OPT_GO (7) with 6 bytes of data: the name's length 0 (the default
/// export ""), no info requests.
const OPT_GO_REQUEST: &[u8] = b"IHAVEOPT\0\0\0\x07\0\0\0\x06\0\0\0\0\0\0";
// Numbers read off the wire are u64s from `be`; those written keep their width.
const OPT_GO: u64 = 7;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u64 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u64 = 1 << 0;
const FLAG_NO_ZEROES: u64 = 1 << 1;
const REP_ACK: u64 = 1;
const REP_INFO: u64 = 3;
const REP_ERROR: u64 = 1 << 31;
const FLAG_SEND_TRIM: u64 = 1 << 5;
const CMD_DISC: u16 = 2;
const CMD_TRIM: u16 = 4;
/// The errors NBD defines; their values are Linux's.
const ERRNO_NAMES: [(u64, &str); 8] = [
    (1, "EPERM"),
    (5, "EIO"),
    (12, "ENOMEM"),
    (22, "EINVAL"),
    (28, "ENOSPC"),
    (75, "EOVERFLOW"),
    (95, "ENOTSUP"),
    (108, "ESHUTDOWN"),
];
/// Requests carry a u32 length; 1 GiB pieces also keep each one short.
const MAX_PIECE: u64 = 1 << 30;
/// Option replies are small (their strings at most 4 KiB); a longer one
/// means the stream is out of step.
const MAX_OPTION_REPLY: u64 = 64 << 10;
/// A stuck server must not hang the watcher forever.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Discards `len` bytes at `offset` of the export served on `socket`
/// (NBD_CMD_TRIM), in pieces of at most 1 GiB, waiting for each reply.
pub fn trim(socket: &Path, offset: u64, len: u64) -> io::Result<()> {
    trim_on(socket, offset, len).map_err(|e| {
        let (kind, detail) = match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                let detail = format!("no answer from the server in {} s", TIMEOUT.as_secs());
                (ErrorKind::TimedOut, detail)
            }
            kind => (kind, e.to_string()),
        };
        let (len, offset, socket) = (ByteSize(len), ByteSize(offset), socket.display());
        let message = format!("nbd trim of {len} at {offset} on {socket}: {detail}");
        io::Error::new(kind, message)
    })
}

fn trim_on(socket: &Path, offset: u64, len: u64) -> io::Result<()> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let (size, flags) = negotiate(&mut stream)?;
    if flags & FLAG_SEND_TRIM == 0 {
        let message = "the export does not support trim";
        return Err(io::Error::new(ErrorKind::Unsupported, message));
    }
    let Some(end) = offset.checked_add(len).filter(|&end| end <= size) else {
        let size = ByteSize(size);
        let message = format!("the range ends past the end of the {size} export");
        return Err(io::Error::new(ErrorKind::InvalidInput, message));
    };
    let (mut at, mut cookie) = (offset, 0);
    while at < end {
        let piece = (end - at).min(MAX_PIECE);
        stream.write_all(&request(CMD_TRIM, cookie, at, piece as u32))?;
        let reply: [u8; 16] = read(&mut stream)?;
        if be(&reply[..4]) != SIMPLE_REPLY_MAGIC || be(&reply[8..]) != cookie {
            return Err(invalid("unexpected reply to a trim"));
        }
        let error = be(&reply[4..8]);
        if error != 0 {
            let known = ERRNO_NAMES.iter().find(|e| e.0 == error);
            let name = known.map_or("unknown", |e| e.1);
            let message = format!("server error {error} ({name})");
            let kind = io::Error::from_raw_os_error(error as i32).kind();
            return Err(io::Error::new(kind, message));
        }
        (at, cookie) = (at + piece, cookie + 1);
    }
    stream.write_all(&request(CMD_DISC, cookie, 0, 0))
}

/// Fixed newstyle handshake and NBD_OPT_GO for the default export; returns
/// its size and transmission flags.
fn negotiate(stream: &mut UnixStream) -> io::Result<(u64, u64)> {
    let hello: [u8; 18] = read(stream)?;
    let server_flags = be(&hello[16..]);
    if hello[..16] != *b"NBDMAGICIHAVEOPT" || server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(invalid("not an NBD server with fixed newstyle negotiation"));
    }
    let client_flags = (FLAG_FIXED_NEWSTYLE | server_flags & FLAG_NO_ZEROES) as u32;
    stream.write_all(&[&client_flags.to_be_bytes(), OPT_GO_REQUEST].concat())?;
    let mut export = None;
    loop {
        let header: [u8; 20] = read(stream)?;
        let (magic, option) = (be(&header[..8]), be(&header[8..12]));
        let (reply, length) = (be(&header[12..16]), be(&header[16..]));
        if magic != OPTION_REPLY_MAGIC || option != OPT_GO || length > MAX_OPTION_REPLY {
            return Err(invalid("unexpected reply to NBD_OPT_GO"));
        }
        let mut data = vec![0; length as usize];
        stream.read_exact(&mut data)?;
        match reply {
            REP_ACK => return export.ok_or_else(|| invalid("the server sent no export size")),
            // NBD_INFO_EXPORT (type 0): u64 size, u16 transmission flags.
            REP_INFO if data.len() == 12 && data[..2] == [0, 0] => {
                export = Some((be(&data[2..10]), be(&data[10..])));
            }
            REP_INFO => {}
            _ if reply & REP_ERROR != 0 => {
                let text = String::from_utf8_lossy(&data);
                let message = format!("the server refused the export (reply {reply:#x}): {text}");
                return Err(io::Error::other(message.trim_end_matches([':', ' '])));
            }
            _ => return Err(invalid("unexpected reply to NBD_OPT_GO")),
        }
    }
}

/// A request with no flags; `cookie` comes back in its reply.
fn request(kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let parts: [&[u8]; 6] = [
        &REQUEST_MAGIC.to_be_bytes(),
        &[0, 0],
        &kind.to_be_bytes(),
        &cookie.to_be_bytes(),
        &offset.to_be_bytes(),
        &length.to_be_bytes(),
    ];
    parts.concat()
}

fn read<const N: usize>(from: &mut impl Read) -> io::Result<[u8; N]> {
    let mut bytes = [0; N];
    from.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// The big-endian (as all of NBD) number in `bytes`.
fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |n, &b| n << 8 | u64::from(b))
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::Instant;
    use tempfile::TempDir;

    /// nbdkit's memory plugin (which zeroes trimmed ranges) behind its log
    /// filter, in the background: Debian's `nbdkit -f` sets PR_SET_PDEATHSIG,
    /// which would kill it with the test thread that started it.
    struct Nbdkit {
        dir: TempDir,
        pid: u32,
    }

    impl Nbdkit {
        fn start(size: &str) -> Nbdkit {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = |name: &str| dir.path().join(name).display().to_string();
            let (socket, pidfile) = (path("sock"), path("pid"));
            let (size, log) = (format!("size={size}"), format!("logfile={}", path("log")));
            let status = Command::new("nbdkit")
                .args(["--unix", &socket, "--pidfile", &pidfile])
                .args(["--filter=log", "memory", &size, &log])
                .status()
                .expect("run nbdkit (the test machine must have it)");
            assert!(status.success());
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let pid = fs::read_to_string(&pidfile)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                if let Some(pid) = pid.filter(|_| Path::new(&socket).exists()) {
                    return Nbdkit { dir, pid };
                }
                assert!(Instant::now() < deadline, "nbdkit did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        fn socket(&self) -> PathBuf {
            self.dir.path().join("sock")
        }

        /// The trims nbdkit logged, as `offset=0x… count=0x…`.
        fn trims(&self) -> Vec<String> {
            let log = fs::read_to_string(self.dir.path().join("log")).expect("nbdkit's log");
            // `… Trim id=2 offset=0x400000 count=0x40000000 fua=0 …`
            let trims = log
                .lines()
                .filter_map(|line| line.split_once(" Trim id=")?.1.split_once(' '));
            trims
                .filter_map(|(_, range)| Some(range.split_once(" fua")?.0.to_owned()))
                .collect()
        }

        /// Runs Python in `nbdsh` against the export; its stdout. Debian's
        /// libnbd bindings belong to Debian's Python, not a pyenv one on PATH.
        fn nbdsh(&self, code: &str) -> Vec<u8> {
            let uri = format!("nbd+unix:///?socket={}", self.socket().display());
            let inherited = std::env::var("PATH").unwrap_or_default();
            let output = Command::new("nbdsh")
                .args(["-u", &uri, "-c", code])
                .env("PATH", format!("/usr/bin:/bin:{inherited}"))
                .output()
                .expect("run nbdsh (python3-libnbd)");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "nbdsh: {stderr}");
            output.stdout
        }
    }

    impl Drop for Nbdkit {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.pid.to_string()).status();
        }
    }

    #[test]
    fn trim_zeroes_the_range_in_pieces_and_keeps_its_neighbours() {
        let nbdkit = Nbdkit::start("2G");
        let write = "h.pwrite(b'\\xab' * (12 << 20), 0); h.pwrite(b'\\xab' * (12 << 20), 1 << 30)";
        nbdkit.nbdsh(write);

        trim(&nbdkit.socket(), 4 << 20, (1 << 30) + (4 << 20)).expect("trim");

        let read = "sys.stdout.buffer.write(h.pread(12 << 20, 0) + h.pread(12 << 20, 1 << 30))";
        let data = nbdkit.nbdsh(&format!("import sys; {read}"));
        // [0, 12 MiB) then [1 GiB, 1 GiB + 12 MiB); the trim ended at 1 GiB + 8 MiB.
        let mut expected = vec![0xab; 24 << 20];
        expected[4 << 20..20 << 20].fill(0);
        let first_wrong = data.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!((data.len(), first_wrong), (expected.len(), None));
        let first = "offset=0x400000 count=0x40000000";
        assert_eq!(nbdkit.trims(), [first, "offset=0x40400000 count=0x400000"]);
    }

    #[test]
    fn a_range_past_the_end_is_refused_before_any_request() {
        let nbdkit = Nbdkit::start("64M");
        let socket = nbdkit.socket();
        let error = trim(&socket, 60 << 20, 8 << 20).expect_err("past the end");
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        let end = "the range ends past the end of the 64 MiB export";
        let message = format!("nbd trim of 8 MiB at 60 MiB on {}: {end}", socket.display());
        assert_eq!(error.to_string(), message);
        let error = trim(&socket, u64::MAX, 2).expect_err("overflowing range");
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        assert_eq!(nbdkit.trims(), Vec::<String>::new());
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("missing.sock");
        let error = trim(&socket, 0, 4 << 20).expect_err("no server");
        assert_eq!(error.kind(), ErrorKind::NotFound);
        let why = "No such file or directory (os error 2)";
        let message = format!("nbd trim of 4 MiB at 0 B on {}: {why}", socket.display());
        assert_eq!(error.to_string(), message);
    }
}
