//! The nbdkit plugin under the real nbdkit, driven by real NBD clients
//! (nbdinfo, nbdcopy, qemu-io, fio, nbdsh). The backend is Vulkan — Mesa's
//! lavapipe on machines with no GPU — unless `VRAMSWAP_TEST_PLUGIN_ARGS`
//! says otherwise (e.g. `backend=cuda` on the GPU machine).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nbd::{nbdsh, run, Server};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// `backend=…` and any other keys every test server gets.
fn base_args() -> Vec<String> {
    std::env::var("VRAMSWAP_TEST_PLUGIN_ARGS")
        .unwrap_or_else(|_| "backend=vulkan".into())
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn serve(extra: &[&str]) -> Server {
    let mut args = base_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&refs)
}

fn random_file(dir: &tempfile::TempDir, name: &str, len: u64, seed: u64) -> std::path::PathBuf {
    let mut data = vec![0u8; len as usize];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    path
}

#[test]
fn nbdinfo_sees_the_size_and_capabilities() {
    let server = serve(&["size=96M"]);
    let json: Value = serde_json::from_str(&run("nbdinfo", &["--json", &server.uri()])).unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["export-size"], 96 * MIB);
    for flag in [
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_fua",
        "can_flush",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag}: {export}");
    }
    assert_eq!(export["is_rotational"], false);
    assert_eq!(export["is_read_only"], false);
}

#[test]
fn size_is_the_magic_key_and_is_rounded_down_to_whole_chunks() {
    let server = serve(&["30M"]);
    let json: Value = serde_json::from_str(&run("nbdinfo", &["--json", &server.uri()])).unwrap();
    assert_eq!(json["exports"][0]["export-size"], 28 * MIB);
    let log = server.stop();
    assert!(
        log.contains("not a multiple of 4 MiB"),
        "no rounding warning in: {log}"
    );
}

/// Once as nbdkit is run by hand, once as `vramswap start` runs it (reads
/// by DMA into nbdkit's buffers; no windows, so every read takes that path).
#[test]
fn nbdcopy_round_trips_random_data_over_four_connections() {
    nbdcopy_round_trip(&["size=64M"]);
    nbdcopy_round_trip(&["size=64M", "direct=on", "readahead=0"]);
}

fn nbdcopy_round_trip(args: &[&str]) {
    let server = serve(args);
    let dir = tempfile::tempdir().unwrap();
    let source = random_file(&dir, "in.bin", 40 * MIB + 12345, 7);
    let copied = copy_in_and_back(&server, &dir, &source);
    assert_eq!(copied.len() as u64, 64 * MIB);
}

/// Copies `source` into the export and the whole export back out, each
/// over four connections; checks that the export holds `source` and
/// zeros after it, and returns what came back.
fn copy_in_and_back(server: &Server, dir: &tempfile::TempDir, source: &std::path::Path) -> Vec<u8> {
    let back = dir.path().join("out.bin");
    run(
        "nbdcopy",
        &["--connections=4", source.to_str().unwrap(), &server.uri()],
    );
    run(
        "nbdcopy",
        &["--connections=4", &server.uri(), back.to_str().unwrap()],
    );
    let original = std::fs::read(source).unwrap();
    let copied = std::fs::read(&back).unwrap();
    assert!(
        copied[..original.len()] == original[..],
        "data differs after a round trip"
    );
    assert!(
        copied[original.len()..].iter().all(|b| *b == 0),
        "tail beyond the data is not zero"
    );
    copied
}

/// nbdcopy's reads are streams, served from read-ahead windows (the
/// server counts them at exit), and a write between two such copies is in
/// the second one's bytes.
#[test]
fn sequential_reads_come_from_read_ahead_windows_and_see_every_write() {
    let mut args = base_args();
    args.push("size=64M".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    // `-v` shows the count; nbdkit's own line per request is not wanted.
    let server = Server::start_with(&["-v", "-D", "nbdkit.backend.datapath=0"], &refs);
    let dir = tempfile::tempdir().unwrap();
    let source = random_file(&dir, "in.bin", 64 * MIB, 9);
    let back = dir.path().join("out.bin");
    let copy_out = || {
        run(
            "nbdcopy",
            &["--connections=4", &server.uri(), back.to_str().unwrap()],
        );
        std::fs::read(&back).unwrap()
    };
    run(
        "nbdcopy",
        &["--connections=4", source.to_str().unwrap(), &server.uri()],
    );
    let mut want = std::fs::read(&source).unwrap();
    assert!(copy_out() == want, "data differs after a round trip");
    let at = 10 * MIB as usize + 3;
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x5a {at} 100000"),
            &server.uri(),
        ],
    );
    want[at..at + 100_000].fill(0x5a);
    assert!(copy_out() == want, "the second copy misses the write");
    let log = server.stop();
    let served = log
        .lines()
        .find_map(|l| l.split("read-ahead: ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no read-ahead line in the server's log:\n{log}"));
    assert!(served > 0, "no read came from a window: {log}");
}

