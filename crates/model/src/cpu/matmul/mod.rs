//! `y = x · Wᵀ` with f32 activations and bf16 weights that stay bf16 in memory.
//!
//! **Kernels.** One per process, chosen once ([`configure`], else the fastest this CPU runs):
//! - [`Kernel::Amx`]: AMX tiles (`TDPBF16PS`), 16 weight rows × 16 tokens × 32 K per instruction ([`amx`]);
//! - [`Kernel::Avx512Bf16`]: `VDPBF16PS`, 16 bf16 pairs per instruction ([`bf16`]);
//! - [`Kernel::Avx512F`], [`Kernel::Avx2`], [`Kernel::Scalar`]: the weights widened to f32 and multiplied with f32
//!   FMAs ([`f32`]); the portable fallback and the reference.
//!
//! **Precision.** The matrix units multiply bf16 by bf16. By default ([`Precision::Split`]) each f32 activation is
//! split into a bf16 high part and a bf16 low part (`hi = bf16(x)`, `lo = bf16(x − hi)`, about 16 significant bits
//! together) and both are multiplied with the weights, accumulating in f32: two passes, products exact in f32, so the
//! results stay within about 2⁻¹⁶ of an f32 matmul and the model within the float32 reference's tolerance.
//! [`Precision::Bf16`] multiplies `hi` alone (one pass, twice the rate, about 2⁻⁹ relative error per product).
//!
//! **Batch invariance.** Every output element is computed by the same sequence of floating-point operations whatever
//! the number of tokens, the block it falls in, or the thread that runs it: the kernel of the process is used for
//! every token count (one token included), each element accumulates over K in chunks in the same order, and token
//! blocks only change which elements are computed together. So a sequence gets bit-identical results decoded alone, in
//! a batch of 64, or inside a prefill chunk: greedy outputs do not depend on load.
//!
//! **Layout.** The bf16 kernels read weights in groups of [`Kernel::group`] rows re-laid per 32-column chunk
//! ([`pack`]): `[row group][chunk][row in group][32]`, zero-padded, so each group streams from memory as one
//! sequential run and an AMX tile is 1 KiB of contiguous bytes. Resident weights are re-laid once, at load, into
//! the copy that is made anyway (memory does not double). Matrices in any other layout (memory-mapped, built by
//! tests) are re-laid per group on the fly into a small buffer; the values the kernel sees, and so the results, are
//! the same.
//!
//! [`matmul`] splits the output rows over the rayon pool; [`matmul_serial`] runs on the calling thread, for callers
//! that already parallelise at a coarser grain (one expert per task).

// Index loops here mirror the math (rows t, columns r, chunk positions i, j) and read better than zips.
#![allow(clippy::needless_range_loop)]

pub(crate) mod amx;
mod bf16;
mod f32;

use std::sync::OnceLock;

use half::bf16 as Bf16;
use rayon::prelude::*;

use crate::weights::{Layout, Mat};

/// Tokens per block in the many-token regime (a block of activations stays in L2 while weight rows stream by).
pub(crate) const TOKEN_BLOCK: usize = 64;
/// Weight rows per parallel task (a multiple of every kernel's group).
const TASK_ROWS: usize = 64;
/// Columns per packed chunk: one AMX tile row, one 512-bit vector of bf16.
pub const CHUNK: usize = 32;

/// The matmul kernel a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Amx,
    Avx512Bf16,
    Avx512F,
    Avx2,
    Scalar,
}

