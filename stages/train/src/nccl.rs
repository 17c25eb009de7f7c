//! The NCCL collective (`nccl` feature): data-parallel ranks on GPUs sum their gradients with
//! NCCL's all-reduce on each device's own stream, with no copies through the host. Ranks as
//! threads of one process form one clique (`NcclRanks::threads`); a rank of a multi-process
//! launch joins the others through the id rank 0 serves (`NcclRanks::launch`).
//!
//! libnccl is opened when a run first needs it: `PIPELINE_NCCL_LIB` (a path), else
//! `libnccl.so.2` on the loader's path (LD_LIBRARY_PATH; pip's nvidia-nccl-cu13 puts it in
//! `site-packages/nvidia/nccl/lib`). The binary neither links against NCCL nor needs it for other
//! commands; cudarc's own NCCL bindings would link it at build time (candle builds cudarc with
//! `dynamic-linking`), and every command would then need libnccl to start.
//!
//! NVLink multicast stays off: NCCL_NVLS_ENABLE=0 unless the environment already sets it.
//! A rank waits for a sum at most `PIPELINE_NCCL_TIMEOUT_S` seconds (600 by default): past that,
//! or when NCCL reports a failed peer, it aborts its communicator instead of hanging.

use crate::parallel::{Collective, Launch, ABORTED, RENDEZVOUS_TIMEOUT};
use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaStorage, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A path to libnccl.so.2, when it is not on the loader's path.
pub const LIB_VAR: &str = "PIPELINE_NCCL_LIB";
/// Seconds a rank waits for the others in one sum before it gives up.
pub const TIMEOUT_VAR: &str = "PIPELINE_NCCL_TIMEOUT_S";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

type RawComm = *mut c_void;
/// ncclResult_t: 0 is success, 7 (ncclInProgress) only for non-blocking communicators.
type Status = c_int;
const IN_PROGRESS: Status = 7;
/// ncclRedOp_t's ncclSum.
const SUM: c_int = 0;
/// bf16 sums came with NCCL 2.10.
const MIN_VERSION: c_int = 21000;

/// ncclUniqueId, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([u8; 128]);

/// The functions of libnccl this collective calls.
struct Nccl {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> Status,
    comm_init_all: unsafe extern "C" fn(*mut RawComm, c_int, *const c_int) -> Status,
    comm_abort: unsafe extern "C" fn(RawComm) -> Status,
    comm_get_async_error: unsafe extern "C" fn(RawComm, *mut Status) -> Status,
    #[allow(clippy::type_complexity)]
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        *mut c_void,
    ) -> Status,
    group_start: unsafe extern "C" fn() -> Status,
    group_end: unsafe extern "C" fn() -> Status,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    get_last_error: unsafe extern "C" fn(RawComm) -> *const c_char,
    /// "2.27.7 (libnccl.so.2)"
    version: String,
    _lib: libloading::Library,
}

static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();

fn nccl() -> Result<&'static Nccl> {
    NCCL.get_or_init(|| {
        // Before NCCL reads its environment: NVLink multicast can take a shared host's GPUs
        // out of service, so it stays off unless asked for.
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        let path = std::env::var(LIB_VAR).unwrap_or_else(|_| "libnccl.so.2".into());
        unsafe { Nccl::open(&path) }.map_err(|e| format!("{e:#}"))
    })
    .as_ref()
    .map_err(|e| anyhow::anyhow!("{e}"))
}