#[test]
fn qemu_io_unaligned_writes_and_reads_across_blocks_and_chunks() {
    for mapped in ["mapped=on", "mapped=off"] {
        let server = serve(&["size=16M", mapped]);
        unaligned_writes_read_back(&server);
        // The status file says which write path served.
        server.status_when(|s| s["mapped"] == (mapped == "mapped=on"));
    }
}

fn unaligned_writes_read_back(server: &Server) {
    // Offsets straddle a 64 KiB block and the 4 MiB chunk boundary.
    let commands = [
        "write -P 0x11 1 511",
        "write -P 0x22 65535 2",
        "write -P 0x33 4194000 1000",
        "write -P 0x44 12582911 3",
        "read -P 0x11 1 511",
        "read -P 0x22 65535 2",
        "read -P 0x33 4194000 1000",
        "read -P 0x44 12582911 3",
        "read -P 0 0 1",
        "read -P 0 512 65023",
        "read -P 0 4195000 1000000",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &commands {
        args.extend(["-c", c]);
    }
    let uri = server.uri();
    args.push(&uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    assert_eq!(out.matches("read ").count(), 7, "{out}");
}

/// Once with staged reads, once with `direct=on` (fio's reads of 128K or
/// more register each thread's buffer; nbdkit grows it as sizes rise).
#[test]
fn fio_verifies_crc32c_over_several_jobs_and_connections() {
    fio_verify(&["size=64M"]);
    fio_verify(&["size=64M", "direct=on"]);
}

fn fio_verify(args: &[&str]) {
    let server = serve(args);
    let uri = server.uri();
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--size=16M",
            "--numjobs=4",
            "--offset_increment=16M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would leave a verify state file per job in the cwd.
            "--verify_state_save=0",
            "--group_reporting",
            "--output-format=json",
        ],
    );
    let json: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
        "{job}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 64 * MIB,
        "verify read nothing: {job}"
    );
}

#[test]
fn trimmed_ranges_read_as_zeros_and_show_as_holes() {
    let server = serve(&["size=16M", "allocation=lazy"]);
    let uri = server.uri();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 12M", &uri]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "discard 0 4M",
            "-c",
            "discard 4194304 100000",
            &uri,
        ],
    );
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 4294304",
            "-c",
            "read -P 0x77 4294304 8288608",
            &uri,
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // nbdinfo --map: the first 4 MiB chunk was given back and the partial
    // trim in chunk 1 covered one whole block next to it (one hole), and the
    // never-written last chunk is a hole too.
    let map: Value = serde_json::from_str(&run("nbdinfo", &["--map", "--json", &uri])).unwrap();
    let holes: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["description"].as_str().unwrap().contains("hole"))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        holes,
        vec![(0, 4 * MIB + (64 << 10)), (12 * MIB, 4 * MIB)],
        "{map}"
    );
}

#[test]
fn writes_on_one_connection_are_read_on_another() {
    let server = serve(&["size=8M"]);
    let uri = server.uri();
    nbdsh(&uri, "h.pwrite(b'multi-conn' * 100, 123456)");
    let out = nbdsh(&uri, "print(h.pread(1000, 123456) == b'multi-conn' * 100)");
    assert_eq!(out.trim(), "True");
}