impl Kernel {
    pub const ALL: [Kernel; 5] = [Kernel::Amx, Kernel::Avx512Bf16, Kernel::Avx512F, Kernel::Avx2, Kernel::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx-bf16",
            Kernel::Avx512Bf16 => "avx512-bf16",
            Kernel::Avx512F => "avx512f",
            Kernel::Avx2 => "avx2+fma",
            Kernel::Scalar => "scalar",
        }
    }

    pub fn from_name(name: &str) -> Option<Kernel> {
        Self::ALL.into_iter().find(|k| k.name() == name || (name == "amx" && *k == Kernel::Amx))
    }

    /// Rows per packed group, for the kernels that read re-laid weights.
    pub fn group(self) -> Option<usize> {
        match self {
            Kernel::Amx => Some(amx::GROUP),
            Kernel::Avx512Bf16 => Some(bf16::GROUP),
            _ => None,
        }
    }

    /// Whether this CPU (and OS) can run the kernel; `Err` says why not. For AMX this asks the kernel for the tile
    /// state (once per process) and checks the tile unit against an emulation of it on a small problem.
    pub fn check(self) -> Result<(), String> {
        #[cfg(target_arch = "x86_64")]
        {
            let f = |name: &str, on: bool| if on { Ok(()) } else { Err(format!("the CPU lacks {name}")) };
            match self {
                Kernel::Amx => amx::available(),
                Kernel::Avx512Bf16 => f(
                    "AVX512-BF16",
                    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16"),
                ),
                Kernel::Avx512F => f("AVX-512F", std::arch::is_x86_feature_detected!("avx512f")),
                Kernel::Avx2 => f(
                    "AVX2 and FMA",
                    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
                ),
                Kernel::Scalar => Ok(()),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            match self {
                Kernel::Scalar => Ok(()),
                _ => Err("not an x86-64 CPU".into()),
            }
        }
    }

    /// The kernels this CPU runs, fastest first.
    pub fn available() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.check().is_ok()).collect()
    }

    fn f32_block(self) -> f32::Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Kernel::Avx512F => return f32::x86::block_avx512,
                Kernel::Avx2 => return f32::x86::block_avx2,
                _ => {}
            }
        }
        f32::block_scalar
    }
}

/// How activations meet the bf16 weights (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Precision {
    /// bf16 high and low parts of each activation, two passes: about 16 significant bits, f32 accumulation.
    #[default]
    Split,
    /// The activations rounded to bf16, one pass.
    Bf16,
}

impl From<Precision> for String {
    fn from(p: Precision) -> String {
        p.name().to_owned()
    }
}

impl TryFrom<String> for Precision {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Precision::from_name(&s).ok_or_else(|| format!("{s:?} is not a precision (split or bf16)"))
    }
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Split => "split",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn from_name(name: &str) -> Option<Precision> {
        match name {
            "split" | "default" => Some(Precision::Split),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// The kernel and precision of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub kernel: Kernel,
    pub precision: Precision,
}

static SELECTION: OnceLock<Selection> = OnceLock::new();

/// Why a kernel selection was refused.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("matmul kernel {kernel}: {reason}")]
    Unavailable { kernel: &'static str, reason: String },
    #[error("the matmul kernel is already {current:?}, asked for {wanted:?} (select it before loading a model)")]
    AlreadySelected { current: Selection, wanted: Selection },
}

/// Chooses the kernel (`None`: the fastest available) and precision of this process. Call before any model is
/// loaded, since resident weights are laid out for the kernel; a second call must agree with the first.
pub fn configure(kernel: Option<Kernel>, precision: Precision) -> Result<Selection, SelectError> {
    let kernel = match kernel {
        Some(k) => {
            k.check().map_err(|reason| SelectError::Unavailable { kernel: k.name(), reason })?;
            k
        }
        None => default_kernel(precision),
    };
    let wanted = Selection { kernel, precision };
    let current = *SELECTION.get_or_init(|| wanted);
    if current != wanted {
        return Err(SelectError::AlreadySelected { current, wanted });
    }
    Ok(current)
}

/// The selection of this process (the default kernel at the default precision unless [`configure`]d first).
pub fn selection() -> Selection {
    let precision = Precision::default();
    *SELECTION.get_or_init(|| Selection { kernel: default_kernel(precision), precision })
}

/// The kernel a precision gets by default: AMX where it runs; else, for the one-pass bf16 precision, AVX512-BF16;
/// else the f32 kernels. The split precision does not default to AVX512-BF16: it makes two `VDPBF16PS` passes, which
/// need twice the f32 FMA rate to pay, and on the CPUs measured the bf16 dot product ran at the FMA rate (the
/// `matmul_bench` example shows both side by side; `--matmul-kernel avx512-bf16` selects it anyway).
fn default_kernel(precision: Precision) -> Kernel {
    for k in Kernel::ALL {
        if k == Kernel::Avx512Bf16 && precision == Precision::Split {
            continue;
        }
        match k.check() {
            Ok(()) => return k,
            // Only worth a line when the CPU claims the unit but it failed its check.
            Err(reason) if k == Kernel::Amx && amx::cpu_claims_amx() => {
                tracing::warn!("AMX is not used: {reason}");
            }
            Err(_) => {}
        }
    }
    Kernel::Scalar
}

/// Returns the name of the kernel this process runs (for benchmark reports).
pub fn kernel_name() -> &'static str {
    selection().kernel.name()
}

