//! `/etc/vramswap.toml` and `/etc/vramswap/*.toml`: one `[NAME]` table per
//! swap area, with the same keys as `vramswap start`'s options.
//!
//! ```toml
//! [default]
//! size = "16G"
//! priority = 50
//!
//! [scratch]
//! device = "GPU-3911b20d-250f-381e-70e3-d98316e3fdec"
//! allocation = "lazy"
//! size = "32G"
//! priority = 10
//! ```
//!
//! Unknown keys and bad values are errors that name the file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use vramswap::export::ConfigError;
use vramswap::ExportConfig;

use crate::args::StartArgs;
use crate::elastic::ElasticOptions;
use crate::name::check_name;
use crate::system::System;

pub const MAIN_FILE: &str = "/etc/vramswap.toml";
pub const DROP_IN_DIR: &str = "/etc/vramswap";

/// The settings of one swap area. Every key is optional; what is not set
/// takes the default `vramswap start --help` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserve: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// The plugin's mapped=: "auto", "on" or "off".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memtest: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<bool>,
    /// The plugin's scrub= (with verify): a period such as "24h".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scrub: Option<String>,
    /// The plugin's compress=: "off", "lz4", "zstd" or "zstd:LEVEL".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress: Option<String>,
    /// The plugin's ratio=, kept as written (`ratio = 2.5` or `"2.5"`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "number_or_text"
    )]
    pub ratio: Option<String>,
    /// The power policy (`vramswap power`): "stop" the area on battery, or
    /// "keep" it (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_battery: Option<String>,
    /// With `on-battery = "stop"`: only once the charge is under this %.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub battery_below: Option<u8>,
    /// Slices that give VRAM back when other programs need it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elastic: Option<bool>,
    /// With elastic: how many slices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices: Option<u32>,
    /// With elastic: the VRAM to keep free for other programs, e.g. "1G".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headroom: Option<String>,
    /// With elastic: seconds free VRAM must stay high before a slice returns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settle: Option<u64>,
    /// With elastic: read free VRAM from this file instead of the GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_file: Option<PathBuf>,
}

/// The settings given as options (the rest stay unset, so a config
/// file's values show through).
impl From<&StartArgs> for Settings {
    fn from(args: &StartArgs) -> Settings {
        Settings {
            backend: args.backend.map(|b| b.to_string()),
            device: args.device.clone(),
            size: args.size.clone(),
            reserve: args.reserve.clone(),
            allocation: args.allocation.map(|a| a.to_string()),
            mapped: args.mapped.map(|m| m.to_string()),
            priority: args.priority,
            nbd: args.nbd.clone(),
            connections: args.connections,
            threads: args.threads,
            plugin: args.plugin.clone(),
            discard: args.no_discard.then_some(false),
            timeout: args.timeout,
            verify: args.verify.then_some(true),
            memtest: args.memtest.then_some(true),
            encrypt: args.encrypt.then_some(true),
            scrub: args.scrub.clone(),
            compress: args.compress.clone(),
            ratio: args.ratio.map(|r| r.to_string()),
            // The power policy is set in the config file only.
            on_battery: None,
            battery_below: None,
            elastic: args.elastic.then_some(true),
            slices: args.slices,
            headroom: args.headroom.clone(),
            settle: args.settle,
            budget_file: args.budget_file.clone(),
        }
    }
}

/// Everything `start` was asked for.
#[derive(Debug, Clone)]
pub struct StartOptions {
    pub name: String,
    pub export: ExportConfig,
    pub priority: i32,
    pub nbd: Option<String>,
    pub connections: u32,
    pub threads: u32,
    pub plugin: Option<PathBuf>,
    pub discard: bool,
    /// How long to wait for nbdkit to open the GPU and answer.
    pub timeout: Duration,
    /// Test the VRAM (one quick memtest pass over `size`) in preflight.
    pub memtest: bool,
    /// Swap on a dm-crypt mapping over the NBD device (`--encrypt`).
    pub encrypt: bool,
    /// The settings these options were made from, kept in `state.json` so
    /// `resume` can start the area again exactly.
    pub settings: Settings,
    /// The group this instance is a member of (one GPU of several).
    pub group: Option<String>,
    /// `--elastic`: slices that give VRAM back.
    pub elastic: Option<ElasticOptions>,
}

