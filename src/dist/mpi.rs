//! Open MPI, loaded at run time. `libmpi.so.40` is opened with `dlopen` only when the process was
//! started by `mpirun` (`OMPI_COMM_WORLD_SIZE` > 1), so a plain `lmforge` needs no MPI library,
//! and one binary serves both (no cargo feature, no headers or libclang at build time).
//!
//! Open MPI's handles are pointers to objects the library exports (`MPI_COMM_WORLD` is
//! `&ompi_mpi_comm_world`, `MPI_FLOAT` is `&ompi_mpi_float`, `MPI_IN_PLACE` is `(void *) 1`):
//! its ABI since 1.x, which `mpi.h` of Open MPI 3, 4 and 5 spells out. MPICH's handles are
//! integers with other values; its ABI is not spoken here (refused by name in `super::init`).
//! The library is opened `RTLD_GLOBAL` because Open MPI's own plugins resolve their symbols
//! against it.

use anyhow::{bail, Context, Result};
use libloading::os::unix::{Library, Symbol, RTLD_GLOBAL, RTLD_NOW};
use std::ffi::{c_char, c_int, c_void};

type Handle = *mut c_void;

/// The functions and handles lmforge uses, resolved once.
pub struct Mpi {
    _lib: Library,
    comm_world: Handle,
    float: Handle,
    double: Handle,
    uint64: Handle,
    byte: Handle,
    op_sum: Handle,
    allreduce:
        unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Handle, Handle, Handle) -> c_int,
    bcast: unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, Handle) -> c_int,
    barrier: unsafe extern "C" fn(Handle) -> c_int,
    abort: unsafe extern "C" fn(Handle, c_int) -> c_int,
    finalize: unsafe extern "C" fn() -> c_int,
    pub rank: usize,
    pub size: usize,
}

// The handles are addresses of the library's static objects, valid for its lifetime; lmforge
// calls MPI from one thread at a time (MPI_THREAD_FUNNELED).
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

// Open MPI: `#define MPI_IN_PLACE ((void *) 1)`.
const IN_PLACE: *const c_void = std::ptr::without_provenance(1);
const THREAD_FUNNELED: c_int = 1;
/// MPI's `int` counts: buffers are sent in pieces of at most this many elements.
const MAX_COUNT: usize = 1 << 30;

impl Mpi {
    /// Opens the library (`LMFORGE_MPI_LIB`, else `libmpi.so.40`, else `libmpi.so`) and calls
    /// `MPI_Init_thread`.
    pub fn open() -> Result<Self> {
        let names = match std::env::var("LMFORGE_MPI_LIB") {
            Ok(n) => vec![n],
            Err(_) => vec!["libmpi.so.40".to_string(), "libmpi.so".to_string()],
        };
        let mut errors = Vec::new();
        let lib = names.iter().find_map(|n| {
            // SAFETY: loading a shared library runs its initialisers; Open MPI's are benign.
            match unsafe { Library::open(Some(n), RTLD_NOW | RTLD_GLOBAL) } {
                Ok(l) => Some(l),
                Err(e) => {
                    errors.push(format!("{n}: {e}"));
                    None
                }
            }
        });
        let Some(lib) = lib else {
            bail!(
                "started by mpirun, but Open MPI's library cannot be loaded ({}); install it \
                 (scripts/setup_mpi.sh) or point LMFORGE_MPI_LIB at libmpi.so",
                errors.join("; ")
            );
        };
        // SAFETY: each symbol is looked up by its C name and given the prototype mpi.h declares.
        unsafe {
            let object = |name: &str| -> Result<Handle> {
                let s: Symbol<*mut c_void> = lib.get(name.as_bytes()).with_context(|| {
                    format!("the MPI library has no `{name}`: not Open MPI (lmforge speaks Open MPI's ABI)")
                })?;
                Ok(s.into_raw() as Handle)
            };
            macro_rules! func {
                ($name:literal) => {
                    *lib.get($name.as_bytes())
                        .with_context(|| format!("the MPI library has no {}", $name))?
                };
            }
            let init: unsafe extern "C" fn(
                *mut c_int,
                *mut *mut *mut c_char,
                c_int,
                *mut c_int,
            ) -> c_int = func!("MPI_Init_thread");
            let comm_rank: unsafe extern "C" fn(Handle, *mut c_int) -> c_int =
                func!("MPI_Comm_rank");
            let comm_size: unsafe extern "C" fn(Handle, *mut c_int) -> c_int =
                func!("MPI_Comm_size");
            let mut m = Self {
                comm_world: object("ompi_mpi_comm_world")?,
                float: object("ompi_mpi_float")?,
                double: object("ompi_mpi_double")?,
                uint64: object("ompi_mpi_uint64_t")?,
                byte: object("ompi_mpi_byte")?,
                op_sum: object("ompi_mpi_op_sum")?,
                allreduce: func!("MPI_Allreduce"),
                bcast: func!("MPI_Bcast"),
                barrier: func!("MPI_Barrier"),
                abort: func!("MPI_Abort"),
                finalize: func!("MPI_Finalize"),
                rank: 0,
                size: 1,
                _lib: lib,
            };
            let mut provided = 0;
            check(
                init(
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    THREAD_FUNNELED,
                    &mut provided,
                ),
                "MPI_Init_thread",
            )?;
            let (mut rank, mut size) = (0, 0);
            check(comm_rank(m.comm_world, &mut rank), "MPI_Comm_rank")?;
            check(comm_size(m.comm_world, &mut size), "MPI_Comm_size")?;
            m.rank = rank as usize;
            m.size = size as usize;
            Ok(m)
        }
    }