/// The packed layout resident weights get in this process, if its kernel reads one.
pub(crate) fn resident_layout() -> Layout {
    match selection().kernel.group() {
        Some(group) => Layout::Packed { group },
        None => Layout::RowMajor,
    }
}

/// A copy of a row-major matrix in the layout resident weights get in this process.
pub fn resident_copy(w: &Mat) -> Mat {
    match resident_layout() {
        Layout::Packed { group } => w.packed_copy(group),
        Layout::RowMajor => w.clone(),
    }
}

/// Values a `rows × cols` matrix takes when packed in groups of `group` rows.
pub fn packed_len(rows: usize, cols: usize, group: usize) -> usize {
    rows.div_ceil(group) * group * cols.div_ceil(CHUNK) * CHUNK
}

/// Re-lays rows `r0..r1` (`r0` a multiple of `group`) of a row-major `? × cols` matrix `src` into `dst`, the packed
/// groups covering those rows: `[group][chunk][tile]`, zeros past the last row and column. A tile is `group ×
/// CHUNK` values: `[row in group][CHUNK]`, except for the AMX kernel's groups ([`amx::GROUP`] rows), whose tiles are
/// its `TDPBF16PS` B operand, `[column pair][row in group][2]` (see [`amx`]).
pub fn pack(src: &[Bf16], cols: usize, (r0, r1): (usize, usize), group: usize, dst: &mut [Bf16]) {
    debug_assert_eq!(r0 % group, 0);
    let chunks = cols.div_ceil(CHUNK);
    let groups = (r1 - r0).div_ceil(group);
    assert_eq!(dst.len(), groups * chunks * group * CHUNK, "pack: destination size");
    let pairs = group == amx::GROUP;
    for g in 0..groups {
        for c in 0..chunks {
            let c0 = c * CHUNK;
            let width = (cols - c0).min(CHUNK);
            let tile = &mut dst[(g * chunks + c) * group * CHUNK..(g * chunks + c + 1) * group * CHUNK];
            for i in 0..group {
                let r = r0 + g * group + i;
                let row = if r < r1 { &src[r * cols + c0..r * cols + c0 + width] } else { &[][..] };
                if pairs {
                    // Column 2·kk + p of row i goes to row kk, column 2·i + p of the tile.
                    for kk in 0..CHUNK / 2 {
                        for p in 0..2 {
                            tile[kk * 2 * group + 2 * i + p] = row.get(2 * kk + p).copied().unwrap_or(Bf16::ZERO);
                        }
                    }
                } else {
                    let d = &mut tile[i * CHUNK..(i + 1) * CHUNK];
                    d[..row.len()].copy_from_slice(row);
                    d[row.len()..].fill(Bf16::ZERO);
                }
            }
        }
    }
}

/// Rounds to the nearest bf16, ties to even (NaN stays NaN); the activations' conversion on every path.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Splits `x` into `hi = bf16(x)` and `lo = bf16(x − hi)`.
#[inline]
pub fn split_bf16(x: f32) -> (u16, u16) {
    let hi = round_bf16(x);
    let rest = x - f32::from_bits(u32::from(hi) << 16);
    (hi, round_bf16(rest))
}