/// Where a setting came from, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// `file:line` of each key given in a config file.
    keys: BTreeMap<String, String>,
}

impl Origin {
    /// `/etc/vramswap.toml:4: ` for a key from a file, nothing for a flag.
    fn prefix(&self, key: &str) -> String {
        match self.keys.get(key) {
            Some(at) => format!("{at}: "),
            None => String::new(),
        }
    }

    /// The export's refusal, pointing at where its key was given: `--key
    /// value: why` for a flag, `file:line: key = "value": why` for a
    /// config setting.
    fn refuses(&self, error: ConfigError) -> anyhow::Error {
        match error {
            ConfigError::Value { key, value, why } => {
                anyhow::anyhow!("{}: {why}", self.names(&key, &value))
            }
            other => anyhow::anyhow!("{}{other}", self.prefix(other.key())),
        }
    }

    /// `--key value` for a flag, `file:line: key = "value"` for a config
    /// setting: how an error names a bad value.
    pub fn names(&self, key: &str, value: &str) -> String {
        match self.keys.get(key) {
            Some(at) => format!("{at}: {key} = {value:?}"),
            None => format!("--{key} {value}"),
        }
    }
}

impl Settings {
    /// `self`, with every key that `over` sets replaced by `over`'s.
    pub fn overlay(&self, over: &Settings) -> Settings {
        fn pick<T: Clone>(base: &Option<T>, over: &Option<T>) -> Option<T> {
            over.clone().or_else(|| base.clone())
        }
        Settings {
            backend: pick(&self.backend, &over.backend),
            device: pick(&self.device, &over.device),
            size: pick(&self.size, &over.size),
            reserve: pick(&self.reserve, &over.reserve),
            allocation: pick(&self.allocation, &over.allocation),
            mapped: pick(&self.mapped, &over.mapped),
            priority: pick(&self.priority, &over.priority),
            nbd: pick(&self.nbd, &over.nbd),
            connections: pick(&self.connections, &over.connections),
            threads: pick(&self.threads, &over.threads),
            plugin: pick(&self.plugin, &over.plugin),
            discard: pick(&self.discard, &over.discard),
            timeout: pick(&self.timeout, &over.timeout),
            verify: pick(&self.verify, &over.verify),
            memtest: pick(&self.memtest, &over.memtest),
            encrypt: pick(&self.encrypt, &over.encrypt),
            scrub: pick(&self.scrub, &over.scrub),
            compress: pick(&self.compress, &over.compress),
            ratio: pick(&self.ratio, &over.ratio),
            on_battery: pick(&self.on_battery, &over.on_battery),
            battery_below: pick(&self.battery_below, &over.battery_below),
            elastic: pick(&self.elastic, &over.elastic),
            slices: pick(&self.slices, &over.slices),
            headroom: pick(&self.headroom, &over.headroom),
            settle: pick(&self.settle, &over.settle),
            budget_file: pick(&self.budget_file, &over.budget_file),
        }
    }

