//! The parameters of one export, as the nbdkit plugin's `key=value`s.
//!
//! One place for the keys, their parsing and their help text: the plugin
//! parses them before nbdkit forks (so a bad value is one clear line and a
//! non-zero exit), and the CLI renders them back into nbdkit's command line.

use std::fmt;

use thiserror::Error;

use crate::backend::{
    BackendKind, DeviceSelector, MappedMode, OpenOptions, BLOCK_SIZE, CHUNK_SIZE,
};
use crate::size::{parse_size, ByteSize};
use crate::store::{
    AllocationPolicy, Compression, Ratio, SizeSpec, StoreConfig, DEFAULT_LANES, DEFAULT_READAHEAD,
    DEFAULT_RESERVE, DEFAULT_STAGING, MAX_WINDOWS,
};

/// What `nbdkit vramswap --help` prints after nbdkit's own text.
pub const HELP: &str = "\
backend=vulkan|cuda      GPU API (default: cuda when built in and it sees
                         the device, else vulkan; vulkan on an NVIDIA GPU
                         is warned about where cuda is built in: it is
                         slower there under many small requests)
device=INDEX|NAME|UUID   which GPU: position, part of its name, or UUID
                         (default: the first discrete GPU)
[size=]SIZE              size of the export, e.g. 8G, 512M (rounded down to
                         4M); default: available VRAM minus reserve. With
                         compress=, the VRAM the export may take
compress=off|lz4|zstd[:LEVEL]
                         compress each 4K page on its own, as zram does,
                         into VRAM slots of its compressed size; pages of
                         one repeated 8-byte word (zeros too) take no VRAM,
                         pages that do not shrink to 3K are kept raw. The
                         export is then size x ratio, and a write that
                         finds the VRAM full fails with ENOSPC, leaving
                         every page as it was (default off; zstd is level
                         1, LEVEL 1 to 19)
ratio=R                  with compress=: the export is the VRAM size times R
                         (1.0 to 8.0, default 2.0; program memory packs
                         about 2.6:1 with lz4 and 3.4:1 with zstd)
reserve=SIZE             VRAM left to others when size is automatic
                         (default 256M)
allocation=eager|lazy    take all VRAM at start (default; swap never finds
                         the GPU full) or a 4M chunk at its first write
mapped=auto|on|off       keep VRAM in memory the CPU maps (resizable BAR), so
                         writes are CPU stores straight into VRAM with no
                         staging copy or DMA; reads of up to 8K are CPU
                         loads from it, larger ones DMA. auto (default)
                         where the mappable window covers nearly all VRAM;
                         on refuses to start without it
lanes=N                  pinned staging buffers (default 64)
staging=SIZE             bytes per staging buffer, a multiple of 64K up to
                         4M (default 2M; at least 192K with verify=on)
readahead=N              2M windows of pinned memory for sequential reads:
                         a stream of reads of 128K or more is downloaded
                         ahead of where it reads, four windows at a time
                         (default 32, 0 to 64; 0 is off; off with verify=on)
direct=on|off            download reads of 128K or more by DMA straight into
                         nbdkit's per-thread request buffer, which each
                         thread registers (pins) with the driver once,
                         instead of through staging. Off by default: a
                         filter that passes its own temporary buffers
                         could free one and get another at the same
                         address, and the DMA would land in the old pinned
                         pages. `vramswap start` sets it (no filters there)
verify=on|off            checksum (CRC32C) every 64K block on write and check
                         it on read: a block whose VRAM changed fails its
                         read with EIO instead of returning bad data
                         (default off)
scrub=DURATION           with verify=on: re-read and check every written
                         block once per DURATION (e.g. 24h, 30m, 90s) in
                         the background, so a block that went bad is found
                         and counted before a process reads it (default:
                         no scrub)