/// Widens bf16 to f32 (exact: bf16 is the top half of an f32).
pub fn widen(src: &[Bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// Computes `y[t, r] = Σ_k x[t, k] · w[r, k]` for `t < ntok`, overwriting `y` (`ntok × w.rows`), in parallel.
pub fn matmul(x: &[f32], ntok: usize, w: &Mat, y: &mut [f32]) {
    run(selection(), x, ntok, w, y, true);
}

/// Same as [`matmul`], on the calling thread.
pub fn matmul_serial(x: &[f32], ntok: usize, w: &Mat, y: &mut [f32]) {
    run(selection(), x, ntok, w, y, false);
}

/// [`matmul`] with an explicit kernel and precision (tests and benchmarks compare them side by side). The kernel
/// must be available on this CPU ([`Kernel::check`]).
pub fn matmul_with(sel: Selection, x: &[f32], ntok: usize, w: &Mat, y: &mut [f32], parallel: bool) {
    assert!(sel.kernel.check().is_ok(), "matmul_with: kernel {} is not available here", sel.kernel.name());
    run(sel, x, ntok, w, y, parallel);
}

/// 16-bit values starting on a cache line. The tile unit loads a 64-byte row per tile row: measured on a Sapphire
/// Rapids core, `TILELOADD` from L1 took 2.4 ns aligned and 15 ns when its rows straddled two lines, so every tile
/// operand (activations, weights, spilled accumulators) lives in one of these.
#[derive(Debug, Default, Clone)]
pub(crate) struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

// SAFETY: 32 u16 values fill the 64 bytes of the alignment exactly (no padding), and every bit pattern is valid.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Line {}

impl Aligned {
    /// `len` zeros.
    pub(crate) fn zeroed(len: usize) -> Self {
        let mut a = Aligned::default();
        a.zero(len);
        a
    }

    /// Makes this `len` zeros, keeping the allocation when it is big enough.
    pub(crate) fn zero(&mut self, len: usize) {
        self.lines.clear();
        self.lines.resize(len.div_ceil(32), Line([0; 32]));
        self.len = len;
    }

    /// Makes this `len` values, keeping the allocation and whatever values it held (only lines added are zeroed):
    /// for a caller that writes every value.
    fn resize_for_overwrite(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(32), Line([0; 32]));
        self.len = len;
    }

    pub(crate) fn capacity(&self) -> usize {
        self.lines.capacity() * 32
    }

    /// The values as bf16.
    pub(crate) fn as_bf16(&self) -> &[Bf16] {
        bytemuck::cast_slice(self)
    }

    pub(crate) fn as_bf16_mut(&mut self) -> &mut [Bf16] {
        bytemuck::cast_slice_mut(self)
    }
}

impl std::ops::Deref for Aligned {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl std::ops::DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [u16] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

/// A zeroed buffer of `len` values for converted activations, reused from this thread's spares when one is big
/// enough: a fresh allocation of this size is a fresh mapping, and faulting its pages in cost as much as converting
/// into them.
pub(crate) fn scratch(len: usize) -> Aligned {
    let mut v = take_spare(len);
    v.zero(len);
    v
}

/// [`scratch`] without the zeroing, for a caller that writes every value (the vectorised AMX conversion writes
/// whole tiles, padding included): the values are whatever the buffer held before.
pub(crate) fn scratch_for_overwrite(len: usize) -> Aligned {
    let mut v = take_spare(len);
    v.resize_for_overwrite(len);
    v
}

fn take_spare(len: usize) -> Aligned {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        match s.iter().position(|v| v.capacity() >= len) {
            Some(i) => s.swap_remove(i),
            None => Aligned::default(),
        }
    })
}

/// Returns a buffer from [`scratch`] to this thread's spares (a few are kept, the largest first).
fn spare(v: Aligned) {
    if v.capacity() == 0 {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        s.push(v);
        s.sort_by_key(|v| std::cmp::Reverse(v.capacity()));
        s.truncate(SPARES);
    });
}

/// Spare activation buffers kept per thread (an input's high and low parts, a second input's, and one more).
const SPARES: usize = 6;

thread_local! {
    static SPARE: std::cell::RefCell<Vec<Aligned>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Activations converted once for the kernel, so that several matrices can be multiplied by them.
#[derive(Debug)]
pub struct Activations<'x> {
    sel: Selection,
    ntok: usize,
    k: usize,
    data: Prepared<'x>,
}

#[derive(Debug)]
enum Prepared<'x> {
    /// f32 kernels: the activations themselves (rounded to bf16 values in [`Precision::Bf16`]).
    F32(std::borrow::Cow<'x, [f32]>),
    /// bf16 kernels: high and (for [`Precision::Split`]) low parts in the kernel's layout.
    Bf16 { hi: Aligned, lo: Aligned },
}