    /// Checked options for starting area `name`, defaults filled in. The
    /// plugin keys go through the plugin's own parser, so values mean the
    /// same in the config file, on the command line and to nbdkit.
    pub fn to_options(&self, name: &str, origin: &Origin) -> Result<StartOptions> {
        check_name(name)?;
        let mut export = ExportConfig::default();
        // An elastic area gives VRAM back by discarding slices: chunks
        // must come and go (lazy allocation).
        let allocation = match (self.elastic, self.allocation.as_deref()) {
            (Some(true), Some("eager")) => bail!(
                "{}: excludes --elastic, which gives VRAM back chunk by chunk \
                 (elastic areas allocate lazily)",
                origin.names("allocation", "eager")
            ),
            (Some(true), _) => Some("lazy".to_string()),
            (_, given) => given.map(str::to_string),
        };
        let verify = self
            .verify
            .map(|on| if on { "on" } else { "off" }.to_string());
        for (key, value) in [
            ("backend", &self.backend),
            ("device", &self.device),
            ("size", &self.size),
            ("reserve", &self.reserve),
            ("allocation", &allocation),
            ("mapped", &self.mapped),
            ("verify", &verify),
            ("scrub", &self.scrub),
            ("compress", &self.compress),
            ("ratio", &self.ratio),
        ] {
            if let Some(value) = value {
                export.set(key, value).map_err(|e| origin.refuses(e))?;
            }
        }
        // The rules between keys (size excludes reserve, scrub needs
        // verify) are the export's own: the plugin checks the same.
        export.complete().map_err(|e| origin.refuses(e))?;
        if export.compress.is_on() && self.encrypt == Some(true) {
            bail!(
                "{}: excludes --encrypt: dm-crypt would hand the server ciphertext, \
                 which does not compress (see SECURITY.md)",
                origin.names("compress", export.given("compress").unwrap_or_default())
            );
        }
        let elastic = self.elastic_options(&export, origin)?;
        if let Some(nbd) = &self.nbd {
            crate::nbd::kernel_name(nbd)
                .map_err(|e| anyhow::anyhow!("{}{e}", origin.prefix("nbd")))?;
        }
        let range =
            |key: &str, value: Option<u32>, low: u32, high: u32, default: u32| -> Result<u32> {
                match value {
                    None => Ok(default),
                    Some(v) if (low..=high).contains(&v) => Ok(v),
                    Some(v) => bail!(
                        "{}{key} = {v}: expected {low} to {high}",
                        origin.prefix(key)
                    ),
                }
            };
        if let Some(policy) = self.on_battery.as_deref() {
            if policy != "keep" && policy != "stop" {
                bail!(
                    "{}: expected \"keep\" or \"stop\"",
                    origin.names("on-battery", policy)
                );
            }
        }
        if let Some(percent) = self.battery_below {
            if !(1..=100).contains(&percent) {
                bail!(
                    "{}: expected a charge of 1 to 100 %",
                    origin.names("battery-below", &percent.to_string())
                );
            }
        }
        // swapon(8) takes -1 to 32767.
        let priority = match self.priority {
            None => 50,
            Some(p) if (-1..=32767).contains(&p) => p,
            Some(p) => bail!(
                "{}: expected -1 to 32767",
                origin.names("priority", &p.to_string())
            ),
        };
        Ok(StartOptions {
            name: name.to_string(),
            export,
            priority,
            nbd: self.nbd.clone(),
            connections: range("connections", self.connections, 1, 64, 4)?,
            threads: range("threads", self.threads, 1, 1024, 16)?,
            plugin: self.plugin.clone(),
            discard: self.discard.unwrap_or(true),
            timeout: Duration::from_secs(self.timeout.unwrap_or(300)),
            memtest: self.memtest.unwrap_or(false),
            encrypt: self.encrypt.unwrap_or(false),
            settings: self.clone(),
            group: None,
            elastic,
        })
    }

    /// `--elastic` and its keys, checked: they need it, and it excludes
    /// what would keep a slice's VRAM from going back with its range.
    fn elastic_options(
        &self,
        export: &ExportConfig,
        origin: &Origin,
    ) -> Result<Option<ElasticOptions>> {
        if self.elastic != Some(true) {
            for (key, given) in [
                ("slices", self.slices.is_some()),
                ("headroom", self.headroom.is_some()),
                ("settle", self.settle.is_some()),
                ("budget-file", self.budget_file.is_some()),
            ] {
                if given {
                    bail!("{}{key} needs elastic (--elastic)", origin.prefix(key));
                }
            }
            return Ok(None);
        }
        if export.compress.is_on() {
            bail!(
                "{}: excludes --elastic: compressed pages of every slice share the same \
                 VRAM slabs, so a slice swapped off would give back no VRAM of its own",
                origin.names("compress", export.given("compress").unwrap_or_default())
            );
        }
        if self.encrypt == Some(true) {
            bail!(
                "{}--encrypt excludes --elastic: each slice would need a mapping and a key \
                 of its own",
                origin.prefix("encrypt")
            );
        }
        if let Some(n) = self.slices {
            if !(1..=crate::elastic::SLICES_MAX).contains(&n) {
                bail!(
                    "{}: expected 1 to {}",
                    origin.names("slices", &n.to_string()),
                    crate::elastic::SLICES_MAX
                );
            }
        }
        let headroom = match &self.headroom {
            Some(text) => vramswap::parse_size(text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", origin.names("headroom", text)))?,
            None => crate::elastic::DEFAULT_HEADROOM,
        };
        Ok(Some(ElasticOptions {
            slices: self.slices,
            headroom,
            settle: self
                .settle
                .map_or(crate::elastic::DEFAULT_SETTLE, Duration::from_secs),
            budget_file: self.budget_file.clone(),
        }))
    }
}

/// A number in a config file, as TOML writes it (`2`, `2.5`) or quoted.
fn number_or_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Integer(i64),
        Float(f64),
        Text(String),
    }
    Ok(Some(match Number::deserialize(deserializer)? {
        Number::Integer(n) => n.to_string(),
        Number::Float(x) => x.to_string(),
        Number::Text(text) => text,
    }))
}

