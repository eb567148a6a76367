//! The AMX kernel: `TDPBF16PS` on tiles, C (16 tokens × 16 weight rows, f32) += A (16 tokens × 32 bf16 of K) ·
//! B (16 K-pairs × 16 weight rows × 2 bf16).
//!
//! The weights are the B operand: a packed group of [`GROUP`] rows is a sequence of 1 KiB tiles in the pair
//! ("VNNI") layout, one per 32-column chunk, re-laid once at load ([`super::pack`]); the activations become A tiles
//! when they are converted ([`prepare`]), a plain row of 32 bf16 per token. The output tile is `y` itself for 16
//! tokens × 16 rows, so it is copied out row by row, with no transposition.
//!
//! Registers: two weight tiles (tmm4, tmm5: row groups g and g+1) and two token tiles (tmm6, tmm7) feed four
//! accumulators (tmm0–tmm3), so each tile loaded is used twice; tiles are not renamed, so the four products between
//! two loads are independent of each other. For each chunk every accumulator gets the high part, then the low part:
//! the same sequence for every element whatever the number of tokens (a lone token rides in a tile of zeros, and a
//! missing partner group or tile only skips products), which keeps the results batch-invariant.
//!
//! The tile instructions are written as inline assembly (Rust has no stable AMX intrinsics) behind the [`TileUnit`]
//! trait, whose other implementation, [`Emulated`], does the same operations in plain Rust as the Intel SDM defines
//! them. The tests run the kernel's whole data flow (packing, the pair layout, tile offsets, the copy out) through the
//! emulation on every machine; on a CPU with AMX, the hardware is also checked against the emulation once, when the
//! kernel is first asked for, and refused (with the reason) if they disagree.

use half::bf16;

use super::{Aligned, Out, Weights, CHUNK};

/// Rows per packed group: one A tile's rows.
pub(crate) const GROUP: usize = 16;
/// Tokens per B tile.
const TILE_TOKENS: usize = 16;
/// Token tiles, and row groups, multiplied at once (into tmm0–tmm3).
const PAIR: usize = 2;
/// u16 values per tile (1 KiB).
const TILE: usize = 512;
/// One output tile, on a cache line (see [`Aligned`]).
#[repr(C, align(64))]
struct OutTile([f32; GROUP * TILE_TOKENS]);

/// Weight bytes multiplied by all tokens before the next ones are read (see [`rows_on`]).
const PANEL_BYTES: usize = 1 << 20;

/// Converts `ntok × k` activations into A tiles: `[token tile][chunk][token][CHUNK]`, zero-padded in tokens and
/// columns; `(hi, lo)`, `lo` empty unless `split`. Vectorised where the CPU has AVX-512 (every AMX CPU does), with
/// the same bits as [`prepare_scalar`] (tested).
pub(crate) fn prepare(x: &[f32], ntok: usize, k: usize, split: bool) -> (Aligned, Aligned) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let len = ntok.div_ceil(TILE_TOKENS) * k.div_ceil(CHUNK) * TILE;
        // The vector conversion stores every tile whole (zeros where there are no tokens or columns), so the
        // buffers need no zeroing first.
        let mut hi = super::scratch_for_overwrite(len);
        let mut lo = if split { super::scratch_for_overwrite(len) } else { Aligned::default() };
        // SAFETY: the CPU has AVX-512F; the buffers hold every tile of the activations.
        unsafe { x86::prepare(x, ntok, k, &mut hi, split.then_some(&mut *lo)) };
        return (hi, lo);
    }
    let (h, l) = prepare_scalar(x, ntok, k, split);
    let copy = |v: Vec<u16>| {
        let mut a = Aligned::zeroed(v.len());
        a.copy_from_slice(&v);
        a
    };
    (copy(h), copy(l))
}