impl Drop for Activations<'_> {
    fn drop(&mut self) {
        if let Prepared::Bf16 { hi, lo } = &mut self.data {
            spare(std::mem::take(hi));
            spare(std::mem::take(lo));
        }
    }
}

impl<'x> Activations<'x> {
    /// Converts `ntok` rows of `k` values for the process's kernel.
    pub fn new(x: &'x [f32], ntok: usize, k: usize) -> Self {
        Self::with(selection(), x, ntok, k)
    }

    fn with(sel: Selection, x: &'x [f32], ntok: usize, k: usize) -> Self {
        assert_eq!(x.len(), ntok * k, "matmul: x has {} values, expected {ntok}×{k}", x.len());
        let data = match (sel.kernel, sel.precision) {
            (Kernel::Amx, p) => {
                let (hi, lo) = amx::prepare(x, ntok, k, p == Precision::Split);
                Prepared::Bf16 { hi, lo }
            }
            (Kernel::Avx512Bf16, p) => {
                let (hi, lo) = bf16::prepare(x, ntok, k, p == Precision::Split);
                Prepared::Bf16 { hi, lo }
            }
            (_, Precision::Split) => Prepared::F32(std::borrow::Cow::Borrowed(x)),
            (_, Precision::Bf16) => Prepared::F32(std::borrow::Cow::Owned(
                x.iter().map(|&v| f32::from_bits(u32::from(round_bf16(v)) << 16)).collect(),
            )),
        };
        Activations { sel, ntok, k, data }
    }

    pub fn ntok(&self) -> usize {
        self.ntok
    }

    /// `y = x · wᵀ` (`ntok × w.rows`, overwritten), over the thread pool when `parallel`.
    pub fn matmul(&self, w: &Mat, y: &mut [f32], parallel: bool) {
        assert_eq!(y.len(), self.ntok * w.rows, "matmul: y has {} values, expected {}×{}", y.len(), self.ntok, w.rows);
        // SAFETY: y holds ntok × w.rows values.
        unsafe { self.matmul_to(w, Out(y.as_mut_ptr()), parallel) };
    }

    /// `x · wᵀ` as a new `ntok × w.rows` vector, not zeroed first: every kernel writes every value of its output.
    pub fn product(&self, w: &Mat, parallel: bool) -> Vec<f32> {
        let len = self.ntok * w.rows;
        let mut y = Vec::with_capacity(len);
        // SAFETY: the capacity holds ntok × w.rows values; each kernel writes all of them (every row range of
        // every token row, which the tasks cover), so they are initialised when the length is set.
        unsafe {
            self.matmul_to(w, Out(y.as_mut_ptr()), parallel);
            y.set_len(len);
        }
        y
    }

    /// Writes `x · wᵀ` to the `ntok × w.rows` values at `out`.
    ///
    /// # Safety
    /// `out` points to `ntok × w.rows` writable values that nothing else accesses meanwhile.
    unsafe fn matmul_to(&self, w: &Mat, out: Out, parallel: bool) {
        assert_eq!(w.cols, self.k, "matmul: weight has {} columns, activations {}", w.cols, self.k);
        if self.ntok == 0 || w.rows == 0 {
            return;
        }
        let rows = w.rows;
        let task_rows = match self.sel.kernel {
            Kernel::Amx => amx::task_rows(w.cols),
            _ => TASK_ROWS,
        };
        let tasks = rows.div_ceil(task_rows);
        if !parallel || tasks <= 1 || self.ntok * rows * w.cols < 1 << 16 {
            // SAFETY: the caller's promise: the whole output is ours.
            unsafe { self.rows(w, 0, rows, out) };
            return;
        }
        (0..tasks).into_par_iter().for_each(|task| {
            let r0 = task * task_rows;
            let r1 = (r0 + task_rows).min(rows);
            // SAFETY: tasks write disjoint column ranges r0..r1 of every output row of the caller's output.
            unsafe { self.rows(w, r0, r1, out) };
        });
    }

