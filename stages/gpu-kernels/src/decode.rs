//! Launches cuda/decode.cu (compiled to PTX by build.rs): one step of model's batched decoding
//! on a GPU, in bf16 or f16 (the file's top comment has the kernels' layouts).
//!
//! - `gemv`: few-row products with the weight streamed at full memory bandwidth, optionally with
//!   the RMSNorm before it and the residual add or SwiGLU after it;
//! - `attention`: RoPE of the fused q/k/v projection's q and k, k and v stored into the caches,
//!   and each slot's queries against its cache prefix, positions read on the device.
//!
//! Every launch has a fixed shape for fixed sizes (positions are device data), so a step can be
//! captured into a CUDA graph. The kernels are launched with programmatic dependent launch (a
//! kernel starts reading its weights while the one before it finishes), which candle's launcher
//! cannot ask for, so this file loads its module and launches through the driver itself.

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, SyncOnDrop,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaStorage, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, DType, Layout, Result, WithDType};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));

/// Most rows `gemv` takes (the kernels are compiled for 1 to 8).
pub const GEMV_MAX_ROWS: usize = 8;
/// Head sizes `attention` is compiled for.
pub const HEAD_DIMS: [usize; 5] = [8, 16, 32, 64, 128];
/// Most query heads per KV head (one warp each in a block).
pub const MAX_GROUP: usize = 32;
/// Keys per block of `attention`: longer caches are split over blocks and merged.
const ATTN_CHUNK: usize = 256;
const GEMV_THREADS: u32 = 128;

/// A tensor argument: storage and layout.
pub type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, n: usize, what: &str) -> Result<CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("decode (cuda): {what} must be contiguous")
    };
    if b - a != n {
        candle_core::bail!("decode (cuda): {what} has {} values, expected {n}", b - a)
    }
    Ok(s.slice(a..b))
}

/// A 16-byte aligned view (the kernels read it in 16-byte vectors of 8 values).
fn view16<'a, T>(s: &'a CudaSlice<T>, l: &Layout, n: usize, what: &str) -> Result<CudaView<'a, T>> {
    if !l.start_offset().is_multiple_of(8) {
        candle_core::bail!("decode (cuda): {what} does not start on a 16-byte boundary")
    }
    view(s, l, n, what)
}

fn slice<'a, T: CudaDType>((s, _): Arg<'a>) -> Result<&'a CudaSlice<T>> {
    s.as_cuda_slice::<T>()
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        d => candle_core::bail!("decode (cuda): {d:?} tensors (bf16 or f16 accepted)"),
    }
}

/// The kernel `name` of cuda/decode.cu, its module loaded once per device.
fn function(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    static MODULES: Mutex<Vec<(DeviceId, Arc<CudaModule>)>> = Mutex::new(Vec::new());
    let mut modules = MODULES.lock().expect("decode kernel modules lock");
    let module = match modules.iter().find(|(id, _)| *id == dev.id()) {
        Some((_, m)) => m.clone(),
        None => {
            let m = dev
                .cuda_stream()
                .context()
                .load_module(Ptx::from_src(PTX))
                .w()?;
            modules.push((dev.id(), m.clone()));
            m
        }
    };
    module.load_function(name).w()
}

/// One kernel parameter's value.
enum Param {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

/// A kernel's parameters in order, and the stream-ordering guards of the buffers they point to
/// (kept until the launch is queued).
struct Params<'a> {
    stream: &'a Arc<CudaStream>,
    values: Vec<Param>,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Params<'a> {
    fn new(stream: &'a Arc<CudaStream>) -> Self {
        Self {
            stream,
            values: Vec::new(),
            guards: Vec::new(),
        }
    }

    fn input<T>(&mut self, v: &'a impl DevicePtr<T>) -> &mut Self {
        let (p, g) = v.device_ptr(self.stream);
        self.values.push(Param::Ptr(p));
        self.guards.push(g);
        self
    }

    fn output<T>(&mut self, v: &'a mut impl DevicePtrMut<T>) -> &mut Self {
        let (p, g) = v.device_ptr_mut(self.stream);
        self.values.push(Param::Ptr(p));
        self.guards.push(g);
        self
    }

    fn optional<T>(&mut self, v: Option<&'a impl DevicePtr<T>>) -> &mut Self {
        match v {
            Some(v) => self.input(v),
            None => {
                // Absent optional inputs are null pointers (the kernel tests them).
                self.values.push(Param::Ptr(0));
                self
            }
        }
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.values.push(Param::U32(v));
        self
    }