/// [`prepare`] one value at a time: the reference, and the path for CPUs without AVX-512 (the emulated tests).
pub(crate) fn prepare_scalar(x: &[f32], ntok: usize, k: usize, split: bool) -> (Vec<u16>, Vec<u16>) {
    let chunks = k.div_ceil(CHUNK);
    let tiles = ntok.div_ceil(TILE_TOKENS);
    let mut hi = vec![0u16; tiles * chunks * TILE];
    let mut lo = if split { vec![0u16; tiles * chunks * TILE] } else { Vec::new() };
    for t in 0..ntok {
        let (tt, ti) = (t / TILE_TOKENS, t % TILE_TOKENS);
        let row = &x[t * k..(t + 1) * k];
        for (c, cols) in row.chunks(CHUNK).enumerate() {
            let at = (tt * chunks + c) * TILE + ti * CHUNK;
            for (j, v) in cols.iter().enumerate() {
                if split {
                    (hi[at + j], lo[at + j]) = super::split_bf16(*v);
                } else {
                    hi[at + j] = super::round_bf16(*v);
                }
            }
        }
    }
    (hi, lo)
}

/// Token tiles up to this many bytes take the weights-outermost order (see [`rows_on`]).
const ACTS_OUTER_BYTES: usize = 1 << 20;

/// How many chunks ahead the weight tiles are prefetched (1-4 measured alike on a 512 × 2048 expert at 64 tokens
/// with its weights in memory, 0.37 ms instead of 0.41 ms; 8 and 16 less).
const PREFETCH_CHUNKS: usize = 4;

/// Asks for the 16 cache lines of a tile at `p` (a hint: it never faults, whatever `p` is).
#[inline(always)]
fn prefetch_tile(p: *const u16) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..16 {
        // SAFETY: a prefetch is only a hint and never faults, even past the end of an allocation.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(line * 32).cast())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Writes one output tile (`c[ti·16 + n]`: 16 tokens × 16 weight rows) to `y`: `rows_here` columns from `col` of
/// `tokens` token rows from `first`.
///
/// # Safety
/// `y` points to `(first + tokens) × stride` values and no other thread writes those columns meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn write_out(
    c: &[f32; GROUP * TILE_TOKENS],
    y: Out,
    stride: usize,
    first: usize,
    tokens: usize,
    col: usize,
    rows_here: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: forwarded from the caller; the CPU has AVX-512F.
        unsafe { x86::write_out(c, y, stride, first, tokens, col, rows_here) };
        return;
    }
    for ti in 0..tokens {
        for n in 0..rows_here {
            // SAFETY: (first+ti, col+n) is inside y and the column belongs to this call.
            unsafe { *y.0.add((first + ti) * stride + col + n) = c[ti * GROUP + n] };
        }
    }
}

/// The tile operations the kernel uses, with the register as a const parameter.
///
/// # Safety
/// Implementations may execute AMX instructions: callers hold the tile state configured by [`TileUnit::config`]
/// between it and [`TileUnit::release`], and pass pointers to 16 rows of 64 readable (or writable) bytes at `stride`.
pub(crate) unsafe trait TileUnit {
    /// Configures tmm0–tmm7 as 16 rows × 64 bytes.
    unsafe fn config(&mut self);
    unsafe fn zero<const T: u8>(&mut self);
    unsafe fn load<const T: u8>(&mut self, p: *const u16, stride: usize);
    /// `tmm[C] += tmm[A] · tmm[B]` (bf16 pairs, f32 accumulation).
    unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self);
    unsafe fn store<const T: u8>(&mut self, p: *mut f32, stride: usize);
    unsafe fn release(&mut self);
}

/// Writes output columns `r0..r1` of every token on the hardware tile unit.
///
/// # Safety
/// AMX is available ([`available`] returned `Ok`); `y` points to `ntok × w.rows` values, no other thread writes
/// columns `r0..r1` meanwhile, `r0` is a multiple of [`GROUP`], and `hi` (and `lo`) come from [`prepare`] with
/// `w.cols` columns.
pub(super) unsafe fn matmul_rows(
    w: &Weights<'_>,
    hi: &[u16],
    lo: Option<&[u16]>,
    ntok: usize,
    rows: (usize, usize),
    y: Out,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        rows_on(&mut x86::Hardware, w, hi, lo, ntok, rows, y)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AMX is only selected on x86-64 ({}, {}, {:?}, {ntok}, {rows:?}, {:p})", w.rows, hi.len(), lo, y.0);
}