impl Nccl {
    /// # Safety
    /// `path` must be a libnccl (its functions are called with NCCL's signatures).
    unsafe fn open(path: &str) -> Result<Nccl> {
        let lib = libloading::Library::new(path).with_context(|| {
            format!(
                "cannot load NCCL from {path}: set {LIB_VAR} to libnccl.so.2's path, or put its folder on LD_LIBRARY_PATH (pip's nvidia-nccl-cu13 has it in site-packages/nvidia/nccl/lib)"
            )
        })?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get($name)
                    .with_context(|| format!("{path} has no {}: not a libnccl?", $name))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> Status = sym!("ncclGetVersion");
        let mut code = 0;
        if get_version(&mut code) != 0 || code < MIN_VERSION {
            bail!("{path} is NCCL version code {code}; this needs NCCL 2.10 or newer (bf16 sums)");
        }
        Ok(Nccl {
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_init_all: sym!("ncclCommInitAll"),
            comm_abort: sym!("ncclCommAbort"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            all_reduce: sym!("ncclAllReduce"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            get_error_string: sym!("ncclGetErrorString"),
            get_last_error: sym!("ncclGetLastError"),
            version: format!(
                "{}.{}.{} ({path})",
                code / 10000,
                code % 10000 / 100,
                code % 100
            ),
            _lib: lib,
        })
    }

    /// `status` of NCCL's `call` as a result whose error says what NCCL said.
    fn check(&self, status: Status, call: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        let text = |p: *const c_char| match p.is_null() {
            true => String::new(),
            false => unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned(),
        };
        let name = text(unsafe { (self.get_error_string)(status) });
        // The communicator argument is unused: this is the calling thread's last error.
        let last = text(unsafe { (self.get_last_error)(std::ptr::null_mut()) });
        bail!("NCCL {call} failed: {name} (status {status}): {last}")
    }
}

/// NCCL's version and where it was loaded from, loading it if need be.
pub fn version() -> Result<&'static str> {
    Ok(&nccl()?.version)
}

/// ncclDataType_t of a candle dtype.
fn nccl_type(d: DType) -> Result<c_int> {
    Ok(match d {
        DType::U8 => 1,
        DType::U32 => 3,
        DType::I64 => 4,
        DType::F16 => 6,
        DType::F32 => 7,
        DType::F64 => 8,
        DType::BF16 => 9,
        d => bail!("all_reduce_sum: NCCL cannot sum {d:?} tensors (f32, bf16, f16, f64, u8, u32 and i64 it can)"),
    })
}

/// A communicator; NCCL lets any thread use it, one at a time (the Mutex in `NcclRanks`).
struct Comm(RawComm);
unsafe impl Send for Comm {}

/// One rank's NCCL communicator and the GPU whose stream its sums run on.
pub struct NcclRanks {
    rank: usize,
    world: usize,
    device: CudaDevice,
    /// `None` once aborted.
    comm: Mutex<Option<Comm>>,
    /// Set when a rank of this process fails: the others stop waiting for it.
    failed: Arc<AtomicBool>,
    timeout: Duration,
}

fn cuda_of(device: &Device) -> Result<CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("NCCL sums on GPUs, but a rank is on {other:?}"),
    }
}

/// "cuda:N" (candle's own device ids count opened devices, not GPUs).
fn gpu_name(device: &CudaDevice) -> String {
    format!("cuda:{}", device.cuda_stream().context().ordinal())
}

/// Makes `device`'s context current on this thread, for NCCL's CUDA runtime calls.
fn bind(device: &CudaDevice) -> Result<()> {
    device
        .cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(|e| anyhow::anyhow!("binding the CUDA context of {}: {e:?}", gpu_name(device)))
}

fn timeout_from_env() -> Result<Duration> {
    match std::env::var(TIMEOUT_VAR) {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(v) => {
            let s: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0)
                .with_context(|| {
                    format!("{TIMEOUT_VAR} = {v:?}: must be a positive number of seconds")
                })?;
            Ok(Duration::from_secs_f64(s))
        }
    }
}