    fn f32(&mut self, v: f32) -> &mut Self {
        self.values.push(Param::F32(v));
        self
    }

    /// Queues `f` with programmatic stream serialization: it may start before the previous
    /// kernel in the stream ends. Every kernel of cuda/decode.cu waits for it (`wait_previous`)
    /// before reading anything but weights and before writing.
    ///
    /// # Safety
    /// The parameters must match the kernel's signature, and the buffers the sizes its launch
    /// shape reads and writes.
    unsafe fn launch(mut self, f: &CudaFunction, cfg: LaunchConfig) -> Result<()> {
        let mut ptrs: Vec<*mut c_void> = self
            .values
            .iter_mut()
            .map(|v| match v {
                Param::Ptr(p) => p as *mut u64 as *mut c_void,
                Param::U32(x) => x as *mut u32 as *mut c_void,
                Param::F32(x) => x as *mut f32 as *mut c_void,
            })
            .collect();
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            // SAFETY: a plain C union; zero is a valid value of every member.
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.stream.context().bind_to_thread().w()?;
        // SAFETY: `ptrs` point into `self.values`, alive until the call returns; the caller
        // vouches for the parameters.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .w()?;
        drop(self.guards);
        Ok(())
    }
}

/// Whether `gemv` takes x [rows, k].
pub fn gemv_fits(rows: usize, k: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&rows) && k.is_multiple_of(8) && k <= u32::MAX as usize
}

/// What `gemv` does around the product.
#[derive(Clone, Copy, Default)]
pub struct GemvOptions<'a> {
    /// RMSNorm of x first: its weight [k] (16-byte aligned) and epsilon.
    pub norm: Option<(Arg<'a>, f32)>,
    /// The weight is [2n, k], gate rows then up rows; the output is silu(gate · x) · (up · x).
    pub swiglu: bool,
    /// Added to the output, [rows, n] in x's dtype.
    pub residual: Option<Arg<'a>>,
    /// f32 output instead of x's dtype.
    pub out_f32: bool,
}

/// A weight as `gemv` reads it.
#[derive(Clone, Copy)]
pub enum GemvWeight<'a> {
    /// [n, k] in x's dtype, 16-byte aligned.
    Dense(Arg<'a>),
    /// 4-bit codes, u8 [n, k / 2] in blocks of 32 (byte j: code j + 8 in the low nibble, code
    /// j + 16 + 8 in the high one; model's `lowbit::PackedLinear` layout), and f32 scales
    /// [n, groups], one per `group` values along a row (a multiple of 32, or k: per row).
    Q4 {
        codes: Arg<'a>,
        scales: Arg<'a>,
        group: usize,
    },
}

impl GemvWeight<'_> {
    /// (rows n, columns k) of the weight.
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            GemvWeight::Dense(w) => w.1.shape().dims2(),
            GemvWeight::Q4 { codes, .. } => {
                let (n, half) = codes.1.shape().dims2()?;
                Ok((n, 2 * half))
            }
        }
    }
}

/// `x [rows, k] · w [n, k]ᵀ -> [rows, n]` (n halved with `swiglu`), for `gemv_fits` shapes;
/// x and w contiguous and 16-byte aligned, in one dtype (bf16 or f16).
pub fn gemv(x: Arg, w: Arg, opts: GemvOptions) -> Result<CudaStorage> {
    let y = gemv_dtype(x, GemvWeight::Dense(w), opts, None)?;
    Ok(y.expect("gemv allocates its output"))
}

/// `gemv` into `out` (contiguous, [rows, n], x's dtype or f32 with `out_f32`), which may be
/// the residual itself. Writes through the shared storage: no other use of `out` may overlap.
pub fn gemv_into(x: Arg, w: Arg, opts: GemvOptions, out: Arg) -> Result<()> {
    gemv_dtype(x, GemvWeight::Dense(w), opts, Some(out)).map(|_| ())
}

/// `gemv` or `gemv_into` (when `into` is given) with a weight of any format.
pub fn gemv_weight(
    x: Arg,
    w: GemvWeight,
    opts: GemvOptions,
    into: Option<Arg>,
) -> Result<Option<CudaStorage>> {
    gemv_dtype(x, w, opts, into)
}

