//! Free VRAM as NVML reports it, for the swap watcher ([`crate::budget`]).
//!
//! NVML reads the driver's own accounting and needs no CUDA context, which
//! would itself take hundreds of MiB of the VRAM it measures.
//! `libnvidia-ml.so.1` ships with the NVIDIA driver; it is loaded with
//! `dlopen` at first use and stays loaded, so a build with the CUDA backend
//! still runs where it is missing (the budget then falls back).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use crate::backend::{c_chars, format_uuid, BackendKind};
use crate::budget::{BudgetError, VramBudget};

const LIBRARY: &CStr = c"libnvidia-ml.so.1";

/// `NVML_ERROR_NOT_FOUND`: no GPU has the UUID asked for.
const NOT_FOUND: c_int = 6;

/// `NVML_DEVICE_NAME_V2_BUFFER_SIZE`: room for any device's name.
const NAME_LEN: usize = 96;

/// `nvmlDevice_t`, an opaque pointer.
type Device = *mut c_void;

/// `nvmlMemory_t`, which `nvmlDeviceGetMemoryInfo` fills.
#[repr(C)]
#[derive(Default)]
struct Memory {
    _total: u64,
    free: u64,
    _used: u64,
}

/// The NVML entry points this file calls, with the signatures `nvml.h`
/// gives them.
struct Library {
    init: unsafe extern "C" fn() -> c_int,
    shutdown: unsafe extern "C" fn() -> c_int,
    handle_by_uuid: unsafe extern "C" fn(*const c_char, *mut Device) -> c_int,
    name: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int,
    memory_info: unsafe extern "C" fn(Device, *mut Memory) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl Library {
    /// The library, loaded once per process; a missing library or symbol
    /// stays missing for the process's life.
    fn get() -> Result<&'static Library, BudgetError> {
        static LOADED: OnceLock<Result<Library, (&'static str, String)>> = OnceLock::new();
        match LOADED.get_or_init(Library::load) {
            Ok(library) => Ok(library),
            Err((call, detail)) => Err(BudgetError::QueryFailed {
                call,
                detail: detail.clone(),
            }),
        }
    }

    fn load() -> Result<Library, (&'static str, String)> {
        // SAFETY: dlopen of a NUL-terminated name; the library's
        // initialisers are the NVIDIA driver's, trusted like any system
        // library's. It is never closed, so its symbols stay valid.
        let handle = unsafe { libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(("dlopen", dl_error()));
        }
        let symbol = |name: &CStr| {
            // SAFETY: `handle` came from dlopen and is never closed; the
            // name is NUL-terminated.
            let found = unsafe { libc::dlsym(handle, name.as_ptr()) };
            if found.is_null() {
                return Err((
                    "dlsym",
                    format!(
                        "{} lacks {}",
                        LIBRARY.to_string_lossy(),
                        name.to_string_lossy()
                    ),
                ));
            }
            Ok(found)
        };
        // SAFETY: each symbol is the function `nvml.h` declares under that
        // name, with the signature its field spells; the library stays
        // loaded for the process's life.
        unsafe {
            Ok(Library {
                init: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(symbol(
                    c"nvmlInit_v2",
                )?),
                shutdown: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(
                    symbol(c"nvmlShutdown")?,
                ),
                handle_by_uuid: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*const c_char, *mut Device) -> c_int,
                >(symbol(c"nvmlDeviceGetHandleByUUID")?),
                name: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int,
                >(symbol(c"nvmlDeviceGetName")?),
                memory_info: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Device, *mut Memory) -> c_int,
                >(symbol(c"nvmlDeviceGetMemoryInfo")?),
                error_string: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(c_int) -> *const c_char,
                >(symbol(c"nvmlErrorString")?),
            })
        }
    }

    /// `status` (an `nvmlReturn_t`) as a result, naming the call.
    fn check(&self, call: &'static str, status: c_int) -> Result<(), BudgetError> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: nvmlErrorString takes any status and returns a static
        // string, read before any other call.
        let text = unsafe {
            let text = (self.error_string)(status);
            (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
        };
        Err(BudgetError::QueryFailed {
            call,
            detail: format!(
                "{} (NVML error {status})",
                text.as_deref().unwrap_or("unknown")
            ),
        })
    }
}

/// Why the last dl call on this thread failed.
fn dl_error() -> String {
    // SAFETY: dlerror's string stays valid until the next dl call on this
    // thread; it is copied at once.
    unsafe {
        let text = libc::dlerror();
        if text.is_null() {
            return format!("{} not loaded", LIBRARY.to_string_lossy());
        }
        CStr::from_ptr(text).to_string_lossy().into_owned()
    }
}

/// One `nvmlInit_v2`, balanced by `nvmlShutdown` on drop: NVML counts
/// them and shuts down at the last.
struct Session(&'static Library);

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: balances the `nvmlInit_v2` that made this session.
        let _ = unsafe { (self.0.shutdown)() };
    }
}

/// One NVIDIA GPU's free VRAM, read through NVML at each call.
pub(crate) struct NvmlBudget {
    session: Session,
    device: Device,
    name: String,
}

// SAFETY: NVML is thread-safe, and a device handle is valid on any thread
// until the last `nvmlShutdown`, which this budget's own session holds off.
unsafe impl Send for NvmlBudget {}

impl NvmlBudget {
    /// Finds the GPU with `uuid`.
    pub(crate) fn open(uuid: &[u8; 16]) -> Result<Self, BudgetError> {
        let library = Library::get()?;
        // SAFETY: an entry point of the loaded library, taking nothing.
        library.check("nvmlInit_v2", unsafe { (library.init)() })?;
        let session = Session(library);
        // NVML spells a GPU's UUID as nvidia-smi prints it.
        let text = format!("GPU-{}\0", format_uuid(uuid));
        let mut device: Device = std::ptr::null_mut();
        // SAFETY: NVML is initialised; `text` is NUL-terminated and the
        // out-pointer valid.
        let status = unsafe { (library.handle_by_uuid)(text.as_ptr().cast(), &mut device) };
        if status == NOT_FOUND {
            return Err(BudgetError::NoDevice {
                backend: BackendKind::Cuda,
                uuid: format_uuid(uuid),
            });
        }
        library.check("nvmlDeviceGetHandleByUUID", status)?;
        let mut name = [0 as c_char; NAME_LEN];
        // SAFETY: a handle NVML just gave; the buffer's length goes with it.
        library.check("nvmlDeviceGetName", unsafe {
            (library.name)(device, name.as_mut_ptr(), NAME_LEN as c_uint)
        })?;
        Ok(NvmlBudget {
            session,
            device,
            name: c_chars(&name),
        })
    }
}

impl VramBudget for NvmlBudget {
    fn free(&mut self) -> Result<u64, BudgetError> {
        let library = self.session.0;
        let mut memory = Memory::default();
        // SAFETY: a handle of this budget's session; the out-pointer is
        // valid.
        library.check("nvmlDeviceGetMemoryInfo", unsafe {
            (library.memory_info)(self.device, &mut memory)
        })?;
        Ok(memory.free)
    }

    fn source(&self) -> String {
        format!("NVML ({})", self.name)
    }
}