/// Weight rows per parallel task: one block of [`PANEL_BYTES`] (every task streams all the token tiles, so small
/// tasks multiply the traffic of the activations).
pub(super) fn task_rows(cols: usize) -> usize {
    (PANEL_BYTES / (cols.div_ceil(CHUNK) * TILE * 2)).max(PAIR).next_multiple_of(PAIR) * GROUP
}

/// The kernel's loop on any tile unit.
///
/// # Safety
/// As [`matmul_rows`], with `unit` usable (the emulation always is).
pub(crate) unsafe fn rows_on<U: TileUnit>(
    unit: &mut U,
    w: &Weights<'_>,
    hi: &[u16],
    lo: Option<&[u16]>,
    ntok: usize,
    (r0, r1): (usize, usize),
    y: Out,
) {
    let chunks = w.chunks;
    let tiles = ntok.div_ceil(TILE_TOKENS);
    assert!(hi.len() >= tiles * chunks * TILE && lo.is_none_or(|l| l.len() >= tiles * chunks * TILE));
    let mut buf = [Aligned::default(), Aligned::default()];
    let mut c_out = OutTile([0f32; GROUP * TILE_TOKENS]);
    // Row groups are taken in blocks of about PANEL_BYTES of weights (at least a pair), each multiplied by every
    // token before the next: the block stays in L2 while the token tiles pass by, so weights are read from memory
    // once per call. (Measured on 1024 × 2048 at 64 and 256 tokens: 1 MiB beat 128 KiB-256 KiB and the whole matrix;
    // runs of chunks with the accumulators spilled between them, to keep token tiles in L1, did not pay.)
    let (g0, g1) = (r0 / GROUP, r1.div_ceil(GROUP));
    let pf = PREFETCH_CHUNKS;
    // Small token sets (all their tiles fit in L2 beside the weights) go through every token pair for one pair of
    // groups before the next pair of groups, so each weight tile comes from memory once and the next pair's stream
    // overlaps the products; large ones go through every pair of groups of the block for one token pair.
    let weights_outer = tiles * chunks * TILE * 2 * (1 + usize::from(lo.is_some())) <= ACTS_OUTER_BYTES;
    let packed = w.is_packed();
    let block = task_rows(w.cols) / GROUP;
    // SAFETY: between config and release; every pointer below addresses a whole tile inside its slice (asserted
    // sizes: a panel holds chunks × GROUP × CHUNK values, hi/lo tiles × chunks × TILE); a whole output tile stored
    // into y covers 16 token rows and 16 columns of this call's rows, inside y by the caller's promise.
    unsafe {
        unit.config();
        for gb in (g0..g1).step_by(block) {
            let gend = (gb + block).min(g1);
            let t_pairs = tiles.div_ceil(PAIR);
            let g_pairs = (gend - gb).div_ceil(PAIR);
            for step in 0..t_pairs * g_pairs {
                let (tp, gp) =
                    if weights_outer { (step % t_pairs, step / t_pairs) } else { (step / g_pairs, step % g_pairs) };
                let (t0, g) = (tp * PAIR, gb + gp * PAIR);
                let two_tiles = t0 + 1 < tiles;
                {
                    let two_groups = g + 1 < gend;
                    // What to bring in while this pair multiplies: the weights a few chunks ahead on their first
                    // pass; on the last pass over a pair of groups (weights outermost), the next pair's.
                    let ahead = if !weights_outer || tp == 0 { pf } else { 0 };
                    let next_pair = weights_outer && packed && tp + 1 == t_pairs && t_pairs > 1 && gp + 1 < g_pairs;
                    let [buf0, buf1] = &mut buf;
                    let pa = w.group(g, GROUP, buf0).as_ptr().cast::<u16>();
                    let pb = if two_groups { w.group(g + 1, GROUP, buf1).as_ptr().cast::<u16>() } else { pa };
                    // Accumulator 2i + j holds group g+i, token tile t0+j.
                    unit.zero::<0>();
                    unit.zero::<1>();
                    unit.zero::<2>();
                    unit.zero::<3>();
                    let (x0, x1) = (t0 * chunks * TILE, (t0 + 1) * chunks * TILE);
                    for c in 0..chunks {
                        // Weights a few chunks ahead, so that the stream from memory overlaps the products (a tile
                        // load that misses stalls the unit). Past a panel's end this reads ahead into the next one.
                        if ahead > 0 {
                            prefetch_tile(pa.wrapping_add((c + ahead) * TILE));
                            if two_groups {
                                prefetch_tile(pb.wrapping_add((c + ahead) * TILE));
                            }
                        }
                        if next_pair {
                            prefetch_tile(pa.wrapping_add((PAIR * chunks + c) * TILE));
                            prefetch_tile(pa.wrapping_add(((PAIR + 1) * chunks + c) * TILE));
                        }
                        unit.load::<4>(pa.add(c * TILE), 64);
                        if two_groups {
                            unit.load::<5>(pb.add(c * TILE), 64);
                        }
                        for part in [Some(hi), lo].into_iter().flatten() {
                            let at = part.as_ptr().add(c * TILE);
                            unit.load::<6>(at.add(x0), 64);
                            if two_tiles {
                                unit.load::<7>(at.add(x1), 64);
                            }
                            unit.dp::<0, 6, 4>();
                            if two_groups {
                                unit.dp::<2, 6, 5>();
                            }
                            if two_tiles {
                                unit.dp::<1, 7, 4>();
                                if two_groups {
                                    unit.dp::<3, 7, 5>();
                                }
                            }
                        }
                    }
                    for acc in 0..4 {
                        let (i, j) = (acc / 2, acc % 2);
                        if (i == 1 && !two_groups) || (j == 1 && !two_tiles) {
                            continue;
                        }
                        let (gi, first) = (g + i, (t0 + j) * TILE_TOKENS);
                        let (rows_here, tokens) = ((r1 - gi * GROUP).min(GROUP), (ntok - first).min(TILE_TOKENS));
                        // A whole tile goes straight into y; a partial one through the spare tile.
                        let whole = rows_here == GROUP && tokens == TILE_TOKENS;
                        let (p, stride) = if whole {
                            (y.0.add(first * w.rows + gi * GROUP), w.rows * 4)
                        } else {
                            (c_out.0.as_mut_ptr(), 64)
                        };
                        match acc {
                            0 => unit.store::<0>(p, stride),
                            1 => unit.store::<1>(p, stride),
                            2 => unit.store::<2>(p, stride),
                            _ => unit.store::<3>(p, stride),
                        }
                        if !whole {
                            write_out(&c_out.0, y, w.rows, first, tokens, gi * GROUP, rows_here);
                        }
                    }
                }
            }
        }
        unit.release();
    }
}

