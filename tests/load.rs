//! Sustained load on the real nbdkit with the vramswap plugin (Vulkan on
//! lavapipe here): 16 NBD connections, each driven by its own fio job, of
//! four kinds at once (random 4–64 KiB writes, sequential 1 MiB writes,
//! mixed random read/write, random writes with trims), every byte written
//! checked with crc32c, the regions written over several times. Nothing may
//! fail a verify, and the server's memory must not grow with the I/O done.

mod common;

use common::nbd::{run, Server};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Each job owns this much of the export (fio's verify needs it alone).
const REGION: u64 = 8 * MIB;
const JOBS_PER_KIND: u64 = 4;
const KINDS: &[(&str, &[&str])] = &[
    ("randwrite", &["--rw=randwrite", "--bsrange=4k-64k"]),
    ("seqwrite", &["--rw=write", "--bs=1m"]),
    ("mixed", &["--rw=randrw", "--rwmixread=50", "--bs=16k"]),
    // Each block trimmed, then written again: the verify pass reads back
    // the writes over freshly trimmed blocks. One at a time: deeper, fio
    // has a block's trim and write in flight together, whose order NBD
    // leaves open (nbdkit's memory plugin then fails the verify as well).
    ("trims", &["--rw=trimwrite", "--bs=64k", "--iodepth=1"]),
];
/// Times each job writes its region over (and verifies it).
const LOOPS: &str = "--loops=100";

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Runs one fio invocation with every job kind, each on its own regions.
fn fio_all(uri: &str, loops: &str) -> Value {
    let uri_arg = format!("--uri={uri}");
    let mut args: Vec<String> = vec![
        "--ioengine=nbd".into(),
        uri_arg,
        "--thread".into(),
        "--iodepth=4".into(),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        "--verify_state_save=0".into(),
        format!("--size={REGION}"),
        format!("--numjobs={JOBS_PER_KIND}"),
        format!("--offset_increment={REGION}"),
        loops.into(),
        "--output-format=json".into(),
    ];
    for (i, (name, extra)) in KINDS.iter().enumerate() {
        args.push(format!("--name={name}"));
        args.push(format!("--offset={}", i as u64 * JOBS_PER_KIND * REGION));
        args.extend(extra.iter().map(|s| s.to_string()));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("fio", &refs);
    serde_json::from_str(&out[out.find('{').expect("fio json")..]).expect("fio json")
}

#[test]
fn sixteen_verified_connections_under_load_and_memory_stays_flat() {
    let size = KINDS.len() as u64 * JOBS_PER_KIND * REGION;
    let backend =
        std::env::var("VRAMSWAP_TEST_PLUGIN_ARGS").unwrap_or_else(|_| "backend=vulkan".into());
    let mut args: Vec<String> = backend.split_whitespace().map(str::to_string).collect();
    args.push(format!("size={size}"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&refs);
    let uri = server.uri();

    // Warm-up rounds first: after them the server's threads, lanes, the
    // driver's buffers and the heap's high-water mark all exist. nbdkit
    // mallocs a buffer per request in each worker thread's arena, and under
    // mlockall freed heap pages stay resident, so RSS climbs to a plateau
    // bounded by threads x request sizes; what keeps growing past it is a
    // leak.
    fio_all(&uri, "--loops=10");
    fio_all(&uri, "--loops=10");
    let before = rss_kib(server.pid());
    let json = fio_all(&uri, LOOPS);
    let after = rss_kib(server.pid());

    let jobs = json["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), KINDS.len() * JOBS_PER_KIND as usize);
    let mut written = 0;
    for job in jobs {
        assert_eq!(job["error"], 0, "{}: {job}", job["jobname"]);
        written += job["write"]["io_bytes"].as_u64().unwrap();
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() > 0,
            "{}: verified nothing",
            job["jobname"]
        );
    }
    // Mixed jobs write half of what they move: 87.5 regions' worth in all.
    assert!(written >= 80 * size, "only {written} bytes written");
    assert!(server.is_running());
    // Flat: slack for the allocator settling (a few MiB seen here). A leak
    // of even 100 bytes per request would add ~40 MiB over this run.
    assert!(
        after <= before + 24 * 1024,
        "server RSS grew from {before} KiB to {after} KiB over {} MiB of I/O",
        written / MIB
    );
    eprintln!(
        "load: {} MiB written and verified over 16 connections; server RSS {before} -> {after} KiB",
        written / MIB
    );
}