#[test]
fn out_of_range_requests_fail_and_the_server_keeps_serving() {
    let mut server = serve(&["size=8M"]);
    let uri = server.uri();
    // libnbd checks bounds itself unless strict mode is off; turn it off so
    // the bad requests reach the server.
    let out = nbdsh(
        &uri,
        "import errno
h.set_strict_mode(0)
for name, call in [('read', lambda: h.pread(4096, 8 * 1024 * 1024 - 100)),
                   ('write', lambda: h.pwrite(b'x' * 4096, 8 * 1024 * 1024)),
                   ('trim', lambda: h.trim(1 << 20, 8 * 1024 * 1024 - 4096)),
                   ('zero', lambda: h.zero(8192, 2 ** 40))]:
    try:
        call()
        print(name, 'accepted')
    except nbd.Error as e:
        print(name, 'refused', errno.errorcode.get(e.errno, e.errno))
h.pwrite(b'still here', 0)
print(h.pread(10, 0))",
    );
    for op in ["read", "write", "trim", "zero"] {
        assert!(
            out.contains(&format!("{op} refused")),
            "{op} not refused:\n{out}"
        );
    }
    assert!(out.contains("b'still here'"), "{out}");
    assert!(server.is_running());
}

#[test]
fn a_panic_inside_the_plugin_fails_one_request_with_eio_and_nothing_else() {
    let mut server = serve(&["size=8M", "inject-panic-at=1M"]);
    let uri = server.uri();
    let out = nbdsh(
        &uri,
        "import errno
h.pwrite(b'before' * 10, 0)
try:
    h.pread(4096, 1024 * 1024)
    print('no error')
except nbd.Error as e:
    print('error', errno.errorcode.get(e.errno, e.errno))
print(h.pread(60, 0) == b'before' * 10)",
    );
    assert!(out.contains("error EIO"), "{out}");
    assert!(
        out.contains("True"),
        "the server stopped serving after a panic:\n{out}"
    );
    assert!(server.is_running(), "nbdkit died");
    let log = server.stop();
    assert!(log.contains("internal error"), "no log of the panic: {log}");
}

#[test]
fn bad_parameters_exit_non_zero_with_one_line_naming_key_and_value() {
    for (args, needle) in [
        (vec!["colour=blue"], "unknown parameter 'colour'"),
        (vec!["size=lots"], "size=lots: 'lots' is not a size"),
        (vec!["allocation=sometimes"], "allocation=sometimes:"),
        (vec!["backend=opencl"], "backend=opencl: unknown backend"),
        (vec!["size=1G", "reserve=1G"], "exclude each other"),
        (vec!["verify=maybe"], "verify=maybe: expected on or off"),
        (
            vec!["mapped=sometimes"],
            "mapped=sometimes: 'sometimes' is not auto, on or off",
        ),
        (
            vec!["size=0"],
            "size=0: size 0 B is smaller than one 4 MiB chunk",
        ),
        (vec!["size=64P"], "size=64P: size 64 PiB is larger than"),
        (vec!["device=99", "size=8M"], "device=99: no device 99"),
        (
            vec!["device=no-such-gpu", "size=8M"],
            "device=no-such-gpu: no device named 'no-such-gpu'",
        ),
    ] {
        let output = match Server::try_start(&args) {
            Ok(server) => panic!("nbdkit {args:?} started (pid {})", server.pid()),
            Err(output) => output,
        };
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors = error_lines(&stderr);
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: expected one error line:\n{stderr}"
        );
        assert!(errors[0].contains(needle), "{args:?}: {}", errors[0]);
    }
}

/// The lines of `stderr` that report an error (warnings aside).
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("error:") && !l.contains("warning:"))
        .collect()
}

/// Run as nbdkit's man page runs it (no `-f`), a bad value must fail the
/// nbdkit that was run: after the fork nobody hears of it (issue 26).
#[test]
fn daemonized_bad_parameters_exit_non_zero_before_the_fork_and_leave_nothing() {
    let mut cases = vec![
        (
            vec!["size=0"],
            "size=0: size 0 B is smaller than one 4 MiB chunk",
        ),
        (
            vec!["size=1M"],
            "size=1M: size 1 MiB is smaller than one 4 MiB chunk",
        ),
        (
            vec!["size=64P"],
            "size=64P: size 64 PiB is larger than the ",
        ),
        (
            vec!["device=99", "size=8M"],
            "device=99: no device 99; devices: ",
        ),
        (
            vec!["device=no-such-name", "size=8M"],
            "device=no-such-name: no device named 'no-such-name'",
        ),
    ];
    let base = base_args();
    // `backend=cuda` without the driver, where CUDA does not load: not in
    // this build, or no driver (a GPU machine testing Vulkan has one).
    if vramswap::backend::enumerate(vramswap::BackendKind::Cuda).is_err() {
        cases.push((vec!["backend=cuda", "size=8M"], "backend=cuda: "));
    }
    for (extra, needle) in cases {
        let mut args = base.clone();
        if extra.iter().any(|a| a.starts_with("backend=")) {
            args.retain(|a| !a.starts_with("backend="));
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let refusal = match Server::daemonize(&refs) {
            Ok(server) => panic!("nbdkit {args:?} serves (pid {})", server.pid()),
            Err(refusal) => refusal,
        };
        assert!(!refusal.status.success(), "{args:?}: {}", refusal.status);
        let errors = error_lines(&refusal.stderr);
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: expected one error line:\n{}",
            refusal.stderr
        );
        assert!(errors[0].contains(needle), "{args:?}: {}", errors[0]);
        assert!(
            refusal.processes_left.is_empty(),
            "{args:?}: left running: {:?}",
            refusal.processes_left
        );
        assert!(!refusal.socket_left, "{args:?}: the socket was left");
    }
}