storage-daemon=on|off    keep serving while a client is connected: a
                         SIGTERM, SIGINT, SIGHUP or SIGQUIT then only
                         postpones the exit until the last client has
                         disconnected (logged; SIGKILL still ends it at
                         once, losing every page), and the server marks
                         itself as a root storage daemon (argv[0] starts
                         with @), which systemd's final kill at shutdown
                         spares. `vramswap start` sets it (default: off,
                         nbdkit's own exit at the first signal)
warm-up=THREADS:SIZE     on each connection, make THREADS different nbdkit
                         threads each take a read of exactly SIZE bytes
                         before they serve on (such a read waits, up to 2 s,
                         until THREADS of them are in at once); nbdkit grows
                         a thread's request buffer at its first larger
                         request, which must not happen once the device is
                         swap. `vramswap start` sets it (default: off)
The preferred I/O size is 64K (one block); any offset and length work.";

/// `on` or `off` (or true/false, yes/no, 1/0).
fn parse_switch(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

/// A period: a whole number with an optional unit, `s` (default), `m`,
/// `h` or `d`; at least one second.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err("expected a duration such as 90s, 30m, 24h or 7d".into()),
    };
    let seconds = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds_per))
        .filter(|&s| s > 0)
        .ok_or("expected a duration of at least 1s, such as 90s, 30m, 24h or 7d")?;
    Ok(std::time::Duration::from_secs(seconds))
}

/// `warm-up=THREADS:SIZE`: every nbdkit thread takes one read of the
/// largest size before swap is on, so none grows its request buffer while
/// swap-out may wait on it (docs/RELIABILITY.md, "Faults"). The plugin
/// holds such a read until THREADS threads of the connection have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmUp {
    /// nbdkit's threads per connection (`--threads`).
    pub threads: usize,
    /// Bytes per warm-up read: the largest request the client sends.
    pub size: usize,
}

impl std::str::FromStr for WarmUp {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        const USAGE: &str = "expected THREADS:SIZE, e.g. 16:128K";
        let (threads, size) = text.split_once(':').ok_or(USAGE)?;
        let threads = match threads.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => n,
            _ => return Err(format!("{USAGE}; THREADS from 1 to 1024")),
        };
        let size = parse_size(size).map_err(|e| format!("{USAGE}: {e}"))?;
        if size == 0 || size % 4096 != 0 || size > 32 << 20 {
            return Err(format!("{USAGE}; SIZE a multiple of 4K up to 32M"));
        }
        Ok(WarmUp {
            threads,
            size: size as usize,
        })
    }
}

impl fmt::Display for WarmUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.threads, self.size)
    }
}

/// A refused parameter, or a refused pair of them; each names the key it
/// refuses, so a front end can point at where that key was given.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A value the key does not take, or not with the other keys given.
    #[error("{key}={value}: {why}")]
    Value {
        key: String,
        value: String,
        why: String,
    },
    #[error("{0}= is given more than once")]
    Repeated(String),
    #[error("unknown parameter '{0}' (see: nbdkit vramswap --help)")]
    Unknown(String),
    /// Only an automatic size leaves VRAM to others.
    #[error(
        "size={size} and reserve={reserve} exclude each other: reserve only applies when the size is automatic"
    )]
    SizeAndReserve { size: ByteSize, reserve: ByteSize },
    /// verify=on keeps two blocks of each staging buffer for the old
    /// bytes of partial writes.
    #[error("staging={staging} is too small for verify=on: it needs at least {least}")]
    StagingForVerify { staging: ByteSize, least: ByteSize },
}

impl ConfigError {
    /// The key refused: of a pair, the one that depends on the other.
    pub fn key(&self) -> &str {
        match self {
            ConfigError::Value { key, .. }
            | ConfigError::Repeated(key)
            | ConfigError::Unknown(key) => key,
            ConfigError::SizeAndReserve { .. } => "reserve",
            ConfigError::StagingForVerify { .. } => "staging",
        }
    }
}