fn gemv_dtype(
    x: Arg,
    w: GemvWeight,
    opts: GemvOptions,
    into: Option<Arg>,
) -> Result<Option<CudaStorage>> {
    use half::{bf16, f16};
    match (&x.0.slice, opts.out_f32) {
        (CudaStorageSlice::BF16(_), false) => gemv_t::<bf16, bf16>(x, w, opts, into),
        (CudaStorageSlice::BF16(_), true) => gemv_t::<bf16, f32>(x, w, opts, into),
        (CudaStorageSlice::F16(_), false) => gemv_t::<f16, f16>(x, w, opts, into),
        (CudaStorageSlice::F16(_), true) => gemv_t::<f16, f32>(x, w, opts, into),
        _ => candle_core::bail!("decode gemv (cuda): x must be bf16 or f16"),
    }
}

/// Blocks of 32 values per scale of a 4-bit weight with k columns, and the scales per row.
fn q4_groups(k: usize, group: usize) -> Result<(usize, usize)> {
    if !k.is_multiple_of(32) || group == 0 || (group < k && !group.is_multiple_of(32)) {
        candle_core::bail!(
            "decode gemv (cuda): 4-bit weight with {k} columns and groups of {group}"
        )
    }
    let group = group.min(k);
    Ok((k.div_ceil(group), group / 32))
}

/// T: the inputs' dtype; O: the output's.
fn gemv_t<T, O>(
    x: Arg,
    w: GemvWeight,
    opts: GemvOptions,
    into: Option<Arg>,
) -> Result<Option<CudaStorage>>
where
    T: CudaDType + DeviceRepr + WithDType,
    O: CudaDType + DeviceRepr,
{
    let (rows, k) = x.1.shape().dims2()?;
    let (wn, wk) = w.dims()?;
    if wk != k || !gemv_fits(rows, k) {
        candle_core::bail!(
            "decode gemv (cuda): x {:?} and a weight [{wn}, {wk}] do not fit",
            x.1.dims()
        )
    }
    if opts.swiglu && !wn.is_multiple_of(2) {
        candle_core::bail!("decode gemv (cuda): SwiGLU needs an even number of weight rows ({wn})")
    }
    let n = if opts.swiglu { wn / 2 } else { wn };
    let dev = x.0.device.clone();
    let xv = view16(slice::<T>(x)?, x.1, rows * k, "x")?;
    let (gv, eps) = match opts.norm {
        Some((g, eps)) => (Some(view16(slice::<T>(g)?, g.1, k, "norm weight")?), eps),
        None => (None, 0.0),
    };
    let rv = match opts.residual {
        Some(r) => Some(view(slice::<T>(r)?, r.1, rows * n, "residual")?),
        None => None,
    };
    let (dense, q4) = match w {
        GemvWeight::Dense(w) => (Some(view16(slice::<T>(w)?, w.1, wn * k, "w")?), None),
        GemvWeight::Q4 {
            codes,
            scales,
            group,
        } => {
            let (groups, group_blocks) = q4_groups(k, group)?;
            let cv = view16(slice::<u8>(codes)?, codes.1, wn * k / 2, "4-bit codes")?;
            let sv = view(slice::<f32>(scales)?, scales.1, wn * groups, "scales")?;
            (None, Some((cv, sv, groups, group_blocks)))
        }
    };
    let f = function(
        &dev,
        &format!(
            "decode_gemv_{}{}_{}_s{rows}_{}",
            if q4.is_some() { "q4_" } else { "" },
            if opts.swiglu { "swiglu" } else { "plain" },
            if opts.norm.is_some() { "norm" } else { "bare" },
            suffix(T::DTYPE)?
        ),
    )?;
    let warps = (GEMV_THREADS / 32) as usize;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(warps) as u32, 1, 1),
        block_dim: (GEMV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let (ov, mut y);
    let mut p = Params::new(&stream);
    match (&dense, &q4) {
        (Some(wv), _) => p.input(wv),
        (None, Some((cv, sv, _, _))) => p.input(cv).input(sv),
        (None, None) => unreachable!("a weight exists"),
    };
    p.input(&xv).optional(gv.as_ref()).optional(rv.as_ref());
    match into {
        Some(o) => {
            ov = view(slice::<O>(o)?, o.1, rows * n, "output")?;
            p.input(&ov);
            y = None;
        }
        None => {
            // SAFETY: every output is written by the kernel.
            y = Some(unsafe { dev.alloc::<O>(rows * n)? });
            p.output(y.as_mut().expect("just allocated"));
        }
    }
    p.u32(n as u32).u32(k as u32);
    if let Some((_, _, groups, group_blocks)) = q4 {
        p.u32(groups as u32).u32(group_blocks as u32);
    }
    p.f32(eps).u32(opts.out_f32 as u32);
    // SAFETY: sizes and alignment checked above; the output holds the rows · n results of the
    // kernel's output type (O is f32 exactly when out_f32 is set).
    unsafe { p.launch(&f, cfg) }?;
    Ok(y.map(|y| CudaStorage::wrap_cuda_slice(y, dev)))
}