/// The areas of every config file read.
#[derive(Debug, Default)]
pub struct Config {
    pub areas: BTreeMap<String, (Settings, Origin)>,
    pub files: Vec<PathBuf>,
}

impl Config {
    /// Reads `file`, or else /etc/vramswap.toml and /etc/vramswap/*.toml
    /// (in name order; an area may be defined only once). Missing default
    /// files are no error; a missing `file` is.
    pub fn load(system: &dyn System, file: Option<&Path>) -> Result<Config> {
        let files: Vec<PathBuf> = match file {
            Some(file) => {
                let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
                if !system.exists(&file) {
                    bail!("{}: no such config file", file.display());
                }
                vec![file]
            }
            None => {
                let mut files = Vec::new();
                if system.exists(Path::new(MAIN_FILE)) {
                    files.push(PathBuf::from(MAIN_FILE));
                }
                let drop_ins = system.list(Path::new(DROP_IN_DIR)).unwrap_or_default();
                files.extend(
                    drop_ins
                        .into_iter()
                        .filter(|n| n.ends_with(".toml"))
                        .map(|n| Path::new(DROP_IN_DIR).join(n)),
                );
                files
            }
        };
        let mut config = Config::default();
        for path in files {
            let text = system
                .read(&path)
                .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
            for (name, (settings, origin)) in parse(&path, &text)? {
                let at = origin.keys.get("[]").cloned().unwrap_or_default();
                if let Some((_, earlier)) = config.areas.get(&name) {
                    bail!(
                        "{at}: area [{name}] is already defined at {}",
                        earlier.keys.get("[]").cloned().unwrap_or_default()
                    );
                }
                config.areas.insert(name, (settings, origin));
            }
            config.files.push(path);
        }
        Ok(config)
    }
}

/// One file's areas. The `"[]"` origin key is where the table starts.
fn parse(path: &Path, text: &str) -> Result<BTreeMap<String, (Settings, Origin)>> {
    let at = |offset: usize| format!("{}:{}", path.display(), line_of(text, offset));
    let tables: BTreeMap<String, toml::Value> = toml::from_str(text).map_err(|e| {
        let place = e
            .span()
            .map_or_else(|| path.display().to_string(), |s| at(s.start));
        anyhow::anyhow!("{place}: {}", e.message().trim())
    })?;
    let mut areas = BTreeMap::new();
    for (name, value) in tables {
        let header = find_header(text, &name);
        let Some(table) = value.as_table() else {
            bail!(
                "{}: '{name}' must be an [area] table, e.g. [{name}] then its keys",
                at(header.unwrap_or(0))
            );
        };
        if let Err(e) = check_name(&name) {
            bail!("{}: {e}", at(header.unwrap_or(0)));
        }
        let mut origin = Origin::default();
        origin.keys.insert("[]".into(), at(header.unwrap_or(0)));
        for key in table.keys() {
            if let Some(offset) = find_key(text, header, key) {
                origin.keys.insert(key.clone(), at(offset));
            }
        }
        let settings: Settings =
            toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| {
                    // The error does not always name its key: find the key that
                    // fails on its own, for its line.
                    let key = table.iter().find_map(|(key, value)| {
                        let alone = toml::Table::from_iter([(key.clone(), value.clone())]);
                        toml::Value::Table(alone)
                            .try_into::<Settings>()
                            .is_err()
                            .then_some(key.as_str())
                    });
                    let place = key
                        .and_then(|k| origin.keys.get(k))
                        .or_else(|| origin.keys.get("[]"))
                        .cloned()
                        .unwrap_or_default();
                    anyhow::anyhow!("{place}: [{name}]: {}", e.message().trim())
                })?;
        areas.insert(name, (settings, origin));
    }
    Ok(areas)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Byte offset of the `[name]` header line.