    fn allreduce(&self, buf: *mut c_void, n: usize, elem: usize, ty: Handle) -> Result<()> {
        for start in (0..n).step_by(MAX_COUNT) {
            let k = (n - start).min(MAX_COUNT);
            // SAFETY: `buf` holds `n` elements of `ty`; in place, summed by every rank.
            let rc = unsafe {
                (self.allreduce)(
                    IN_PLACE,
                    (buf as *mut u8).add(start * elem) as *mut c_void,
                    k as c_int,
                    ty,
                    self.op_sum,
                    self.comm_world,
                )
            };
            check(rc, "MPI_Allreduce")?;
        }
        Ok(())
    }

    /// Element-wise sum over the ranks, in place.
    pub fn sum_f32(&self, xs: &mut [f32]) -> Result<()> {
        self.allreduce(xs.as_mut_ptr().cast(), xs.len(), 4, self.float)
    }

    pub fn sum_f64(&self, xs: &mut [f64]) -> Result<()> {
        self.allreduce(xs.as_mut_ptr().cast(), xs.len(), 8, self.double)
    }

    pub fn sum_u64(&self, xs: &mut [u64]) -> Result<()> {
        self.allreduce(xs.as_mut_ptr().cast(), xs.len(), 8, self.uint64)
    }

    /// Rank `root`'s bytes to every rank.
    pub fn broadcast(&self, bytes: &mut [u8], root: usize) -> Result<()> {
        // SAFETY: every rank passes a buffer of the same length.
        let rc = unsafe {
            (self.bcast)(
                bytes.as_mut_ptr().cast(),
                bytes.len() as c_int,
                self.byte,
                root as c_int,
                self.comm_world,
            )
        };
        check(rc, "MPI_Bcast")
    }

    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a collective on the world communicator.
        check(unsafe { (self.barrier)(self.comm_world) }, "MPI_Barrier")
    }

    /// Ends every rank of the job (mpirun kills the others).
    pub fn abort(&self, code: i32) -> ! {
        // SAFETY: MPI_Abort does not return on Open MPI; exit in case it does.
        unsafe { (self.abort)(self.comm_world, code) };
        std::process::exit(code)
    }

    pub fn finalize(&self) -> Result<()> {
        // SAFETY: called once, after the last collective.
        check(unsafe { (self.finalize)() }, "MPI_Finalize")
    }
}

fn check(rc: c_int, what: &str) -> Result<()> {
    if rc != 0 {
        bail!("{what} failed (MPI error {rc})");
    }
    Ok(())
}