/// The dense weight [n, k] of a 4-bit one (`GemvWeight::Q4`'s parts), written into `out`
/// (contiguous, bf16 or f16): for products with more rows than the GEMV takes.
pub fn dequant_q4_into(codes: Arg, scales: Arg, group: usize, out: Arg) -> Result<()> {
    let (n, half_k) = codes.1.shape().dims2()?;
    let k = 2 * half_k;
    let (groups, group_blocks) = q4_groups(k, group)?;
    let dev = codes.0.device.clone();
    let cv = view(slice::<u8>(codes)?, codes.1, n * half_k, "4-bit codes")?;
    let sv = view(slice::<f32>(scales)?, scales.1, n * groups, "scales")?;
    let stream = dev.cuda_stream();
    let threads = 256u32;
    let cfg = LaunchConfig {
        grid_dim: (
            (n * half_k).div_ceil(threads as usize).min(1 << 16) as u32,
            1,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! run {
        ($t:ty) => {{
            let ov = view(slice::<$t>(out)?, out.1, n * k, "dense weight")?;
            let f = function(&dev, &format!("decode_dequant_q4_{}", suffix(<$t>::DTYPE)?))?;
            let mut p = Params::new(&stream);
            p.input(&cv).input(&sv).input(&ov);
            p.u32(n as u32)
                .u32(k as u32)
                .u32(groups as u32)
                .u32(group_blocks as u32);
            // SAFETY: the codes, scales and output sizes are checked above.
            unsafe { p.launch(&f, cfg) }
        }};
    }
    match &out.0.slice {
        CudaStorageSlice::BF16(_) => run!(half::bf16),
        CudaStorageSlice::F16(_) => run!(half::f16),
        _ => candle_core::bail!("decode dequant (cuda): the output must be bf16 or f16"),
    }
}

/// The attention sizes of one step.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Slots of the batch (one query row each).
    pub slots: usize,
    /// Query heads, KV heads, head size.
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    /// Positions per slot in the caches [slots, nkv, capacity, hd].
    pub capacity: usize,
}

impl Heads {
    /// Whether `attention` takes these sizes.
    pub fn fit(&self) -> bool {
        HEAD_DIMS.contains(&self.hd)
            && self.nkv > 0
            && self.nh.is_multiple_of(self.nkv)
            && self.nh / self.nkv <= MAX_GROUP
            && self.capacity > 0
            && self.slots <= u16::MAX as usize
            && self.capacity <= u32::MAX as usize
    }

    fn cache_len(&self) -> usize {
        self.slots * self.nkv * self.capacity * self.hd
    }
}

/// f32 values of scratch `attention_into` needs for these sizes (0: none).
pub fn attention_scratch(h: Heads) -> usize {
    let splits = h.capacity.div_ceil(ATTN_CHUNK);
    if splits > 1 {
        h.slots * h.nh * splits * (h.hd + 2)
    } else {
        0
    }
}

/// The K/V caches of one layer, as `attention` reads and writes them.
#[derive(Clone, Copy)]
pub enum Caches<'a> {
    /// [slots, nkv, capacity, hd] each, in qkv's dtype.
    Float { k: Arg<'a>, v: Arg<'a> },
    /// `bits` (8 or 4) codes u8 [slots, capacity, nkv · hd · bits / 8] each and f32 scales
    /// [slots, capacity], one per token and row across the KV heads: the trained K/V
    /// quantizer's codes (symmetric MinMax per token, post-RoPE). 4-bit rows pack blocks of 32
    /// codes as model's `lowbit` layouts do (byte j: code j + 8 low, code j + 16 + 8 high) and
    /// need nkv · hd to be a multiple of 32.
    Codes {
        bits: u32,
        k: Arg<'a>,
        v: Arg<'a>,
        k_scale: Arg<'a>,
        v_scale: Arg<'a>,
    },
}

impl Caches<'_> {
    fn bits(&self) -> u32 {
        match self {
            Caches::Float { .. } => 0,
            Caches::Codes { bits, .. } => *bits,
        }
    }
}

