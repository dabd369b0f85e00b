//! `nbdkit vramswap`: a block device whose bytes live in GPU video memory.
//!
//! A thin adapter: keys are parsed by the core's [`ExportConfig`], the
//! device and the size are checked before nbdkit forks (in a child of its
//! own, see [`prefork`]), the GPU is opened after the fork, and every
//! callback is one [`BlockStore`] call with its error mapped to an errno.
//! See `nbdkit vramswap --help`.
//!
//! No panic may cross into nbdkit: the `nbdkit` crate's C entry points are
//! plain `extern fn`s, where an unwinding panic aborts the server — and with
//! it every page swapped out to it. Every callback body runs under
//! [`guarded`], which turns a panic into EIO for that one request.

mod daemon;
mod health;
mod log;
mod prefork;
mod safety;
mod scrub;
mod warmup;

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use nbdkit::{
    plugin, CacheFlags, Error, ExtentHandle, ExtentType, Flags, FuaFlags, Result, Server,
    ThreadModel,
};
use tracing::{error, info, warn};
use vramswap::backend::{self, BackendKind, BLOCK_SIZE};
use vramswap::export::HELP;
use vramswap::placement::{self, PlacementError};
use vramswap::{BlockStore, ByteSize, ExportConfig, StoreError};

/// Parameters, filled by `config` before nbdkit forks.
static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);
/// The store, opened in `after_fork`, dropped (VRAM given back) in `unload`.
static STORE: RwLock<Option<Arc<BlockStore>>> = RwLock::new(None);
/// The process `get_ready` ran in: `after_fork` in another one means
/// nbdkit forked into the background.
static READY_PID: AtomicU32 = AtomicU32::new(0);

#[derive(Default)]
struct Settings {
    export: ExportConfig,
    /// `inject-panic-at=OFFSET` (test builds): a read or write that touches
    /// this offset panics inside the plugin.
    #[cfg(feature = "fault-injection")]
    inject_panic_at: Option<u64>,
    /// `inject-alloc-fail-from=N`, `inject-batch-fail-at=N`,
    /// `inject-lost-from-batch=N`, `inject-corrupt-upload-at=N` (test
    /// builds): see `backend::faulty`.
    #[cfg(feature = "fault-injection")]
    faults: vramswap::backend::faulty::FaultPlan,
}

fn settings() -> MutexGuard<'static, Option<Settings>> {
    SETTINGS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One connection. All connections share the store, so data written on
/// one is read on every other (multi-conn).
struct VramSwap {
    store: Arc<BlockStore>,
    /// `warm-up=`: this connection's barrier.
    warm_up: Option<warmup::Barrier>,
    /// `direct=on`: reads go straight into nbdkit's request buffer.
    direct: bool,
    /// Counted while connected: a storage daemon's quit waits for the last.
    _client: daemon::Connection,
    #[cfg(feature = "fault-injection")]
    inject_panic_at: Option<u64>,
}

/// Runs a callback body; a panic becomes EIO for this request only.
fn guarded<T>(what: &str, body: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let reason = panic_text(payload.as_ref());
        error!("{what}: internal error ({reason}); this request fails with EIO, the server keeps serving");
        health::record(health::Event::Panic, &STORE);
        Err(Error::new(libc::EIO, format!("{what}: internal error")))
    })
}