impl NcclRanks {
    /// One rank per GPU as threads of this process: one clique made by this thread
    /// (ncclCommInitAll) and connected by one small sum before any rank starts, so a rank that
    /// fails later cannot leave the others stuck in setting up.
    pub fn threads(devices: &[Device]) -> Result<Vec<NcclRanks>> {
        let nccl = nccl()?;
        let cuda = devices.iter().map(cuda_of).collect::<Result<Vec<_>>>()?;
        let ordinals: Vec<c_int> = cuda
            .iter()
            .map(|d| d.cuda_stream().context().ordinal() as c_int)
            .collect();
        let mut comms = vec![std::ptr::null_mut(); cuda.len()];
        nccl.check(
            unsafe {
                (nccl.comm_init_all)(comms.as_mut_ptr(), cuda.len() as c_int, ordinals.as_ptr())
            },
            "ncclCommInitAll",
        )
        .with_context(|| format!("making one NCCL clique of the GPUs {ordinals:?}"))?;
        let (failed, timeout) = (Arc::new(AtomicBool::new(false)), timeout_from_env()?);
        let ranks: Vec<NcclRanks> = comms
            .into_iter()
            .zip(cuda)
            .enumerate()
            .map(|(rank, (c, device))| NcclRanks {
                rank,
                world: ordinals.len(),
                device,
                comm: Mutex::new(Some(Comm(c))),
                failed: failed.clone(),
                timeout,
            })
            .collect();
        // The first sum connects the GPUs: all of it from this thread, in one group.
        let ones = ranks
            .iter()
            .map(|r| {
                Ok(Tensor::ones(
                    1,
                    DType::F32,
                    &Device::Cuda(r.device.clone()),
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        nccl.check(unsafe { (nccl.group_start)() }, "ncclGroupStart")?;
        let sums: Result<Vec<Tensor>> = ranks
            .iter()
            .zip(&ones)
            .map(|(r, t)| r.enqueue_sum(nccl, r.raw_comm()?, t))
            .collect();
        nccl.check(unsafe { (nccl.group_end)() }, "ncclGroupEnd")?;
        for (r, s) in ranks.iter().zip(sums?) {
            let mut slot = r.comm.lock().map_err(|_| anyhow::anyhow!(ABORTED))?;
            r.wait(nccl, &mut slot)?;
            drop(slot);
            r.check_count(&s)?;
        }
        Ok(ranks)
    }

    /// This process's rank of a launch, on `device` (cuda:LOCAL_RANK): rank 0 makes NCCL's id
    /// and serves it at MASTER_ADDR:MASTER_PORT, the others fetch it (`Launch::share_id`); then
    /// every rank joins the communicator and one small sum connects them.
    pub fn launch(launch: &Launch, device: &Device) -> Result<NcclRanks> {
        let nccl = nccl()?;
        let device = cuda_of(device)?;
        let timeout = timeout_from_env()?;
        bind(&device)?;
        let id = launch.share_id(
            || {
                let mut id = UniqueId([0; 128]);
                nccl.check(unsafe { (nccl.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
                Ok(id.0)
            },
            RENDEZVOUS_TIMEOUT,
        )?;
        let (rank, world) = (launch.rank, launch.world_size);
        let mut comm = std::ptr::null_mut();
        bind(&device)?;
        nccl.check(
            unsafe {
                (nccl.comm_init_rank)(&mut comm, world as c_int, UniqueId(id), rank as c_int)
            },
            "ncclCommInitRank",
        )
        .with_context(|| {
            format!(
                "RANK = {rank} of WORLD_SIZE = {world} joining the NCCL communicator on {}",
                gpu_name(&device)
            )
        })?;
        let r = NcclRanks {
            rank,
            world,
            device,
            comm: Mutex::new(Some(Comm(comm))),
            failed: Arc::new(AtomicBool::new(false)),
            timeout,
        };
        let one = Tensor::ones(1, DType::F32, &Device::Cuda(r.device.clone()))?;
        let sum = r.all_reduce_sum(&[one])?;
        r.check_count(&sum[0])?;
        Ok(r)
    }

    fn raw_comm(&self) -> Result<RawComm> {
        let slot = self.comm.lock().map_err(|_| anyhow::anyhow!(ABORTED))?;
        slot.as_ref().map(|c| c.0).context(ABORTED)
    }

    /// The first sum, of one 1.0 per rank, must be the number of ranks.
    fn check_count(&self, sum: &Tensor) -> Result<()> {
        let got = sum.to_vec1::<f32>()?;
        if got != [self.world as f32] {
            bail!(
                "NCCL's first sum over {} ranks gave {got:?} on rank {}, not [{}]",
                self.world,
                self.rank,
                self.world
            );
        }
        Ok(())
    }

    /// Enqueues on the device's stream the sum over the ranks of `t` (contiguous, on this
    /// rank's GPU) into a new tensor.
    fn enqueue_sum(&self, nccl: &Nccl, comm: RawComm, t: &Tensor) -> Result<Tensor> {
        let n = t.elem_count();
        if n == 0 {
            return Ok(t.clone());
        }
        let dtype = nccl_type(t.dtype())?;
        let stream = self.device.cuda_stream();
        let (storage, layout) = t.storage_and_layout();
        let (Storage::Cuda(s), Some((o, _))) = (&*storage, layout.contiguous_offsets()) else {
            bail!(
                "all_reduce_sum: a tensor is not contiguous on {}",
                gpu_name(&self.device)
            );
        };
        // Addresses only: the sum runs on the device's one stream, in order with candle's work.
        macro_rules! sum_into {
            ($src:expr, $variant:ident, $t:ty) => {{
                let src = $src.slice(o..o + n);
                let mut dst = unsafe { self.device.alloc::<$t>(n) }?;
                let (from, _) = src.device_ptr(&stream);
                let (to, _) = dst.device_ptr_mut(&stream);
                nccl.check(
                    unsafe {
                        (nccl.all_reduce)(
                            from as *const c_void,
                            to as *mut c_void,
                            n,
                            dtype,
                            SUM,
                            comm,
                            stream.cu_stream() as *mut c_void,
                        )
                    },
                    "ncclAllReduce",
                )?;
                CudaStorageSlice::$variant(dst)
            }};
        }
        let sum = match &s.slice {
            CudaStorageSlice::F32(x) => sum_into!(x, F32, f32),
            CudaStorageSlice::BF16(x) => sum_into!(x, BF16, half::bf16),
            CudaStorageSlice::F16(x) => sum_into!(x, F16, half::f16),
            CudaStorageSlice::F64(x) => sum_into!(x, F64, f64),
            CudaStorageSlice::U8(x) => sum_into!(x, U8, u8),
            CudaStorageSlice::U32(x) => sum_into!(x, U32, u32),
            CudaStorageSlice::I64(x) => sum_into!(x, I64, i64),
            _ => unreachable!("nccl_type accepted {:?}", t.dtype()),
        };
        let storage = Storage::Cuda(CudaStorage {
            slice: sum,
            device: self.device.clone(),
        });
        Ok(Tensor::from_storage(
            storage,
            t.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }

    /// Waits until the sums enqueued so far are done, watching for another rank's failure
    /// (this process's ranks, or NCCL's report of a peer) and the timeout; then aborts the
    /// communicator rather than wait forever.
    fn wait(&self, nccl: &Nccl, slot: &mut Option<Comm>) -> Result<()> {
        let comm = slot.as_ref().map(|c| c.0).context(ABORTED)?;
        let done = self
            .device
            .cuda_stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| anyhow::anyhow!("recording a CUDA event: {e:?}"))?;
        let start = Instant::now();
        loop {
            let complete = done
                .try_is_complete()
                .map_err(|e| anyhow::anyhow!("waiting for NCCL's sum: {e:?}"))?;
            if complete {
                return Ok(());
            }
            let mut peer = 0;
            let asked = unsafe { (nccl.comm_get_async_error)(comm, &mut peer) };
            let failure = if self.failed.load(Ordering::SeqCst) {
                Some(anyhow::anyhow!(ABORTED))
            } else if asked != 0 || (peer != 0 && peer != IN_PROGRESS) {
                Some(
                    nccl.check(if asked != 0 { asked } else { peer }, "all-reduce")
                        .with_context(|| {
                            format!(
                                "rank {}: NCCL reports a failed peer or connection; aborting",
                                self.rank
                            )
                        })
                        .unwrap_err(),
                )
            } else if start.elapsed() > self.timeout {
                Some(anyhow::anyhow!(
                    "rank {} of {} waited {:?} for the other ranks in one gradient sum ({TIMEOUT_VAR}); another rank has probably failed, see its error",
                    self.rank,
                    self.world,
                    self.timeout
                ))
            } else {
                None
            };
            if let Some(e) = failure {
                if let Some(c) = slot.take() {
                    unsafe { (nccl.comm_abort)(c.0) };
                }
                return Err(e);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Collective for NcclRanks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let nccl = nccl()?;
        let mut slot = self.comm.lock().map_err(|_| anyhow::anyhow!(ABORTED))?;
        let comm = match slot.as_ref() {
            Some(c) if !self.failed.load(Ordering::SeqCst) => c.0,
            _ => bail!(ABORTED),
        };
        bind(&self.device)?;
        // CPU tensors (the step's metrics) and other GPUs' travel to this one and back.
        let gpu = Device::Cuda(self.device.clone());
        let inputs = tensors
            .iter()
            .map(|t| Ok(t.to_device(&gpu)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        // One group: NCCL fuses the tensors' sums into few kernels.
        nccl.check(unsafe { (nccl.group_start)() }, "ncclGroupStart")?;
        let sums: Result<Vec<Tensor>> = inputs
            .iter()
            .map(|t| self.enqueue_sum(nccl, comm, t))
            .collect();
        // Closed even when an enqueue failed, so NCCL's group state stays sound.
        let ended = unsafe { (nccl.group_end)() };
        let sums = sums?;
        nccl.check(ended, "ncclGroupEnd")?;
        self.wait(nccl, &mut slot)?;
        drop(slot);
        sums.iter()
            .zip(tensors)
            .map(|(s, t)| Ok(s.to_device(t.device())?))
            .collect()
    }

    fn abort(&self) {
        self.failed.store(true, Ordering::SeqCst);
        // A rank waiting in a sum aborts its own communicator when it sees the flag.
        if let Ok(mut slot) = self.comm.try_lock() {
            if let (Some(c), Ok(nccl)) = (slot.take(), nccl()) {
                unsafe { (nccl.comm_abort)(c.0) };
            }
        }
    }
}

impl Drop for NcclRanks {
    fn drop(&mut self) {
        // Every sum has finished (each call waits for its own), so nothing is in flight.
        let slot = match self.comm.get_mut() {
            Ok(s) => s.take(),
            Err(p) => p.into_inner().take(),
        };
        if let (Some(c), Ok(nccl)) = (slot, nccl()) {
            unsafe { (nccl.comm_abort)(c.0) };
        }
    }
}