#[test]
fn daemonized_nbdkit_exits_zero_and_its_server_serves() {
    let mut args = base_args();
    args.push("size=16M".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::daemonize(&refs).unwrap_or_else(|refusal| {
        panic!(
            "nbdkit {args:?} did not serve: {}\n{}",
            refusal.status, refusal.stderr
        )
    });
    let json: Value = serde_json::from_str(&run("nbdinfo", &["--json", &server.uri()])).unwrap();
    assert_eq!(json["exports"][0]["export-size"], 16 * MIB);
    assert!(server.is_running());
}

/// When the device fails only at its real open after the fork (it went
/// away in between; here an injected allocation failure), the server
/// exits rather than lingering, and the log file that `vramswap start`
/// reads says why.
#[test]
fn a_failure_after_the_fork_ends_the_server_and_the_log_file_says_why() {
    let mut args = base_args();
    args.extend(["size=8M".into(), "inject-alloc-fail-from=0".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let refusal = match Server::daemonize(&refs) {
        Ok(server) => panic!("nbdkit {args:?} serves (pid {})", server.pid()),
        Err(refusal) => refusal,
    };
    // The nbdkit that was run had exited 0 before the device was opened.
    assert!(refusal.status.success(), "{}", refusal.status);
    assert!(
        refusal.processes_left.is_empty(),
        "the server lingers: {:?}",
        refusal.processes_left
    );
    let errors: Vec<&str> = refusal
        .log_file
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}", refusal.log_file);
    assert!(errors[0].starts_with("error: size=8M: "), "{}", errors[0]);
}

#[test]
fn help_and_dump_plugin_describe_the_plugin() {
    let plugin = common::nbd::plugin_path().to_str().unwrap();
    let help = run("nbdkit", &[plugin, "--help"]);
    for key in [
        "backend=",
        "device=",
        "size=",
        "reserve=",
        "allocation=",
        "lanes=",
        "staging=",
    ] {
        assert!(help.contains(key), "--help lacks {key}");
    }
    let dump = run("nbdkit", &[plugin, "--dump-plugin"]);
    assert!(dump.contains("name=vramswap"), "{dump}");
    assert!(dump.contains("thread_model=parallel"), "{dump}");
    assert!(dump.contains("vramswap_backends=vulkan"), "{dump}");
    assert!(dump.contains("vramswap_block_size=65536"), "{dump}");
}

/// Runs nbdsh code that reports each call as `name ok` or `name EIO…`.
const TRY: &str = "import errno
def attempt(name, call):
    try:
        call()
        print(name, 'ok')
    except nbd.Error as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
";

#[test]
fn a_full_gpu_fails_writes_with_enospc_and_the_server_keeps_serving() {
    // Lazy: chunks 0 and 1 allocate, the third allocation fails.
    let mut server = serve(&["size=16M", "allocation=lazy", "inject-alloc-fail-from=3"]);
    server.status_when(|s| s["nospace_requests"] == 0);
    let out = nbdsh(
        &server.uri(),
        &format!(
            "{TRY}
attempt('chunk0', lambda: h.pwrite(b'a' * 4096, 0))
attempt('chunk1', lambda: h.pwrite(b'b' * 4096, 4 << 20))
attempt('chunk2', lambda: h.pwrite(b'c' * 4096, 8 << 20))
attempt('read0', lambda: h.pread(4096, 0) == b'a' * 4096 or 1 / 0)
attempt('trim1', lambda: h.trim(4 << 20, 4 << 20))
attempt('chunk2-again', lambda: h.pwrite(b'c' * 4096, 8 << 20))"
        ),
    );
    for line in [
        "chunk0 ok",
        "chunk1 ok",
        "chunk2 ENOSPC",
        "read0 ok",
        "trim1 ok",
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    // The plan fails every later allocation too: still ENOSPC, still serving.
    assert!(out.contains("chunk2-again ENOSPC"), "{out}");
    assert!(server.is_running());
    let status = server.status_when(|s| s["nospace_requests"] == 2);
    assert!(status["failure"].is_null(), "{status}");
}

/// A file of pages that compress about 3:1, as program memory does, with
/// a zero page every so often.
fn compressible_file(dir: &tempfile::TempDir, name: &str, len: u64) -> std::path::PathBuf {
    let mut rng = SmallRng::seed_from_u64(len);
    let mut data = vec![0u8; len as usize];
    for (n, page) in data.chunks_mut(4096).enumerate() {
        if n % 9 == 4 {
            continue;
        }
        for run in page.chunks_mut(16) {
            match rng.gen_range(0..3) {
                0 => rng.fill_bytes(run),
                _ => run.fill(rng.gen_range(0..4)),
            }
        }
    }
    let path = dir.path().join(name);
    std::fs::write(&path, &data).unwrap();
    path
}

/// Compressed exports under real clients: nbdcopy over four connections
/// fills one twice the size of its VRAM with compressible data and reads
/// it back, qemu-io's unaligned writes merge into compressed pages, and
/// fio verifies random blocks over four jobs (random data stays raw, so
/// that export gets VRAM for all of it).
#[test]
fn compressed_exports_serve_nbdcopy_qemu_io_and_fio() {
    for compress in ["compress=lz4", "compress=zstd"] {
        let server = serve(&["size=32M", compress, "allocation=lazy"]);
        let json: Value =
            serde_json::from_str(&run("nbdinfo", &["--json", &server.uri()])).unwrap();
        assert_eq!(json["exports"][0]["export-size"], 64 * MIB, "{compress}");
        let dir = tempfile::tempdir().unwrap();
        let source = compressible_file(&dir, "in.bin", 48 * MIB);
        copy_in_and_back(&server, &dir, &source);
        // The pages that are not zeros (nbdcopy skips those), more than
        // the VRAM holds, in part of that VRAM.
        let status =
            server.status_when(|s| s["compress"]["original_bytes"].as_u64() > Some(40 * MIB));
        let packed = &status["compress"];
        assert!(
            packed["vram_used"].as_u64().unwrap() < 30 * MIB,
            "{compress}: {packed}"
        );
        server.stop();
        unaligned_writes_read_back(&serve(&["size=16M", compress]));
        fio_verify(&["size=96M", compress, "ratio=1"]);
    }
}

/// An export larger than its VRAM fills: the write that finds no room
/// fails with ENOSPC, every page stored before reads back, the status
/// file says the area is full, and a trim makes room again.
#[test]
fn a_full_compressed_export_fails_writes_with_enospc_and_keeps_every_page() {
    let mut server = serve(&["size=4M", "compress=lz4", "ratio=4", "verify=on"]);
    let out = nbdsh(
        &server.uri(),
        &format!(
            "{TRY}
import os
blocks = []
while True:
    data = os.urandom(65536)
    try:
        h.pwrite(data, len(blocks) * 65536)
    except nbd.Error as e:
        print('full after', len(blocks), errno.errorcode.get(e.errno, e.errno))
        break
    blocks.append(data)
attempt('read-all', lambda: all(h.pread(65536, i * 65536) == b for i, b in enumerate(blocks)) or 1 / 0)
attempt('zero-page', lambda: h.pwrite(bytes(4096), len(blocks) * 65536))
attempt('trim', lambda: h.trim(65536, 0))
attempt('after-trim', lambda: h.pwrite(os.urandom(65536), len(blocks) * 65536))
attempt('read-rest', lambda: all(h.pread(65536, i * 65536) == b for i, b in enumerate(blocks) if i) or 1 / 0)"
        ),
    );
    for line in [
        "full after 64 ENOSPC",
        "read-all ok",
        "zero-page ok",
        "trim ok",
        "after-trim ok",
        "read-rest ok",
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    assert!(server.is_running());
    // Written at once at the first ENOSPC, then every 2 s.
    let status = server.status_when(|s| s["compress"]["full"] == false);
    assert_eq!(status["nospace_requests"], 1, "{status}");
    assert_eq!(status["compress"]["full_writes"], 1, "{status}");
    assert_eq!(status["checksum_errors"], 0, "{status}");
}

#[test]
fn a_failed_copy_fails_that_request_with_eio_and_nothing_else() {
    // Batch 1 zeroes the eagerly allocated chunks; batch 3 is the second write.
    let mut server = serve(&["size=8M", "inject-batch-fail-at=3"]);
    let out = nbdsh(
        &server.uri(),
        &format!(
            "{TRY}
attempt('first', lambda: h.pwrite(b'1' * 65536, 0))
attempt('second', lambda: h.pwrite(b'2' * 65536, 65536))
attempt('third', lambda: h.pwrite(b'3' * 65536, 131072))
attempt('check', lambda: (h.pread(65536, 0) == b'1' * 65536 and h.pread(65536, 131072) == b'3' * 65536) or 1 / 0)"
        ),
    );
    for line in ["first ok", "second EIO", "third ok", "check ok"] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    assert!(server.is_running());
    let status = server.status_when(|s| s["failed_requests"] == 1);
    assert!(status["failure"].is_null(), "{status}");
}

#[test]
fn with_verify_a_block_whose_vram_changed_fails_its_reads_and_the_status_file_counts_it() {
    // Upload 2 (the second write) lands with a bit flipped in VRAM, after
    // the plugin computed its checksum.
    let mut server = serve(&["size=8M", "verify=on", "inject-corrupt-upload-at=2"]);
    let out = nbdsh(
        &server.uri(),
        &format!(
            "{TRY}
attempt('first', lambda: h.pwrite(b'1' * 65536, 0))
attempt('second', lambda: h.pwrite(b'2' * 65536, 65536))
attempt('read-good', lambda: h.pread(65536, 0) == b'1' * 65536 or 1 / 0)
attempt('read-bad', lambda: h.pread(4096, 65536 + 8192))
attempt('read-across', lambda: h.pread(3 * 65536, 0))
attempt('read-fresh', lambda: h.pread(65536, 1 << 20) == bytes(65536) or 1 / 0)
attempt('rewrite', lambda: h.pwrite(b'3' * 65536, 65536))
attempt('read-healed', lambda: h.pread(65536, 65536) == b'3' * 65536 or 1 / 0)"
        ),
    );
    for line in [
        "first ok",
        "second ok",
        "read-good ok",
        "read-bad EIO",
        "read-across EIO",
        "read-fresh ok",
        "rewrite ok",
        "read-healed ok",
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    assert!(server.is_running());
    let status = server.status_when(|s| s["checksum_errors"] == 2 && s["failed_requests"] == 2);
    assert!(status["failure"].is_null(), "{status}");
}

#[test]
fn a_lost_device_fails_every_later_request_and_the_status_file_says_so() {
    // Batch 1 zeroes the eager chunks; batch 3 is the second write (whole
    // blocks: one batch each, or one mapped write each).
    let mut server = serve(&["size=8M", "inject-lost-from-batch=3"]);
    let out = nbdsh(
        &server.uri(),
        &format!(
            "{TRY}
attempt('before', lambda: h.pwrite(b'x' * 65536, 0))
attempt('lost', lambda: h.pwrite(b'y' * 65536, 65536))
attempt('read-written', lambda: h.pread(4096, 0))
attempt('read-fresh', lambda: h.pread(4096, 1 << 20))
attempt('trim', lambda: h.trim(65536, 0))"
        ),
    );
    for line in [
        "before ok",
        "lost EIO",
        "read-written EIO",
        "read-fresh EIO",
        "trim EIO",
    ] {
        assert!(out.contains(line), "{line}:\n{out}");
    }
    assert!(server.is_running(), "the server must stay up to answer EIO");
    let status = server.status_when(|s| s["failed_requests"] == 4);
    assert!(
        status["failure"].as_str().unwrap().contains("lost"),
        "{status}"
    );
}

#[test]
fn scrub_finds_a_bad_block_that_no_client_reads() {
    // Upload 2 (the second write) lands with a bit flipped in VRAM. Nobody
    // reads it back: the scrub, one pass over 128 blocks per 2 s, must find
    // it, and count it, without a single request failing.
    let mut server = serve(&[
        "size=8M",
        "verify=on",
        "scrub=2s",
        "inject-corrupt-upload-at=2",
    ]);
    let out = nbdsh(
        &server.uri(),
        &format!(
            "{TRY}
attempt('first', lambda: h.pwrite(b'1' * 65536, 0))
attempt('second', lambda: h.pwrite(b'2' * 65536, 65536))"
        ),
    );
    assert!(
        out.contains("first ok") && out.contains("second ok"),
        "{out}"
    );
    let status = server.status_when(|s| s["checksum_errors"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(status["failed_requests"], 0, "{status}");
    assert!(server.is_running());
    // And a scrub is refused without the checksums it checks.
    let mut args = base_args();
    args.extend(["size=8M".to_string(), "scrub=1h".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = Server::try_start(&args)
        .err()
        .expect("scrub without verify started");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("scrub=1h: needs verify=on"), "{stderr}");
}

#[test]
fn warm_up_reads_wait_until_every_thread_of_a_connection_has_one() {
    // nbdkit's default: 16 threads per connection.
    let server = serve(&["size=16M", "warm-up=16:64K"]);
    let uri = server.uri();
    // One read at a time: the warm-up read waits for threads that never
    // come, gives up after 2 s, and is served with the right bytes.
    let out = nbdsh(
        &uri,
        "import time
h.pwrite(b'w' * 65536, 0)
start = time.monotonic()
ok = h.pread(65536, 0) == b'w' * 65536
print('lone read', ok, round(time.monotonic() - start, 1))
start = time.monotonic()
h.pread(4096, 0)
print('small read', round(time.monotonic() - start, 1))",
    );
    let field = |name: &str| -> f64 {
        let line = out.lines().find(|l| l.starts_with(name)).expect(name);
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(out.contains("lone read True"), "{out}");
    assert!(
        field("lone read") >= 1.9,
        "the lone read did not wait:\n{out}"
    );
    assert!(field("small read") < 1.0, "a small read waited:\n{out}");
    assert_eq!(server.status_when(|_| true)["warm_connections"], 0);
    // Two connections with 32 reads of 64 KiB in flight each: every thread
    // of both takes one.
    run(
        "fio",
        &[
            "--name=warm",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=64k",
            "--size=16M",
            "--numjobs=2",
            "--iodepth=32",
            "--io_size=8M",
        ],
    );
    server.status_when(|s| s["warm_connections"] == 2);
}

#[test]
fn every_page_of_the_servers_code_is_in_memory_and_locked_before_it_serves() {
    let server = serve(&["size=16M"]);
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", server.pid())).unwrap();
    let plugin = std::fs::canonicalize(common::nbd::plugin_path()).unwrap();
    let plugin = plugin.to_str().unwrap();
    // Each mapping: a header line as in /proc/PID/maps, `Key: value` lines,
    // `VmFlags:` last. The plugin's readable ones must be all in and locked.
    let mut checked = 0;
    let mut mapping: Vec<&str> = Vec::new();
    for line in smaps.lines() {
        mapping.push(line);
        if !line.starts_with("VmFlags:") {
            continue;
        }
        let ours = vramswap::maps::file_mappings(mapping[0]).any(|m| m.path == plugin);
        if ours {
            let field = |key: &str| -> &str {
                let line = mapping.iter().find(|l| l.starts_with(key)).unwrap();
                line[key.len()..].trim()
            };
            let text = mapping.join("\n");
            assert_eq!(field("Rss:"), field("Size:"), "not all read in:\n{text}");
            assert!(
                field("VmFlags:").split(' ').any(|f| f == "lo"),
                "not locked:\n{text}"
            );
            checked += 1;
        }
        mapping.clear();
    }
    assert!(
        checked >= 2,
        "{plugin}: {checked} readable mappings in\n{smaps}"
    );
}

/// The loader loads every installed Vulkan driver, and the server locks
/// what it maps: Mesa's drivers for Intel and AMD GPUs must not be loaded
/// where the machine has no display controller of theirs (CI: none at
/// all, lavapipe serves). Without the hold-back, both are in the server.
#[test]
fn vulkan_drivers_for_gpus_the_machine_lacks_are_not_loaded() {
    if !base_args().iter().any(|a| a == "backend=vulkan")
        || std::env::var_os("VK_DRIVER_FILES").is_some()
        || std::env::var_os("VK_ICD_FILENAMES").is_some()
    {
        return;
    }
    let vendors: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|dir| {
            dir.flatten()
                .filter(|d| {
                    std::fs::read_to_string(d.path().join("class"))
                        .is_ok_and(|c| c.starts_with("0x03"))
                })
                .filter_map(|d| std::fs::read_to_string(d.path().join("vendor")).ok())
                .map(|v| v.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    let absent: Vec<&str> = [
        ("0x8086", "libvulkan_intel"),
        ("0x1002", "libvulkan_radeon"),
    ]
    .into_iter()
    .filter(|(vendor, library)| {
        !vendors.iter().any(|v| v == vendor)
            && std::fs::read_dir("/usr/share/vulkan/icd.d").is_ok_and(|dir| {
                dir.flatten()
                    .any(|m| std::fs::read_to_string(m.path()).is_ok_and(|t| t.contains(library)))
            })
    })
    .map(|(_, library)| library)
    .collect();
    let server = serve(&["size=16M"]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid())).unwrap();
    assert!(
        maps.contains("libvulkan"),
        "no Vulkan driver in the server:\n{maps}"
    );
    for library in absent {
        assert!(
            !maps.contains(library),
            "{library} is loaded, with no display controller of its vendor:\n{maps}"
        );
    }
}

/// `storage-daemon=on` (what `vramswap start` sets): a SIGTERM while a
/// client is connected is held back. The server goes on serving, the
/// connected client's next request and new clients alike, says so in its
/// log and status file, and marks itself '@' for systemd's final kill; it
/// exits by itself once the last client has disconnected. Without the key,
/// nbdkit ends at the signal, and the connected client's request fails.
#[test]
fn a_storage_daemon_holds_a_quit_signal_until_its_last_client_disconnects() {
    for daemon in [true, false] {
        let key = if daemon { "on" } else { "off" };
        let mut server = serve(&["size=16M", &format!("storage-daemon={key}")]);
        let pid = server.pid();
        let argv0 = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert_eq!(
            argv0[0] == b'@',
            daemon,
            "{}",
            String::from_utf8_lossy(&argv0)
        );
        // A client that writes, waits across the signal, then reads back.
        let dir = tempfile::tempdir().unwrap();
        let (ready, go) = (dir.path().join("ready"), dir.path().join("go"));
        let script = format!(
            "import os, time\n\
             h.pwrite(b'Z' * 65536, 0)\n\
             open({ready:?}, 'w').close()\n\
             while not os.path.exists({go:?}): time.sleep(0.05)\n\
             print(h.pread(65536, 0) == b'Z' * 65536)\n"
        );
        let client = Command::new("nbdsh")
            .args(["-u", &server.uri(), "-c", &script])
            .env(
                "PATH",
                format!("/usr/bin:/bin:{}", std::env::var("PATH").unwrap()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nbdsh");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "the client never wrote");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(run("kill", &["-TERM", &pid.to_string()]).is_empty());
        std::thread::sleep(Duration::from_millis(500));
        if daemon {
            assert!(server.is_running(), "SIGTERM ended a storage daemon");
            let status = server.status_when(|s| !s["daemon"]["quit_pending"].is_null());
            assert_eq!(
                status["daemon"]["quit_pending"]["signal"], "SIGTERM",
                "{status}"
            );
            // A new client is served too, and sees the first one's bytes.
            let out = nbdsh(&server.uri(), "print(h.pread(65536, 0) == b'Z' * 65536)");
            assert_eq!(out.trim(), "True");
        }
        std::fs::write(&go, "").unwrap();
        let out = client.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        if daemon {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(said.trim(), "True", "the held client read other bytes");
        } else {
            assert!(
                !out.status.success(),
                "a plain server served on after SIGTERM: {said}"
            );
        }
        // With its last client gone, the server ends by itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.is_running() {
            assert!(
                Instant::now() < deadline,
                "storage-daemon={key}: the server outlived its last client"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = server.stop();
        assert_eq!(
            log.contains("SIGTERM postponed: 1 client(s) connected"),
            daemon,
            "{log}"
        );
    }
}