/// The tile unit in plain Rust, as the SDM defines `TDPBF16PS` (per element: for each K pair, the even product then
/// the odd one added in f32, round to nearest even; bf16 products are exact in f32).
pub(crate) struct Emulated {
    tiles: [[u16; TILE]; 8],
}

impl Emulated {
    pub(crate) fn new() -> Self {
        Emulated { tiles: [[0; TILE]; 8] }
    }

    fn f32_at(&self, t: usize, i: usize) -> f32 {
        f32::from_bits(u32::from(self.tiles[t][2 * i]) | (u32::from(self.tiles[t][2 * i + 1]) << 16))
    }

    fn set_f32(&mut self, t: usize, i: usize, v: f32) {
        let b = v.to_bits();
        self.tiles[t][2 * i] = b as u16;
        self.tiles[t][2 * i + 1] = (b >> 16) as u16;
    }
}

fn widen(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

// SAFETY: the emulation touches only its own arrays and the pointers the trait's contract describes.
unsafe impl TileUnit for Emulated {
    unsafe fn config(&mut self) {
        self.tiles = [[0; TILE]; 8];
    }

    unsafe fn zero<const T: u8>(&mut self) {
        self.tiles[T as usize] = [0; TILE];
    }

    unsafe fn load<const T: u8>(&mut self, p: *const u16, stride: usize) {
        for r in 0..16 {
            for i in 0..32 {
                // SAFETY: the caller points at 16 rows of 64 readable bytes at `stride`.
                self.tiles[T as usize][r * 32 + i] = unsafe { *p.cast::<u8>().add(r * stride).cast::<u16>().add(i) };
            }
        }
    }

    unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self) {
        for m in 0..16 {
            for n in 0..16 {
                let mut acc = self.f32_at(C as usize, m * 16 + n);
                for k in 0..16 {
                    let a = &self.tiles[A as usize][m * 32 + 2 * k..m * 32 + 2 * k + 2];
                    let b = &self.tiles[B as usize][k * 32 + 2 * n..k * 32 + 2 * n + 2];
                    acc += widen(a[0]) * widen(b[0]);
                    acc += widen(a[1]) * widen(b[1]);
                }
                self.set_f32(C as usize, m * 16 + n, acc);
            }
        }
    }

    unsafe fn store<const T: u8>(&mut self, p: *mut f32, stride: usize) {
        for r in 0..16 {
            for i in 0..16 {
                // SAFETY: the caller points at 16 rows of 64 writable bytes at `stride`.
                unsafe { *p.cast::<u8>().add(r * stride).cast::<f32>().add(i) = self.f32_at(T as usize, r * 16 + i) };
            }
        }
    }

    unsafe fn release(&mut self) {}
}