/// Whether `attention` keeps caches of `bits` (0: float) for head size `hd` and `nkv` KV heads.
pub fn cache_fits(bits: u32, hd: usize, nkv: usize) -> bool {
    HEAD_DIMS.contains(&hd)
        && match bits {
            0 | 8 => true,
            4 => (nkv * hd).is_multiple_of(32),
            _ => false,
        }
}

/// One decoding step's attention, from the fused projection `qkv` [slots, (nh + 2 nkv) · hd]
/// (q heads, k heads, v heads): RoPE of q and k at each slot's position `pos` (u32 [slots])
/// with `cos`/`sin` f32 [positions, hd / 2]; the rotated k and the v part stored into the caches
/// at row `pos` (as codes for a low-bit cache); softmax(q kᵀ / √hd) v over rows 0..=pos.
/// Returns [slots, nh · hd]. Each pos must be below the capacity and the tables' positions
/// (device data, not checked here).
pub fn attention(
    qkv: Arg,
    cos: Arg,
    sin: Arg,
    pos: Arg,
    caches: Caches,
    h: Heads,
) -> Result<CudaStorage> {
    let y = attention_dtype(qkv, cos, sin, pos, caches, h, None)?;
    Ok(y.expect("attention allocates its output"))
}

/// `attention` into `out` ([slots, nh · hd], qkv's dtype) with `scratch` (f32, at least
/// `attention_scratch(h)` values, or `None` when that is 0). Writes through the shared storages:
/// no other use of them may overlap.
#[allow(clippy::too_many_arguments)]
pub fn attention_into(
    qkv: Arg,
    cos: Arg,
    sin: Arg,
    pos: Arg,
    caches: Caches,
    h: Heads,
    out: Arg,
    scratch: Option<Arg>,
) -> Result<()> {
    attention_dtype(qkv, cos, sin, pos, caches, h, Some((out, scratch))).map(|_| ())
}

/// Where `attention` writes: its output and scratch, or new buffers.
type AttnInto<'a> = Option<(Arg<'a>, Option<Arg<'a>>)>;

fn attention_dtype(
    qkv: Arg,
    cos: Arg,
    sin: Arg,
    pos: Arg,
    caches: Caches,
    h: Heads,
    into: AttnInto,
) -> Result<Option<CudaStorage>> {
    if !h.fit() || !cache_fits(caches.bits(), h.hd, h.nkv) {
        candle_core::bail!(
            "decode attention (cuda): unsupported sizes {h:?} with a {}-bit cache",
            caches.bits()
        )
    }
    match &qkv.0.slice {
        CudaStorageSlice::BF16(_) => attention_t::<half::bf16>(qkv, cos, sin, pos, caches, h, into),
        CudaStorageSlice::F16(_) => attention_t::<half::f16>(qkv, cos, sin, pos, caches, h, into),
        _ => candle_core::bail!("decode attention (cuda): qkv must be bf16 or f16"),
    }
}