    /// Writes output columns `r0..r1` for every token.
    ///
    /// # Safety
    /// `y` points to `ntok × w.rows` values and no other thread writes columns `r0..r1` meanwhile.
    unsafe fn rows(&self, w: &Mat, r0: usize, r1: usize, y: Out) {
        let weights = Weights::of(w);
        match &self.data {
            Prepared::F32(x) => {
                let rm = w.row_major().expect("f32 kernels get row-major weights: packing follows the kernel");
                // SAFETY: forwarded from the caller.
                unsafe {
                    f32::matmul_rows(self.sel.kernel.f32_block(), x, self.ntok, rm, (w.rows, w.cols), (r0, r1), y)
                }
            }
            Prepared::Bf16 { hi, lo } => {
                let split = self.sel.precision == Precision::Split;
                let lo = if split { Some(&**lo) } else { None };
                match self.sel.kernel {
                    // SAFETY: forwarded from the caller; the kernel was checked when selected.
                    Kernel::Amx => unsafe { amx::matmul_rows(&weights, hi, lo, self.ntok, (r0, r1), y) },
                    // SAFETY: as above.
                    _ => unsafe { bf16::matmul_rows(&weights, hi, lo, self.ntok, (r0, r1), y) },
                }
            }
        }
    }
}

fn run(sel: Selection, x: &[f32], ntok: usize, w: &Mat, y: &mut [f32], parallel: bool) {
    Activations::with(sel, x, ntok, w.cols).matmul(w, y, parallel);
}

/// A weight matrix as the bf16 kernels see it: packed groups, either stored so or re-laid on demand.
pub(crate) struct Weights<'w> {
    pub rows: usize,
    pub cols: usize,
    pub chunks: usize,
    source: WeightSource<'w>,
}