fn find_header(text: &str, name: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[')
            && t.trim_start_matches('[').split(']').next().map(str::trim) == Some(name)
        {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// Byte offset of `key = …` inside the table that starts at `header`.
fn find_key(text: &str, header: Option<usize>, key: &str) -> Option<usize> {
    let start = header?;
    let mut offset = start;
    for (i, line) in text[start..].split_inclusive('\n').enumerate() {
        let t = line.trim_start();
        if i > 0 && t.starts_with('[') {
            return None;
        }
        if t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::fake::FakeSystem;

    const GOOD: &str = "\
# two areas
[default]
size = \"16G\"
priority = 60

[scratch]
device = \"1\"
allocation = \"lazy\"
size = \"32G\"
discard = false
verify = true
memtest = true
";

    #[test]
    fn areas_load_with_defaults_filled_in() {
        let system = FakeSystem::new();
        system.fixture(MAIN_FILE, GOOD);
        system.fixture(
            "/etc/vramswap/extra.toml",
            "[gpu2]\nreserve = \"1G\"\nconnections = 8\n",
        );
        system.fixture("/etc/vramswap/README", "not toml");
        let config = Config::load(&system, None).unwrap();
        assert_eq!(
            config.areas.keys().collect::<Vec<_>>(),
            ["default", "gpu2", "scratch"]
        );
        let (settings, origin) = &config.areas["scratch"];
        let options = settings.to_options("scratch", origin).unwrap();
        assert_eq!(options.export.size, Some(32 << 30));
        assert_eq!(options.export.allocation, vramswap::AllocationPolicy::Lazy);
        assert!(!options.discard);
        assert!(options.export.verify && options.memtest);
        assert_eq!(
            (options.priority, options.connections, options.threads),
            (50, 4, 16)
        );
        let (settings, origin) = &config.areas["gpu2"];
        assert_eq!(settings.to_options("gpu2", origin).unwrap().connections, 8);
    }

    #[test]
    fn compression_is_read_from_the_file_with_its_ratio_as_written() {
        let system = FakeSystem::new();
        system.fixture(
            MAIN_FILE,
            "[a]\nsize = \"8G\"\ncompress = \"zstd:3\"\nratio = 2.5\n[b]\ncompress = \"lz4\"\nratio = \"3\"\n",
        );
        let config = Config::load(&system, None).unwrap();
        let (settings, origin) = &config.areas["a"];
        let export = settings.to_options("a", origin).unwrap().export;
        assert_eq!(
            export.to_args(),
            ["size=8589934592", "compress=zstd:3", "ratio=2.5"]
        );
        let (settings, origin) = &config.areas["b"];
        assert_eq!(settings.ratio.as_deref(), Some("3"));
        let export = settings.to_options("b", origin).unwrap().export;
        assert_eq!(export.to_args(), ["compress=lz4", "ratio=3"]);
        // As flags, the refusal names the flags.
        let both = Settings {
            compress: Some("lz4".into()),
            encrypt: Some(true),
            ..Settings::default()
        };
        let err = both
            .to_options("c", &Origin::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--compress lz4: excludes --encrypt"),
            "{err}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let system = FakeSystem::new();
        system.fixture(MAIN_FILE, GOOD);
        let config = Config::load(&system, None).unwrap();
        let (file, _) = &config.areas["default"];
        let flags = Settings {
            priority: Some(5),
            device: Some("0".into()),
            ..Default::default()
        };
        let merged = file.overlay(&flags);
        assert_eq!(merged.priority, Some(5));
        assert_eq!(merged.size.as_deref(), Some("16G"));
        assert_eq!(merged.device.as_deref(), Some("0"));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        for (text, needle) in [
            (
                "[a]\nsize = \"8G\"\ncolour = \"blue\"\n",
                "/etc/vramswap.toml:3: [a]: unknown field `colour`",
            ),
            (
                "[a]\nsize = \"8G\"\npriority = \"high\"\n",
                "/etc/vramswap.toml:3: [a]: invalid type",
            ),
            ("[a]\nsize = \"8G\n", "/etc/vramswap.toml:2:"),
            (
                "size = \"8G\"\n",
                "/etc/vramswap.toml:1: 'size' must be an [area] table",
            ),
            (
                "[a]\n\nsize = \"lots\"\n",
                "/etc/vramswap.toml:3: size = \"lots\": 'lots' is not a size",
            ),
            (
                "[a]\nbackend = \"opencl\"\n",
                "/etc/vramswap.toml:2: backend = \"opencl\": unknown backend",
            ),
            (
                "[a]\nsize = \"8G\"\nreserve = \"1G\"\n",
                "/etc/vramswap.toml:3: size=8 GiB and reserve=1 GiB exclude each other",
            ),
            (
                "[a]\nconnections = 0\n",
                "/etc/vramswap.toml:2: connections = 0: expected 1 to 64",
            ),
            (
                "[a]\nnbd = \"/dev/sda\"\n",
                "/etc/vramswap.toml:2: '/dev/sda' is not an NBD device",
            ),
            (
                "[\"bad name\"]\nsize = \"8G\"\n",
                "/etc/vramswap.toml:1: invalid name 'bad name'",
            ),
            (
                "[a]\nscrub = \"24h\"\n",
                "/etc/vramswap.toml:2: scrub = \"24h\": needs verify",
            ),
            (
                "[a]\nverify = true\nscrub = \"often\"\n",
                "/etc/vramswap.toml:3: scrub = \"often\": expected a duration",
            ),
            (
                "[a]\ncompress = \"gzip\"\n",
                "/etc/vramswap.toml:2: compress = \"gzip\": 'gzip' is not a compression",
            ),
            (
                "[a]\ncompress = \"lz4\"\nratio = 9.5\n",
                "/etc/vramswap.toml:3: ratio = \"9.5\": '9.5' is not a ratio",
            ),
            (
                "[a]\nratio = 3\n",
                "/etc/vramswap.toml:2: ratio = \"3\": needs compress=",
            ),
            (
                "[a]\ncompress = \"zstd\"\nencrypt = true\n",
                "/etc/vramswap.toml:2: compress = \"zstd\": excludes --encrypt",
            ),
            (
                "[a]\non-battery = \"sometimes\"\n",
                "/etc/vramswap.toml:2: on-battery = \"sometimes\": expected \"keep\" or \"stop\"",
            ),
            (
                "[a]\nbattery-below = 0\n",
                "/etc/vramswap.toml:2: battery-below = \"0\": expected a charge of 1 to 100 %",
            ),
        ] {
            let system = FakeSystem::new();
            system.fixture(MAIN_FILE, text);
            let err = Config::load(&system, None)
                .and_then(|c| {
                    let (s, o) = c.areas.values().next().expect("an area");
                    s.to_options("a", o).map(|_| ())
                })
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn flags_that_break_the_exports_rules_are_named_as_flags() {
        let both = Settings {
            size: Some("8G".into()),
            reserve: Some("1G".into()),
            ..Settings::default()
        };
        let scrub = Settings {
            scrub: Some("24h".into()),
            ..Settings::default()
        };
        for (flags, expected) in [
            (
                both,
                "size=8 GiB and reserve=1 GiB exclude each other: reserve only applies when the size is automatic",
            ),
            (
                scrub,
                "--scrub 24h: needs verify=on (the scrub checks blocks against their checksums)",
            ),
        ] {
            let err = flags.to_options("a", &Origin::default()).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn an_area_defined_twice_is_refused() {
        let system = FakeSystem::new();
        system.fixture(MAIN_FILE, "[a]\nsize = \"1G\"\n");
        system.fixture("/etc/vramswap/b.toml", "\n[a]\nsize = \"2G\"\n");
        let err = Config::load(&system, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "/etc/vramswap/b.toml:2: area [a] is already defined at /etc/vramswap.toml:1"
        );
    }
}