/// Whether CPUID reports AMX-TILE and AMX-BF16 (what the OS allows is checked by [`available`]).
pub(super) fn cpu_claims_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid_count;
        // Leaf 7 is read only when the maximum leaf (leaf 0) includes it.
        if __cpuid_count(0, 0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this process may run the AMX kernel: the CPU has it, the OS grants the tile state (asked once per
/// process with `arch_prctl(ARCH_REQ_XCOMP_PERM)`; Linux grants it to every thread of the process), and the hardware
/// agrees with the emulation on a small problem.
pub(super) fn available() -> Result<(), String> {
    use std::sync::OnceLock;
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if !cpu_claims_amx() {
                return Err("the CPU lacks AMX-TILE and AMX-BF16".into());
            }
            request_tile_state()?;
            self_check()
        })
        .clone()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permitted XSAVE features.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if rc != 0 {
        return Err(format!("the kernel refused the AMX tile state: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_state() -> Result<(), String> {
    Err("AMX is only enabled on Linux".into())
}

/// Runs a 40-row × 100-column × 37-token problem on the hardware and on the emulation and compares them.
fn self_check() -> Result<(), String> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::weights::Mat;
        let (rows, cols, ntok) = (40, 100, 37);
        let val = |i: usize, m: u32| ((i as u32).wrapping_mul(m) % 1009) as f32 / 1009.0 - 0.5;
        let w = Mat::from_vec(rows, cols, (0..rows * cols).map(|i| bf16::from_f32(val(i, 7919))).collect());
        let x: Vec<f32> = (0..ntok * cols).map(|i| val(i, 104_729) * 3.0).collect();
        let (hi, lo) = prepare(&x, ntok, cols, true);
        let weights = Weights::of(&w);
        let mut hw = vec![0f32; ntok * rows];
        let mut emu = vec![0f32; ntok * rows];
        // SAFETY: the tile state was granted; sizes follow from prepare and the matrix.
        unsafe {
            rows_on(&mut x86::Hardware, &weights, &hi, Some(&lo), ntok, (0, rows), Out(hw.as_mut_ptr()));
            rows_on(&mut Emulated::new(), &weights, &hi, Some(&lo), ntok, (0, rows), Out(emu.as_mut_ptr()));
        }
        let worst = hw.iter().zip(&emu).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
        if worst.is_nan() || worst > 1e-5 {
            return Err(format!("the tile unit disagrees with its emulation (relative difference {worst:e})"));
        }
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err("not an x86-64 CPU".into())
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    use std::arch::x86_64::*;

    use super::{Out, TileUnit, CHUNK, GROUP, TILE, TILE_TOKENS};

    /// `round_bf16` on 16 lanes: the f32 bits rounded to their top 16, ties to even, NaN kept quiet; same bits.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn round16(v: __m512) -> __m512i {
        let b = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        _mm512_mask_blend_epi32(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), rounded, quiet)
    }

    /// 32 values (`a` then `b`) as 16 lanes of bf16 pairs, value 2j in the low half of lane j.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn pairs(a: __m512i, b: __m512i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)), _mm512_cvtepi32_epi16(b))
    }

    /// The vector form of `prepare_scalar`, writing every value of the tiles (zeros past the last token and column).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x` holds `ntok × k` values, `hi` (and `lo`) `⌈ntok/16⌉ × ⌈k/32⌉` tiles.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn prepare(x: &[f32], ntok: usize, k: usize, hi: &mut [u16], mut lo: Option<&mut [u16]>) {
        let chunks = k.div_ceil(CHUNK);
        let tiles = ntok.div_ceil(TILE_TOKENS);
        assert!(x.len() >= ntok * k && hi.len() >= tiles * chunks * TILE);
        assert!(lo.as_ref().is_none_or(|l| l.len() >= tiles * chunks * TILE));
        let zero = _mm512_setzero_si512();
        for tt in 0..tiles {
            let tokens = (ntok - tt * TILE_TOKENS).min(TILE_TOKENS);
            for c in 0..chunks {
                let width = (k - c * CHUNK).min(CHUNK);
                let m0: __mmask16 = if width >= 16 { 0xffff } else { (1u16 << width) - 1 };
                let m1: __mmask16 = if width >= 32 {
                    0xffff
                } else if width > 16 {
                    (1u16 << (width - 16)) - 1
                } else {
                    0
                };
                let base = (tt * chunks + c) * TILE;
                for ti in 0..TILE_TOKENS {
                    let (h, l) = if ti < tokens {
                        // SAFETY: the row's columns c·32..c·32+width are inside x; the masks stop at width.
                        let (a, b) = unsafe {
                            let p = x.as_ptr().add((tt * TILE_TOKENS + ti) * k + c * CHUNK);
                            (_mm512_maskz_loadu_ps(m0, p), _mm512_maskz_loadu_ps(m1, p.add(16)))
                        };
                        let (ha, hb) = (round16(a), round16(b));
                        let widen = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                        let l = if lo.is_some() {
                            pairs(round16(_mm512_sub_ps(a, widen(ha))), round16(_mm512_sub_ps(b, widen(hb))))
                        } else {
                            zero
                        };
                        (pairs(ha, hb), l)
                    } else {
                        (zero, zero)
                    };
                    // SAFETY: the tile's row ti (64 bytes) is inside hi, and inside lo when there is one.
                    unsafe {
                        _mm512_storeu_si512(hi.as_mut_ptr().add(base + ti * CHUNK).cast(), h);
                        if let Some(lo) = lo.as_deref_mut() {
                            _mm512_storeu_si512(lo.as_mut_ptr().add(base + ti * CHUNK).cast(), l);
                        }
                    }
                }
            }
        }
    }

    /// The vector form of `write_out`: one masked copy per token row.
    ///
    /// # Safety
    /// As `write_out`, and the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn write_out(
        c: &[f32; GROUP * TILE_TOKENS],
        y: Out,
        stride: usize,
        first: usize,
        tokens: usize,
        col: usize,
        rows_here: usize,
    ) {
        let mask: __mmask16 = if rows_here >= 16 { 0xffff } else { (1u16 << rows_here) - 1 };
        for ti in 0..tokens {
            // SAFETY: row ti of the tile is 16 values inside c; columns col..col+rows_here of token row first+ti are
            // inside y and belong to this call.
            unsafe {
                let v = _mm512_loadu_ps(c.as_ptr().add(ti * GROUP));
                _mm512_mask_storeu_ps(y.0.add((first + ti) * stride + col), mask, v);
            }
        }
    }

    /// The tile configuration of palette 1: tmm0–tmm6 as 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// The CPU's tile unit.
    pub(super) struct Hardware;

    // SAFETY: each method is one AMX instruction on the registers and pointers the trait's contract describes.
    unsafe impl TileUnit for Hardware {
        unsafe fn config(&mut self) {
            let cfg = TileConfig {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
                rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
            };
            // SAFETY: a valid palette-1 configuration; the tile state was granted (the caller's promise).
            unsafe { asm!("ldtilecfg [{0}]", in(reg) &cfg, options(nostack, readonly)) };
        }

        unsafe fn zero<const T: u8>(&mut self) {
            // SAFETY: a configured tile register.
            unsafe {
                match T {
                    0 => asm!("tilezero tmm0", options(nostack, nomem)),
                    1 => asm!("tilezero tmm1", options(nostack, nomem)),
                    2 => asm!("tilezero tmm2", options(nostack, nomem)),
                    3 => asm!("tilezero tmm3", options(nostack, nomem)),
                    _ => unreachable!("the kernel zeroes tmm0 to tmm3"),
                }
            }
        }

        unsafe fn load<const T: u8>(&mut self, p: *const u16, stride: usize) {
            // SAFETY: the caller points at 16 rows of 64 readable bytes at `stride`.
            unsafe {
                match T {
                    0 => asm!("tileloadd tmm0, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    1 => asm!("tileloadd tmm1, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    2 => asm!("tileloadd tmm2, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    3 => asm!("tileloadd tmm3, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    4 => asm!("tileloadd tmm4, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    5 => asm!("tileloadd tmm5, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    6 => asm!("tileloadd tmm6, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    7 => asm!("tileloadd tmm7, [{0} + {1}*1]", in(reg) p, in(reg) stride, options(nostack, readonly)),
                    _ => unreachable!("there are eight tile registers"),
                }
            }
        }

        unsafe fn dp<const C: u8, const A: u8, const B: u8>(&mut self) {
            // SAFETY: configured registers; no memory is touched.
            unsafe {
                match (C, A, B) {
                    (0, 6, 4) => asm!("tdpbf16ps tmm0, tmm6, tmm4", options(nostack, nomem)),
                    (1, 7, 4) => asm!("tdpbf16ps tmm1, tmm7, tmm4", options(nostack, nomem)),
                    (2, 6, 5) => asm!("tdpbf16ps tmm2, tmm6, tmm5", options(nostack, nomem)),
                    (3, 7, 5) => asm!("tdpbf16ps tmm3, tmm7, tmm5", options(nostack, nomem)),
                    _ => unreachable!("accumulator 2i+j takes tokens 6+j and weights 4+i"),
                }
            }
        }

        unsafe fn store<const T: u8>(&mut self, p: *mut f32, stride: usize) {
            // SAFETY: the caller points at 16 rows of 64 writable bytes at `stride`.
            unsafe {
                match T {
                    0 => asm!("tilestored [{0} + {1}*1], tmm0", in(reg) p, in(reg) stride, options(nostack)),
                    1 => asm!("tilestored [{0} + {1}*1], tmm1", in(reg) p, in(reg) stride, options(nostack)),
                    2 => asm!("tilestored [{0} + {1}*1], tmm2", in(reg) p, in(reg) stride, options(nostack)),
                    3 => asm!("tilestored [{0} + {1}*1], tmm3", in(reg) p, in(reg) stride, options(nostack)),
                    _ => unreachable!("the kernel stores tmm0 to tmm3"),
                }
            }
        }

        unsafe fn release(&mut self) {
            // SAFETY: releases this thread's tile state; always valid.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::tests::pseudo;
    use crate::weights::Mat;

    fn run_emulated(x: &[f32], ntok: usize, w: &Mat, split: bool) -> Vec<f32> {
        let (hi, lo) = prepare(x, ntok, w.cols, split);
        let mut y = vec![f32::NAN; ntok * w.rows];
        let weights = Weights::of(w);
        // Two halves of the rows, as two parallel tasks would.
        let half = (w.rows / 2).next_multiple_of(GROUP).min(w.rows);
        for (r0, r1) in [(0, half), (half, w.rows)] {
            if r0 < r1 {
                // SAFETY: the emulation runs anywhere; sizes follow from prepare and the matrix.
                unsafe {
                    rows_on(
                        &mut Emulated::new(),
                        &weights,
                        &hi,
                        lo_opt(&lo, split),
                        ntok,
                        (r0, r1),
                        Out(y.as_mut_ptr()),
                    )
                };
            }
        }
        y
    }

    fn lo_opt(lo: &[u16], split: bool) -> Option<&[u16]> {
        split.then_some(lo)
    }

    /// The kernel's data flow on the emulated tile unit against an f64 reference: tails in rows, columns and tokens,
    /// several token tiles, both precisions.
    #[test]
    fn emulated_kernel_matches_reference() {
        for &(rows, cols) in &[(7, 45), (33, 96), (17, 130)] {
            let w = Mat::from_vec(rows, cols, pseudo(rows * cols, 3).into_iter().map(bf16::from_f32).collect());
            let wd = w.data().to_vec();
            for ntok in [1, 2, 15, 16, 17, 63, 64, 65, 100] {
                let x = pseudo(ntok * cols, ntok as u32 + 1);
                for split in [true, false] {
                    let y = run_emulated(&x, ntok, &w, split);
                    for t in 0..ntok {
                        for r in 0..rows {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for c in 0..cols {
                                let p = f64::from(x[t * cols + c]) * wd[r * cols + c].to_f64();
                                want += p;
                                mag += p.abs();
                            }
                            let got = f64::from(y[t * rows + r]);
                            let tol = if split { 2f64.powi(-15) } else { 2f64.powi(-7) } * mag + 1e-30;
                            assert!(
                                (got - want).abs() <= tol,
                                "{rows}x{cols} ntok {ntok} split {split} ({t},{r}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The vectorised conversion gives the scalar one's bits: tails in tokens and columns, both precisions, and
    /// values that round specially (ties, NaN, infinities, subnormals, the largest finite).
    #[test]
    fn prepare_matches_scalar() {
        let special =
            [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -3e-39, f32::MAX, 1.0 + 1.0 / 256.0];
        for (ntok, k) in [(1, 1), (3, 31), (16, 32), (17, 33), (40, 100), (64, 2048), (5, 48)] {
            let mut x = pseudo(ntok * k, (ntok * k) as u32);
            for (i, v) in special.iter().enumerate() {
                if i * 7 < x.len() {
                    x[i * 7] = *v;
                }
            }
            for split in [true, false] {
                // Spare buffers that hold other values: the conversion must write every one of them.
                for _ in 0..2 {
                    let mut dirty = super::super::scratch(ntok.div_ceil(TILE_TOKENS) * k.div_ceil(CHUNK) * TILE);
                    dirty.fill(0xabcd);
                    super::super::spare(dirty);
                }
                let want = prepare_scalar(&x, ntok, k, split);
                let got = prepare(&x, ntok, k, split);
                assert!(want.0 == *got.0 && want.1 == *got.1, "{ntok}x{k} split {split}");
            }
        }
    }

    /// The tokens-outermost order (token tiles too large for L2) gives the same bits as the weights-outermost one.
    #[test]
    fn emulated_orders_agree() {
        let (rows, cols, ntok): (usize, usize, usize) = (17, 1024, 300);
        assert!(ntok.div_ceil(TILE_TOKENS) * cols.div_ceil(CHUNK) * TILE * 4 > ACTS_OUTER_BYTES, "tokens outermost");
        let w = Mat::from_vec(rows, cols, pseudo(rows * cols, 5).into_iter().map(bf16::from_f32).collect());
        let x = pseudo(ntok * cols, 6);
        let all = run_emulated(&x, ntok, &w, true);
        for t in [0, 31, 32, 299] {
            let one = run_emulated(&x[t * cols..(t + 1) * cols], 1, &w, true);
            assert_eq!(one, all[t * rows..(t + 1) * rows], "token {t}");
        }
    }

    /// A token's outputs on the emulated unit do not depend on the tokens beside it.
    #[test]
    fn emulated_kernel_is_batch_invariant() {
        let (rows, cols) = (40, 70);
        let w = Mat::from_vec(rows, cols, pseudo(rows * cols, 8).into_iter().map(bf16::from_f32).collect());
        let x = pseudo(80 * cols, 4);
        let all = run_emulated(&x, 80, &w, true);
        for t in [0, 15, 16, 63, 64, 79] {
            let one = run_emulated(&x[t * cols..(t + 1) * cols], 1, &w, true);
            assert_eq!(one, all[t * rows..(t + 1) * rows], "token {t}");
        }
    }
}