fn attention_t<T: CudaDType + DeviceRepr + WithDType>(
    qkv: Arg,
    cos: Arg,
    sin: Arg,
    pos: Arg,
    caches: Caches,
    h: Heads,
    into: AttnInto,
) -> Result<Option<CudaStorage>> {
    let dev = qkv.0.device.clone();
    let half = h.hd / 2;
    let positions = cos.1.dims().first().copied().unwrap_or(0);
    if cos.1.dims() != [positions, half] || sin.1.dims() != cos.1.dims() {
        candle_core::bail!(
            "decode attention (cuda): cos/sin tables {:?} for head size {}",
            cos.1.dims(),
            h.hd
        )
    }
    let n = h.slots * h.nh * h.hd;
    let qkvv = view(
        slice::<T>(qkv)?,
        qkv.1,
        h.slots * (h.nh + 2 * h.nkv) * h.hd,
        "qkv",
    )?;
    let cv = view(slice::<f32>(cos)?, cos.1, positions * half, "cos")?;
    let sv = view(slice::<f32>(sin)?, sin.1, positions * half, "sin")?;
    let pv = view(slice::<u32>(pos)?, pos.1, h.slots, "pos")?;
    let (float_caches, code_caches) = match caches {
        Caches::Float { k, v } => (
            Some((
                view16(slice::<T>(k)?, k.1, h.cache_len(), "k cache")?,
                view16(slice::<T>(v)?, v.1, h.cache_len(), "v cache")?,
            )),
            None,
        ),
        Caches::Codes {
            bits,
            k,
            v,
            k_scale,
            v_scale,
        } => {
            let n = h.cache_len() * bits as usize / 8;
            let scales = h.slots * h.capacity;
            (
                None,
                Some((
                    view16(slice::<u8>(k)?, k.1, n, "k cache")?,
                    view16(slice::<u8>(v)?, v.1, n, "v cache")?,
                    view(slice::<f32>(k_scale)?, k_scale.1, scales, "k cache scales")?,
                    view(slice::<f32>(v_scale)?, v_scale.1, scales, "v cache scales")?,
                )),
            )
        }
    };
    let kind = match caches.bits() {
        0 => String::new(),
        b => format!("kv{b}_"),
    };
    let splits = h.capacity.div_ceil(ATTN_CHUNK);
    let scratch_len = attention_scratch(h);
    let dt = suffix(T::DTYPE)?;
    let stream = dev.cuda_stream();
    // Output and scratch: the caller's, or new. SAFETY (alloc): with one split the kernel writes
    // every output; with several, the combine kernel does, reading only the partials of splits
    // that hold live keys, which `attn` writes.
    let (ov, pv_scratch, mut y, mut part);
    match into {
        Some((o, scratch)) => {
            ov = Some(view(slice::<T>(o)?, o.1, n, "output")?);
            pv_scratch = match scratch {
                Some(sc) => {
                    let len = sc.1.shape().elem_count();
                    if len < scratch_len {
                        candle_core::bail!(
                            "decode attention (cuda): {len} scratch values, {scratch_len} needed"
                        )
                    }
                    Some(view(slice::<f32>(sc)?, sc.1, len, "scratch")?)
                }
                None if scratch_len > 0 => {
                    candle_core::bail!(
                        "decode attention (cuda): {scratch_len} scratch values needed"
                    )
                }
                None => None,
            };
            (y, part) = (None, None);
        }
        None => {
            (ov, pv_scratch) = (None, None);
            y = Some(unsafe { dev.alloc::<T>(n)? });
            part = Some(unsafe { dev.alloc::<f32>(scratch_len.max(1))? });
        }
    }
    let chunk = ATTN_CHUNK as u32;
    let f = function(&dev, &format!("decode_attn_{kind}d{}_{dt}", h.hd))?;
    {
        let mut p = Params::new(&stream);
        // The caches are written in place (one row per slot and KV head).
        p.input(&qkvv).input(&cv).input(&sv).input(&pv);
        match (&float_caches, &code_caches) {
            (Some((kv, vv)), _) => p
                .input(kv)
                .input(vv)
                .optional::<f32>(None::<&CudaSlice<f32>>)
                .optional::<f32>(None::<&CudaSlice<f32>>),
            (None, Some((kv, vv, ks, vs))) => p.input(kv).input(vv).input(ks).input(vs),
            (None, None) => unreachable!("caches exist"),
        };
        match (&ov, y.as_mut()) {
            (Some(o), _) => p.input(o),
            (None, Some(y)) => p.output(y),
            (None, None) => unreachable!("an output exists"),
        };
        match (&pv_scratch, part.as_mut()) {
            (Some(sc), _) => p.input(sc),
            (None, Some(pt)) => p.output(pt),
            (None, None) => p.optional::<f32>(None::<&CudaSlice<f32>>),
        };
        p.u32(h.nh as u32)
            .u32(h.nkv as u32)
            .u32(h.capacity as u32)
            .u32(chunk);
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, h.nkv as u32, h.slots as u32),
            block_dim: (32 * (h.nh / h.nkv) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sizes checked above; positions are the caller's contract.
        unsafe { p.launch(&f, cfg) }?;
    }
    if splits > 1 {
        let f = function(&dev, &format!("decode_attn_combine_d{}_{dt}", h.hd))?;
        let mut p = Params::new(&stream);
        match (&pv_scratch, part.as_ref()) {
            (Some(sc), _) => p.input(sc),
            (None, Some(pt)) => p.input(pt),
            (None, None) => unreachable!("scratch exists with several splits"),
        };
        p.input(&pv);
        match (&ov, y.as_mut()) {
            (Some(o), _) => p.input(o),
            (None, Some(y)) => p.output(y),
            (None, None) => unreachable!("an output exists"),
        };
        p.u32(h.nh as u32).u32(splits as u32).u32(chunk);
        let cfg = LaunchConfig {
            grid_dim: (h.nh as u32, h.slots as u32, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { p.launch(&f, cfg) }?;
    }
    Ok(y.map(|y| CudaStorage::wrap_cuda_slice(y, dev)))
}