enum WeightSource<'w> {
    Packed { data: &'w [Bf16], group: usize },
    RowMajor(&'w [Bf16]),
}

impl<'w> Weights<'w> {
    fn of(w: &'w Mat) -> Self {
        let source = match w.layout() {
            Layout::Packed { group } => WeightSource::Packed { data: w.stored(), group },
            Layout::RowMajor => WeightSource::RowMajor(w.stored()),
        };
        Weights { rows: w.rows, cols: w.cols, chunks: w.cols.div_ceil(CHUNK), source }
    }

    /// Whether the weights are stored packed (groups one after another), not re-laid on demand.
    pub fn is_packed(&self) -> bool {
        matches!(self.source, WeightSource::Packed { .. })
    }

    /// The packed values of row group `g` (rows `g·group..`) for a kernel reading groups of `group` rows:
    /// `chunks × group × CHUNK` values, borrowed when stored so, else re-laid into `buf`.
    pub fn group<'b>(&'b self, g: usize, group: usize, buf: &'b mut Aligned) -> &'b [Bf16] {
        let len = self.chunks * group * CHUNK;
        match self.source {
            WeightSource::Packed { data, group: stored } if stored == group => &data[g * len..(g + 1) * len],
            WeightSource::Packed { .. } => unreachable!("packed weights follow the process's kernel"),
            WeightSource::RowMajor(data) => {
                buf.zero(len);
                let r0 = g * group;
                pack(data, self.cols, (r0, (r0 + group).min(self.rows)), group, buf.as_bf16_mut());
                buf.as_bf16()
            }
        }
    }
}

/// The output pointer shared by the tasks of one matmul.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: used only to write disjoint regions from parallel tasks, as documented at each use.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    /// `y` in f64, and `Σ|x·w|` per element (the scale rounding errors are relative to).
    fn reference(x: &[f32], ntok: usize, w: &Mat) -> (Vec<f64>, Vec<f64>) {
        let wd = w.data();
        let mut y = vec![0f64; ntok * w.rows];
        let mut mag = vec![0f64; ntok * w.rows];
        for t in 0..ntok {
            for r in 0..w.rows {
                for c in 0..w.cols {
                    let p = x[t * w.cols + c] as f64 * wd[r * w.cols + c].to_f64();
                    y[t * w.rows + r] += p;
                    mag[t * w.rows + r] += p.abs();
                }
            }
        }
        (y, mag)
    }

    fn weights(rows: usize, cols: usize, seed: u32) -> Mat {
        Mat::from_vec(rows, cols, pseudo(rows * cols, seed).into_iter().map(Bf16::from_f32).collect())
    }

    /// Every kernel this CPU has (the AMX kernel's data flow is also tested on an emulated tile unit, in `amx`).
    fn kernels() -> Vec<Kernel> {
        let have = Kernel::available();
        for k in Kernel::ALL {
            if let Err(why) = k.check() {
                eprintln!("skipped kernel {}: {why}", k.name());
            }
        }
        have
    }

    /// Relative bound per precision: bf16 pairs with f32 accumulation over K terms.
    fn bound(sel: Selection, k: usize) -> f64 {
        let acc = k as f64 * 2f64.powi(-24);
        match (sel.kernel.group(), sel.precision) {
            (_, Precision::Bf16) => 2f64.powi(-8) + acc,
            (Some(_), Precision::Split) => 2f64.powi(-16) + acc,
            (None, Precision::Split) => acc,
        }
    }

    fn check_against_reference(sels: &[Selection]) {
        // K and N with tails (not multiples of 16 or 32), M from 1 to 300 across token blocks.
        for &(rows, cols) in &[(7, 45), (130, 96), (65, 1000), (33, 2048)] {
            let w = weights(rows, cols, 7);
            for ntok in [1, 2, 3, 4, 5, 9, 16, 17, 63, 64, 65, 130, 300] {
                if rows * cols * ntok > 40_000_000 {
                    continue;
                }
                let x = pseudo(ntok * cols, ntok as u32);
                let (want, mag) = reference(&x, ntok, &w);
                for &sel in sels {
                    for parallel in [false, true] {
                        let mut y = vec![f32::NAN; ntok * rows];
                        matmul_with(sel, &x, ntok, &w, &mut y, parallel);
                        let tol = bound(sel, cols) * 2.0;
                        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                            let err = (*a as f64 - b).abs();
                            assert!(
                                err <= tol * mag[i] + 1e-30,
                                "{} {}: {rows}x{cols} ntok={ntok} element {i}: {a} vs {b} (err {err:e}, bound {:e})",
                                sel.kernel.name(),
                                sel.precision.name(),
                                tol * mag[i]
                            );
                        }
                    }
                }
            }
        }
    }

    fn selections(kernels: &[Kernel]) -> Vec<Selection> {
        kernels
            .iter()
            .flat_map(|&kernel| [Precision::Split, Precision::Bf16].map(|precision| Selection { kernel, precision }))
            .collect()
    }

    #[test]
    fn every_kernel_matches_f64_reference() {
        check_against_reference(&selections(&kernels()));
    }

    /// The split precision is far tighter than the one-pass one (so the test above is not vacuous about it).
    #[test]
    fn split_precision_is_tighter_than_bf16() {
        let (rows, cols, ntok) = (64, 512, 8);
        let w = weights(rows, cols, 5);
        let x = pseudo(ntok * cols, 9);
        let (want, _) = reference(&x, ntok, &w);
        for kernel in kernels().into_iter().filter(|k| k.group().is_some()) {
            let err = |precision| {
                let mut y = vec![0f32; ntok * rows];
                matmul_with(Selection { kernel, precision }, &x, ntok, &w, &mut y, false);
                y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max)
            };
            let (split, one) = (err(Precision::Split), err(Precision::Bf16));
            assert!(split * 50.0 < one, "{}: split {split:e} vs bf16 {one:e}", kernel.name());
        }
    }

    /// A token's output is bit-identical whatever else is in the batch, for every kernel and precision, and whether
    /// the weights are packed at load or re-laid on the fly.
    #[test]
    fn batch_invariant() {
        let (rows, cols) = (300, 520);
        let w = weights(rows, cols, 11);
        let x = pseudo(150 * cols, 3);
        for sel in selections(&kernels()) {
            let packed = sel.kernel.group().map(|group| w.packed_copy(group));
            let mut all = vec![0f32; 150 * rows];
            matmul_with(sel, &x, 150, &w, &mut all, true);
            for t in [0, 1, 15, 16, 17, 63, 64, 65, 149] {
                let mut one = vec![0f32; rows];
                matmul_with(sel, &x[t * cols..(t + 1) * cols], 1, &w, &mut one, true);
                assert_eq!(one, all[t * rows..(t + 1) * rows], "{sel:?} token {t}");
                let mut three = vec![0f32; 3 * rows];
                let s = t.min(147);
                matmul_with(sel, &x[s * cols..(s + 3) * cols], 3, &w, &mut three, false);
                assert_eq!(
                    three[(t - s) * rows..(t - s + 1) * rows],
                    all[t * rows..(t + 1) * rows],
                    "{sel:?} {t} in 3"
                );
                if let Some(p) = &packed {
                    let mut alone = vec![0f32; rows];
                    matmul_with(sel, &x[t * cols..(t + 1) * cols], 1, p, &mut alone, false);
                    assert_eq!(alone, one, "{sel:?} token {t}, packed weights");
                }
            }
        }
    }

    #[test]
    fn pack_lays_groups_of_chunks() {
        let (rows, cols) = (5, 40);
        let src: Vec<Bf16> = (0..rows * cols).map(|i| Bf16::from_f32(i as f32)).collect();
        let group = 4;
        let mut dst = vec![Bf16::from_f32(-1.0); packed_len(rows, cols, group)];
        pack(&src, cols, (0, rows), group, &mut dst);
        assert_eq!(dst.len(), 2 * 2 * 4 * CHUNK);
        let at = |g: usize, c: usize, i: usize, j: usize| dst[((g * 2 + c) * group + i) * CHUNK + j].to_f32();
        assert_eq!(at(0, 0, 1, 3), (cols + 3) as f32);
        assert_eq!(at(0, 1, 2, 7), (2 * cols + 39) as f32);
        assert_eq!(at(0, 1, 2, 8), 0.0, "column tail zero-padded");
        assert_eq!(at(1, 0, 0, 0), (4 * cols) as f32);
        assert_eq!(at(1, 0, 1, 0), 0.0, "row tail zero-padded");
    }

    #[test]
    fn pack_lays_amx_groups_as_pairs() {
        let (rows, cols) = (20, 40);
        let src: Vec<Bf16> = (0..rows * cols).map(|i| Bf16::from_f32(i as f32)).collect();
        let group = amx::GROUP;
        let mut dst = vec![Bf16::from_f32(-1.0); packed_len(rows, cols, group)];
        pack(&src, cols, (0, rows), group, &mut dst);
        // Group g, chunk c, row i, column j of the chunk.
        let at = |g: usize, c: usize, i: usize, j: usize| {
            dst[((g * 2 + c) * group * CHUNK) + (j / 2) * 2 * group + 2 * i + j % 2].to_f32()
        };
        for (g, c, i, j) in [(0, 0, 0, 0), (0, 0, 1, 3), (0, 1, 15, 7), (1, 0, 3, 31), (1, 1, 2, 5)] {
            let (r, col) = (g * group + i, c * CHUNK + j);
            let want = if r < rows && col < cols { src[r * cols + col].to_f32() } else { 0.0 };
            assert_eq!(at(g, c, i, j), want, "group {g} chunk {c} row {i} column {j}");
        }
        assert_eq!(at(0, 1, 2, 8), 0.0, "column tail zero-padded");
        assert_eq!(at(1, 0, 4, 0), 0.0, "row tail zero-padded");
    }

    /// `product` (a new, unzeroed output) has the bits of `matmul` into a buffer of NaNs, with tails everywhere.
    #[test]
    fn product_equals_matmul() {
        let w = resident_copy(&weights(37, 70, 2));
        for ntok in [1, 17, 40] {
            let x = pseudo(ntok * 70, 9);
            let a = Activations::new(&x, ntok, 70);
            let mut y = vec![f32::NAN; ntok * 37];
            a.matmul(&w, &mut y, true);
            let got = a.product(&w, true);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn split_keeps_sixteen_bits() {
        for &x in &[1.0f32, -3.3333333, 1e-20, 6.5e4, 0.1, -7.77e-3] {
            let (hi, lo) = split_bf16(x);
            let back = f32::from_bits(u32::from(hi) << 16) + f32::from_bits(u32::from(lo) << 16);
            assert!(((back - x) / x).abs() < 2f32.powi(-16), "{x}: {back}");
        }
        assert!(f32::from_bits(u32::from(round_bf16(f32::NAN)) << 16).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), 0x7f80);
        // Ties to even: 1 + 2⁻⁸ lies halfway between two bf16 values and goes to the even one, 1.
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
    }
}