/// Every parameter of an export, after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// `None`: chosen when the GPU is opened (see `default_backend`).
    pub backend: Option<BackendKind>,
    pub device: DeviceSelector,
    pub size: Option<u64>,
    pub reserve: Option<u64>,
    pub allocation: AllocationPolicy,
    pub mapped: MappedMode,
    pub lanes: usize,
    pub staging: usize,
    pub verify: bool,
    /// `direct=`: reads by DMA into nbdkit's registered request buffer.
    pub direct: bool,
    /// `storage-daemon=`: a quit signal waits for the last client.
    pub storage_daemon: bool,
    /// `readahead=`: windows of [`crate::store::WINDOW_BYTES`].
    pub readahead: usize,
    /// `scrub=`: one background pass over the written blocks per period.
    pub scrub: Option<std::time::Duration>,
    /// `warm-up=THREADS:SIZE`: see [`WarmUp`].
    pub warm_up: Option<WarmUp>,
    /// `compress=`: pack each page.
    pub compress: Compression,
    /// `ratio=`: with `compress`, the export over its VRAM.
    pub ratio: Ratio,
    /// Each `key=value` as given, for messages that quote the user.
    given: Vec<(String, String)>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            backend: None,
            device: DeviceSelector::First,
            size: None,
            reserve: None,
            allocation: AllocationPolicy::Eager,
            mapped: MappedMode::Auto,
            lanes: DEFAULT_LANES,
            staging: DEFAULT_STAGING,
            verify: false,
            direct: false,
            storage_daemon: false,
            readahead: DEFAULT_READAHEAD,
            scrub: None,
            warm_up: None,
            compress: Compression::Off,
            ratio: Ratio::DEFAULT,
            given: Vec::new(),
        }
    }
}