fn panic_text(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

impl VramSwap {
    /// A store error as nbdkit reports it, counted for `vramswap status`.
    fn error(&self, err: StoreError) -> Error {
        let errno = err.errno();
        if matches!(err, StoreError::Checksum { .. }) {
            health::record(health::Event::Checksum, &STORE);
        }
        health::record(health::Event::Failed(errno), &STORE);
        Error::new(errno, err.to_string())
    }
}

/// NBD requests are at most 4 GiB - 1 (`u32` count).
fn len(count: u32) -> u64 {
    u64::from(count)
}

impl VramSwap {
    #[cfg(feature = "fault-injection")]
    fn inject(&self, offset: u64, count: u64) {
        if let Some(at) = self.inject_panic_at {
            if (offset..offset + count).contains(&at) {
                panic!("inject-panic-at={at}: injected panic");
            }
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    fn inject(&self, _offset: u64, _count: u64) {}
}

/// The parameters, as `config` and `config_complete` left them.
fn export() -> ExportConfig {
    settings()
        .as_ref()
        .map(|s| s.export.clone())
        .unwrap_or_default()
}

/// A refusal to start, said where whoever started nbdkit looks: nbdkit's
/// own log (stderr in the foreground, syslog once forked) through the
/// returned error, `VRAMSWAP_LOG_FILE` for `vramswap start`, and stderr
/// when nbdkit forked but keeps it open (`-v`).
fn refuse(line: String) -> Error {
    log::append_to_file(&format!("error: {line}"));
    if READY_PID.load(Ordering::Relaxed) != std::process::id() {
        eprintln!("nbdkit: vramswap: error: {line}");
    }
    Error::new(libc::EINVAL, line)
}

/// Opens the GPU and the store: runs in the process that will serve, after
/// nbdkit forked into the background (GPU contexts do not survive a fork).
/// Errors name the parameter to change, as the user wrote it.
fn open_store() -> std::result::Result<BlockStore, PlacementError> {
    let export = export();
    let kind = placement::pick_backend(&export)?;
    let gpu: std::sync::Arc<dyn vramswap::Backend> = backend::open(kind, &export.open_options())
        .map_err(|e| PlacementError::backend(&export, kind, e))?;
    #[cfg(feature = "fault-injection")]
    let gpu = match settings().as_ref().map(|s| s.faults) {
        Some(plan) if plan != Default::default() => {
            std::sync::Arc::new(vramswap::backend::faulty::FaultyBackend::new(gpu, plan))
        }
        _ => gpu,
    };
    let info = gpu.device().clone();
    let store = BlockStore::open(gpu, &export.store_config())
        .map_err(|e| PlacementError::store(&export, e))?;
    if let Some(why) = backend::caution(kind, &info) {
        warn!("backend={kind} on {}: {why}", info.name);
    }
    info!(
        "serving {} of {} ({}, {}) on {kind}, {} allocation",
        ByteSize(store.size()),
        info.name,
        info.uuid_string(),
        info.pci_bus_id.as_deref().unwrap_or("no PCI id"),
        store.allocation()
    );
    Ok(store)
}

impl Server for VramSwap {
    fn name() -> &'static str {
        "vramswap"
    }

    fn longname() -> Option<&'static str> {
        Some("vramswap: a block device in GPU video memory")
    }

    fn description() -> Option<&'static str> {
        Some("Serves GPU VRAM as a block device, for swap or scratch space.")
    }

    fn version() -> Option<&'static str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    /// `nbdkit vramswap 8G` means `size=8G`.
    fn magic_config_key() -> Option<&'static str> {
        Some("size")
    }

    fn config_help() -> Option<&'static str> {
        Some(HELP)
    }

    fn load() {
        log::init();
    }

    fn unload() {
        // Gives the VRAM back before nbdkit exits, once every thread of ours
        // that used the GPU has exited (nbdkit has joined its own by now).
        let store = STORE.write().unwrap_or_else(PoisonError::into_inner).take();
        scrub::stop();
        drop(store);
    }

    fn dump_plugin() {
        let built: Vec<&str> = BackendKind::compiled_in()
            .iter()
            .map(|k| k.name())
            .collect();
        let lines = format!(
            "vramswap_backends={}\nvramswap_block_size={BLOCK_SIZE}\nvramswap_chunk_size={}\n",
            built.join(","),
            backend::CHUNK_SIZE
        );
        if let Ok(text) = std::ffi::CString::new(lines) {
            // nbdkit prints its own fields through C stdio; printing ours the
            // same way keeps them after nbdkit's, in order.
            // SAFETY: "%s" with one valid NUL-terminated string.
            unsafe { libc::printf(c"%s".as_ptr(), text.as_ptr()) };
        }
    }

    fn config(key: &str, value: &str) -> Result<()> {
        guarded("config", || {
            let mut guard = settings();
            let settings = guard.get_or_insert_with(Settings::default);
            #[cfg(feature = "fault-injection")]
            if key.starts_with("inject-") {
                let n = Some(
                    vramswap::parse_size(value)
                        .map_err(|e| Error::new(libc::EINVAL, format!("{key}={value}: {e}")))?,
                );
                match key {
                    "inject-panic-at" => settings.inject_panic_at = n,
                    "inject-alloc-fail-from" => settings.faults.alloc_fails_from = n,
                    "inject-batch-fail-at" => settings.faults.batch_fails_at = n,
                    "inject-lost-from-batch" => settings.faults.lost_from_batch = n,
                    "inject-corrupt-upload-at" => settings.faults.corrupt_upload_at = n,
                    _ => {
                        return Err(Error::new(
                            libc::EINVAL,
                            format!("unknown parameter '{key}'"),
                        ))
                    }
                }
                return Ok(());
            }
            settings
                .export
                .set(key, value)
                .map_err(|e| Error::new(libc::EINVAL, e.to_string()))
        })
    }

    fn config_complete() -> Result<()> {
        guarded("config", || {
            let mut guard = settings();
            let settings = guard.get_or_insert_with(Settings::default);
            settings
                .export
                .complete()
                .map_err(|e| Error::new(libc::EINVAL, e.to_string()))?;
            // Still one thread: the environment may be set.
            #[cfg(feature = "vulkan")]
            {
                let held = vramswap::backend::vulkan::hold_back_unused(&settings.export.device);
                if !held.is_empty() {
                    info!(
                        "Vulkan drivers for hardware this machine lacks are not loaded: {}",
                        held.join(", ")
                    );
                }
            }
            Ok(())
        })
    }

    fn thread_model() -> Result<ThreadModel> {
        Ok(ThreadModel::Parallel)
    }

    /// Refuses a device that is not there or a size that does not fit it
    /// while nbdkit can still exit non-zero: before it forks.
    fn get_ready() -> Result<()> {
        guarded("startup", || {
            READY_PID.store(std::process::id(), Ordering::Relaxed);
            let export = export();
            prefork::run(|| {
                placement::place(&export)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .map_err(refuse)
        })
    }

    /// Opens the device for real. Should that fail now (the device went
    /// away since `get_ready`), nbdkit exits 1 (nbdkit 1.32
    /// `plugin_after_fork`): the reason is in the log file and syslog.
    fn after_fork() -> Result<()> {
        guarded("startup", || {
            safety::harden_process();
            let store = open_store().map_err(|e| refuse(e.to_string()))?;
            if export().storage_daemon {
                daemon::start().map_err(|e| {
                    refuse(format!(
                        "storage-daemon=on: cannot take over the quit signals: {e}"
                    ))
                })?;
            }
            *STORE.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(store));
            health::write(&STORE);
            health::start_flusher(&STORE);
            let scrub = settings().as_ref().and_then(|s| s.export.scrub);
            if let Some(period) = scrub {
                info!("scrub: every written block is checked once per {period:?}");
                scrub::start(&STORE, period);
            }
            // Last: every library the GPU driver loads is in by now.
            safety::lock_mapped_files();
            Ok(())
        })
    }

    fn open(_readonly: bool) -> Result<Box<dyn Server>> {
        guarded("open", || {
            let store = STORE
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .ok_or_else(|| Error::new(libc::EIO, "the VRAM store is not open"))?;
            let settings = settings();
            let settings = settings.as_ref();
            Ok(Box::new(VramSwap {
                store,
                warm_up: settings
                    .and_then(|s| s.export.warm_up)
                    .map(warmup::Barrier::new),
                direct: settings.is_some_and(|s| s.export.direct),
                _client: daemon::Connection::open(),
                #[cfg(feature = "fault-injection")]
                inject_panic_at: settings.and_then(|s| s.inject_panic_at),
            }) as Box<dyn Server>)
        })
    }

    fn get_size(&self) -> Result<i64> {
        Ok(self.store.size() as i64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        guarded("pread", || {
            if let Some(barrier) = &self.warm_up {
                if barrier.read(buf.len()) {
                    health::write(&STORE);
                }
            }
            self.inject(offset, buf.len() as u64);
            if self.direct {
                // nbdkit's per-thread buffer: reused, moved only to grow
                // (with no filter between, which `direct=` leaves to the
                // one who sets it).
                self.store
                    .read_direct(buf, offset)
                    .map_err(|e| self.error(e))
            } else {
                self.store.read(buf, offset).map_err(|e| self.error(e))
            }
        })
    }

    /// Writes are in VRAM when this returns, so FUA needs nothing more.
    fn write_at(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        guarded("pwrite", || {
            self.inject(offset, buf.len() as u64);
            self.store.write(buf, offset).map_err(|e| self.error(e))
        })
    }

    /// Nothing is cached between a request and VRAM.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, count: u32, offset: u64, _flags: Flags) -> Result<()> {
        guarded("trim", || {
            self.store
                .zero(offset, len(count))
                .map_err(|e| self.error(e))
        })
    }

    /// Always fast: whole blocks are only marked, partial ones written.
    fn zero(&self, count: u32, offset: u64, _flags: Flags) -> Result<()> {
        guarded("zero", || {
            self.store
                .zero(offset, len(count))
                .map_err(|e| self.error(e))
        })
    }

    fn extents(
        &self,
        count: u32,
        offset: u64,
        _flags: Flags,
        extents: &mut ExtentHandle,
    ) -> Result<()> {
        guarded("extents", || {
            let mut result = Ok(());
            self.store
                .extents(offset, len(count), |at, length, data| {
                    if result.is_ok() {
                        let kind = if data {
                            ExtentType::Allocated
                        } else {
                            ExtentType::HoleZero
                        };
                        result = extents.add(at, length, kind);
                    }
                })
                .map_err(|e| self.error(e))?;
            result
        })
    }

    fn can_write(&self) -> Result<bool> {
        Ok(true)
    }

    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }

    fn can_fua(&self) -> Result<FuaFlags> {
        Ok(FuaFlags::Native)
    }

    fn can_trim(&self) -> Result<bool> {
        Ok(true)
    }

    fn can_zero(&self) -> Result<bool> {
        Ok(true)
    }

    fn can_fast_zero(&self) -> Result<bool> {
        Ok(true)
    }

    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }

    /// Every connection sees every other's writes at once: the store is
    /// shared and writes complete before they are answered.
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }

    /// Data is already as close as it gets; a cache request is a no-op.
    fn can_cache(&self) -> Result<CacheFlags> {
        Ok(CacheFlags::Native)
    }

    fn cache(&self, _count: u32, _offset: u64) -> Result<()> {
        Ok(())
    }

    fn is_rotational(&self) -> Result<bool> {
        Ok(false)
    }
}

plugin!(VramSwap {
    load,
    unload,
    dump_plugin,
    config,
    config_complete,
    config_help,
    thread_model,
    get_ready,
    after_fork,
    write_at,
    flush,
    trim,
    zero,
    extents,
    cache,
    can_cache,
    can_write,
    can_flush,
    can_fua,
    can_trim,
    can_zero,
    can_fast_zero,
    can_extents,
    can_multi_conn,
    is_rotational
});