impl ExportConfig {
    /// Takes one `key=value` from the command line.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = |why: String| ConfigError::Value {
            key: key.to_string(),
            value: value.to_string(),
            why,
        };
        if self.given(key).is_some() {
            return Err(ConfigError::Repeated(key.to_string()));
        }
        if value.trim().is_empty() {
            return Err(bad("empty value".into()));
        }
        let size = |v: &str| parse_size(v).map_err(|e| bad(e.to_string()));
        match key {
            "backend" => {
                let kind: BackendKind = value
                    .parse()
                    .map_err(|e: crate::OpenError| bad(e.to_string()))?;
                if !BackendKind::compiled_in().contains(&kind) {
                    let built: Vec<&str> = BackendKind::compiled_in()
                        .iter()
                        .map(|k| k.name())
                        .collect();
                    return Err(bad(format!("this build has: {}", built.join(", "))));
                }
                self.backend = Some(kind);
            }
            "device" => {
                self.device = value
                    .parse()
                    .map_err(|e: crate::OpenError| bad(e.to_string()))?;
            }
            "size" => self.size = Some(size(value)?),
            "reserve" => self.reserve = Some(size(value)?),
            "allocation" => {
                self.allocation = value
                    .parse()
                    .map_err(|e: crate::StoreError| bad(e.to_string()))?;
            }
            "mapped" => self.mapped = value.parse().map_err(bad)?,
            "lanes" => {
                self.lanes = match value.parse::<usize>() {
                    Ok(n) if (1..=4096).contains(&n) => n,
                    _ => return Err(bad("expected a whole number from 1 to 4096".into())),
                }
            }
            "staging" => {
                let bytes = size(value)?;
                if bytes == 0 || bytes % BLOCK_SIZE != 0 || bytes > CHUNK_SIZE {
                    return Err(bad(format!(
                        "must be a multiple of {} from {} to {}",
                        ByteSize(BLOCK_SIZE),
                        ByteSize(BLOCK_SIZE),
                        ByteSize(CHUNK_SIZE)
                    )));
                }
                self.staging = bytes as usize;
            }
            "readahead" => {
                self.readahead = match value.parse::<usize>() {
                    Ok(n) if n <= MAX_WINDOWS => n,
                    _ => {
                        return Err(bad(format!(
                            "expected a whole number from 0 to {MAX_WINDOWS}"
                        )))
                    }
                }
            }
            "compress" => {
                self.compress = value
                    .parse()
                    .map_err(|e: crate::StoreError| bad(e.to_string()))?;
            }
            "ratio" => {
                self.ratio = value
                    .parse()
                    .map_err(|e: crate::StoreError| bad(e.to_string()))?;
            }
            "scrub" => self.scrub = Some(parse_duration(value).map_err(bad)?),
            "warm-up" => self.warm_up = Some(value.parse().map_err(bad)?),
            "verify" => self.verify = parse_switch(value).map_err(bad)?,
            "direct" => self.direct = parse_switch(value).map_err(bad)?,
            "storage-daemon" => self.storage_daemon = parse_switch(value).map_err(bad)?,
            _ => return Err(ConfigError::Unknown(key.to_string())),
        }
        self.given.push((key.to_string(), value.to_string()));
        Ok(())
    }

    /// The value of `key` exactly as the user wrote it.
    pub fn given(&self, key: &str) -> Option<&str> {
        self.given
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key=value` as the user wrote it, or `key (default)`: how a message
    /// names the key to change.
    pub fn quote(&self, key: &str) -> String {
        match self.given(key) {
            Some(value) => format!("{key}={value}"),
            None => format!("{key} (default)"),
        }
    }

    /// Checks the parameters together, once all are given: the one place
    /// for the rules between keys, which the plugin and the CLI both call.
    pub fn complete(&self) -> Result<(), ConfigError> {
        self.store_config()
            .size
            .check()
            .map_err(|e| ConfigError::Value {
                key: "size".into(),
                value: self.given("size").unwrap_or_default().into(),
                why: e.to_string(),
            })?;
        if let (Some(size), Some(reserve)) = (self.size, self.reserve) {
            return Err(ConfigError::SizeAndReserve {
                size: ByteSize(size),
                reserve: ByteSize(reserve),
            });
        }
        if self.scrub.is_some() && !self.verify {
            return Err(ConfigError::Value {
                key: "scrub".into(),
                value: self.given("scrub").unwrap_or_default().into(),
                why: "needs verify=on (the scrub checks blocks against their checksums)".into(),
            });
        }
        if !self.compress.is_on() && self.given("ratio").is_some() {
            return Err(ConfigError::Value {
                key: "ratio".into(),
                value: self.given("ratio").unwrap_or_default().into(),
                why: "needs compress=lz4 or compress=zstd (without it the export is the VRAM it holds)"
                    .into(),
            });
        }
        if self.verify && !self.compress.is_on() && (self.staging as u64) < 3 * BLOCK_SIZE {
            return Err(ConfigError::StagingForVerify {
                staging: ByteSize(self.staging as u64),
                least: ByteSize(3 * BLOCK_SIZE),
            });
        }
        Ok(())
    }

    /// The `key=value`s that make the plugin build this export (only the
    /// ones that differ from the defaults), for nbdkit's command line.
    pub fn to_args(&self) -> Vec<String> {
        let defaults = ExportConfig::default();
        let mut args = Vec::new();
        if let Some(kind) = self.backend {
            args.push(format!("backend={kind}"));
        }
        match &self.device {
            DeviceSelector::First => {}
            DeviceSelector::Index(i) => args.push(format!("device={i}")),
            DeviceSelector::Name(n) => args.push(format!("device={n}")),
            DeviceSelector::Uuid(u) => {
                args.push(format!("device={}", crate::backend::format_uuid(u)))
            }
        }
        if let Some(size) = self.size {
            args.push(format!("size={size}"));
        }
        if let Some(reserve) = self.reserve {
            args.push(format!("reserve={reserve}"));
        }
        if self.allocation != defaults.allocation {
            args.push(format!("allocation={}", self.allocation));
        }
        if self.mapped != defaults.mapped {
            args.push(format!("mapped={}", self.mapped));
        }
        if self.lanes != defaults.lanes {
            args.push(format!("lanes={}", self.lanes));
        }
        if self.staging != defaults.staging {
            args.push(format!("staging={}", self.staging));
        }
        if self.readahead != defaults.readahead {
            args.push(format!("readahead={}", self.readahead));
        }
        if self.verify {
            args.push("verify=on".into());
        }
        if self.direct {
            args.push("direct=on".into());
        }
        if self.storage_daemon {
            args.push("storage-daemon=on".into());
        }
        if let Some(period) = self.scrub {
            args.push(format!("scrub={}s", period.as_secs()));
        }
        if let Some(warm_up) = self.warm_up {
            args.push(format!("warm-up={warm_up}"));
        }
        if self.compress.is_on() {
            args.push(format!("compress={}", self.compress));
            if self.ratio != defaults.ratio {
                args.push(format!("ratio={}", self.ratio));
            }
        }
        args
    }

    /// How to open the backend for this export.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            device: self.device.clone(),
            memory_limit: None,
            mapped: self.mapped,
        }
    }

    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            size: match self.size {
                Some(bytes) => SizeSpec::Bytes(bytes),
                None => SizeSpec::Auto {
                    reserve: self.reserve.unwrap_or(DEFAULT_RESERVE),
                },
            },
            allocation: self.allocation,
            lanes: self.lanes,
            staging_bytes: self.staging,
            verify: self.verify,
            readahead: self.readahead,
            compress: self.compress,
            ratio: self.ratio,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<ExportConfig, ConfigError> {
        let mut config = ExportConfig::default();
        for (k, v) in pairs {
            config.set(k, v)?;
        }
        config.complete()?;
        Ok(config)
    }

    #[test]
    fn defaults_make_an_automatic_eager_store() {
        let config = parse(&[]).unwrap().store_config();
        assert_eq!(config.size, SizeSpec::Auto { reserve: 256 << 20 });
        assert_eq!(config.allocation, AllocationPolicy::Eager);
        assert_eq!((config.lanes, config.staging_bytes), (64, 2 << 20));
        assert!(!config.verify);
        assert_eq!(config.readahead, 32);
        assert!(!parse(&[]).unwrap().direct);
        assert!(!parse(&[]).unwrap().storage_daemon);
    }

    #[test]
    fn every_key_parses() {
        let config = parse(&[
            ("backend", "vulkan"),
            ("device", "1"),
            ("size", "8G"),
            ("allocation", "lazy"),
            ("lanes", "16"),
            ("staging", "256K"),
            ("verify", "on"),
            ("readahead", "0"),
            ("direct", "on"),
            ("storage-daemon", "on"),
            ("compress", "zstd:3"),
            ("ratio", "2.5"),
        ])
        .unwrap();
        assert_eq!(config.store_config().compress, Compression::Zstd(3));
        assert_eq!(config.store_config().ratio, "2.5".parse().unwrap());
        assert!(config.direct);
        assert!(config.storage_daemon);
        assert!(!parse(&[("direct", "off")]).unwrap().direct);
        assert_eq!(config.backend, Some(BackendKind::Vulkan));
        assert_eq!(config.device, DeviceSelector::Index(1));
        let store = config.store_config();
        assert_eq!(store.size, SizeSpec::Bytes(8 << 30));
        assert_eq!(store.allocation, AllocationPolicy::Lazy);
        assert_eq!((store.lanes, store.staging_bytes), (16, 256 << 10));
        assert!(store.verify);
        assert_eq!(store.readahead, 0);
        let warm = parse(&[("warm-up", "8:128K")]).unwrap().warm_up;
        assert_eq!(
            warm,
            Some(WarmUp {
                threads: 8,
                size: 128 << 10
            })
        );
        let auto = parse(&[("reserve", "1G")]).unwrap().store_config();
        assert_eq!(auto.size, SizeSpec::Auto { reserve: 1 << 30 });
    }

    #[test]
    fn scrub_needs_verify_and_reaches_nbdkit_in_seconds() {
        let mut config = ExportConfig::default();
        config.set("scrub", "24h").unwrap();
        assert_eq!(config.scrub, Some(std::time::Duration::from_secs(86400)));
        let err = config.complete().unwrap_err();
        assert_eq!(err.key(), "scrub");
        let err = err.to_string();
        assert!(err.starts_with("scrub=24h: needs verify=on"), "{err}");
        config.set("verify", "on").unwrap();
        config.complete().unwrap();
        assert!(config.to_args().contains(&"scrub=86400s".to_string()));
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
    }

    #[test]
    fn errors_name_the_key_and_value_on_one_line() {
        for (key, value, needle) in [
            ("size", "lots", "size=lots: 'lots' is not a size"),
            (
                "backend",
                "opencl",
                "backend=opencl: unknown backend 'opencl'",
            ),
            (
                "allocation",
                "sometimes",
                "allocation=sometimes: 'sometimes' is not an allocation policy",
            ),
            ("lanes", "0", "lanes=0: expected a whole number"),
            (
                "readahead",
                "65",
                "readahead=65: expected a whole number from 0 to 64",
            ),
            (
                "staging",
                "100K",
                "staging=100K: must be a multiple of 64 KiB",
            ),
            ("device", " ", "device= : empty value"),
            ("verify", "maybe", "verify=maybe: expected on or off"),
            ("direct", "always", "direct=always: expected on or off"),
            (
                "storage-daemon",
                "yes please",
                "storage-daemon=yes please: expected on or off",
            ),
            ("scrub", "soon", "scrub=soon: expected a duration"),
            (
                "compress",
                "gzip",
                "compress=gzip: 'gzip' is not a compression: expected off, lz4, zstd",
            ),
            ("ratio", "10", "ratio=10: '10' is not a ratio"),
            (
                "scrub",
                "0h",
                "scrub=0h: expected a duration of at least 1s",
            ),
            (
                "scrub",
                "99999999999999999999d",
                "scrub=99999999999999999999d: expected a duration",
            ),
            ("warm-up", "16", "warm-up=16: expected THREADS:SIZE"),
            ("warm-up", "0:128K", "warm-up=0:128K: expected THREADS:SIZE"),
            ("warm-up", "16:1000", "SIZE a multiple of 4K up to 32M"),
            ("warm-up", "16:64M", "SIZE a multiple of 4K up to 32M"),
            ("colour", "blue", "unknown parameter 'colour'"),
        ] {
            let err = parse(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn rendered_args_parse_back_to_the_same_config() {
        for pairs in [
            vec![],
            vec![
                ("backend", "vulkan"),
                ("device", "GPU-3911b20d-250f-381e-70e3-d98316e3fdec"),
                ("size", "8G"),
            ],
            vec![
                ("device", "H100"),
                ("reserve", "1G"),
                ("allocation", "lazy"),
                ("lanes", "8"),
                ("staging", "256K"),
                ("verify", "on"),
                ("warm-up", "16:128K"),
                ("direct", "on"),
                ("storage-daemon", "on"),
            ],
            vec![("compress", "lz4")],
            vec![("compress", "zstd:7"), ("ratio", "3.25"), ("verify", "on")],
        ] {
            let config = parse(&pairs).unwrap();
            let args = config.to_args();
            let again: Vec<(&str, &str)> =
                args.iter().map(|a| a.split_once('=').unwrap()).collect();
            let mut back = parse(&again).unwrap();
            back.given = config.given.clone();
            assert_eq!(back, config, "{args:?}");
        }
    }

    #[test]
    fn a_size_below_one_chunk_is_refused_with_the_parameters() {
        for (value, needle) in [
            ("0", "size=0: size 0 B is smaller than one 4 MiB chunk"),
            ("1M", "size=1M: size 1 MiB is smaller than one 4 MiB chunk"),
        ] {
            let err = parse(&[("size", value)]).unwrap_err();
            assert_eq!(err.key(), "size");
            assert_eq!(err.to_string(), needle);
        }
        parse(&[("size", "4M")]).unwrap();
    }

    #[test]
    fn conflicting_and_repeated_keys_are_refused() {
        let err = parse(&[("size", "1G"), ("reserve", "1G")]).unwrap_err();
        assert!(err.to_string().contains("exclude each other"), "{err}");
        assert_eq!(err.key(), "reserve");
        let err = parse(&[("verify", "on"), ("staging", "128K")]).unwrap_err();
        assert!(err.to_string().contains("too small for verify=on"), "{err}");
        let err = parse(&[("ratio", "3")]).unwrap_err();
        assert!(
            err.to_string().starts_with("ratio=3: needs compress="),
            "{err}"
        );
        assert_eq!(err.key(), "ratio");
        let err = parse(&[("size", "1G"), ("size", "2G")]).unwrap_err();
        assert_eq!(err.to_string(), "size= is given more than once");
    }
}
