//! Checkpoint loading: safetensors files as published on the Hub, memory-mapped.
//!
//! A checkpoint is one `model.safetensors` or shards listed in `model.safetensors.index.json`. Headers are parsed and
//! validated by the `safetensors` crate (which rejects truncated files and overlapping offsets); files are mapped with
//! `memmap2`, so a node that needs a few experts reads only their pages. Matrices are kept as bf16: BF16 tensors are
//! viewed in the map and, by default ([`Residency::Resident`]), copied into a huge-page arena as they are selected; F16
//! and F32 ones are rounded to bf16 once at load. Vectors (norm weights, `A_log`, `dt_bias`, ...) are widened to f32
//! exactly as stored.
//!
//! Names are looked up relative to the text-model prefix, detected once: `model.language_model.` (the official
//! Qwen3.5 layout) or `model.` (Qwen3-Next and files saved from the CausalLM class). `lm_head.weight` is top-level.
//! `model.visual.*` and `mtp.*` are never read.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{ModelError, Result};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// One memory-mapped safetensors file.
#[derive(Debug)]
struct ShardFile {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range inside the file.
    start: usize,
    end: usize,
}

/// Where the weights live while the model serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residency {
    /// Copied out of the page cache into anonymous memory. Decode reads every weight byte each step, and reading
    /// through the file mapping was slower in every back-to-back comparison (`moectl bench-model [--mapped]` on the
    /// bench preset, batch 1: 20.8-21.9 tokens/s mapped against 22.2-25.4 resident, and 16.9 against 21.6 in
    /// another run). Only the selected experts are copied.
    #[default]
    Resident,
    /// Read in place from the memory-mapped files (no copy; pages load on first touch).
    Mapped,
}

/// The bytes behind a bf16 tensor: borrowed from a map, owned after a dtype conversion, or resident in an arena.
#[derive(Debug)]
enum Storage {
    Mapped {
        file: Arc<ShardFile>,
        start: usize,
        len: usize,
    },
    Owned(Vec<bf16>),
    /// Owned values that start on a cache line (packed copies, which the tile unit loads).
    Aligned(crate::cpu::matmul::Aligned),
    /// A region of the resident-weight arena; matrices are carved out of it and written once, before they exist.
    Region(memmap2::MmapRaw),
}

impl Storage {
    /// Returns `len` values from element `offset`.
    fn slice(&self, offset: usize, len: usize) -> &[bf16] {
        match self {
            Storage::Mapped { file, start, len: total } => {
                assert!(offset + len <= *total, "view inside its tensor");
                let bytes = &file.map[*start + offset * 2..*start + (offset + len) * 2];
                // Alignment holds: maps are page-aligned and `start` is even.
                bytemuck::cast_slice(bytes)
            }
            Storage::Owned(v) => &v[offset..offset + len],
            Storage::Aligned(v) => &v.as_bf16()[offset..offset + len],
            Storage::Region(map) => {
                assert!((offset + len) * 2 <= map.len(), "view inside its region");
                // SAFETY: the range lies inside the mapping (asserted), which is page-aligned and lives as long as
                // `self`; it was written completely before the `Mat` that reads it was made, and is never written
                // again, so no mutable access overlaps this shared one.
                unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<bf16>().add(offset), len) }
            }
        }
    }
}

/// Where resident weights are copied: anonymous regions of [`ARENA_CHUNK`] bytes advised for transparent huge pages,
/// filled by bump allocation. Decode reads every weight each step; with 4 KiB pages, the page tables of a few GB of
/// weights (8 MB per 4 GB) no longer fit in cache and every new page costs a table walk from memory. Measured back to
/// back on the bench preset (`moectl bench-model --batch 1`, three pairs of runs): 20.0-25.8 tokens/s with huge pages,
/// 19.6-22.3 without; the process showed 3.9 GB of AnonHugePages.
#[derive(Debug, Default)]
struct Arena {
    current: std::sync::Mutex<Option<(Arc<Storage>, usize)>>,
}

/// Size of one arena region; larger matrices get a region of their own.
const ARENA_CHUNK: usize = 1 << 30;
/// Alignment of matrices inside a region (a cache line).
const ARENA_ALIGN: usize = 64;

impl Arena {
    fn region(bytes: usize) -> std::io::Result<Arc<Storage>> {
        let map = memmap2::MmapMut::map_anon(bytes.max(1))?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: without transparent huge pages the weights still work, with 4 KiB pages.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Arc::new(Storage::Region(memmap2::MmapRaw::from(map))))
    }

    /// Copies the row-major `rows × cols` matrix `src` into the arena in `layout` and returns the region and the
    /// element offset where it now lives.
    fn copy(
        &self,
        src: &[bf16],
        (rows, cols): (usize, usize),
        layout: Layout,
    ) -> std::io::Result<(Arc<Storage>, usize)> {
        let len = match layout {
            Layout::RowMajor => src.len(),
            Layout::Packed { group } => crate::cpu::matmul::packed_len(rows, cols, group),
        };
        let bytes = len * 2;
        let (region, byte_offset) = if bytes > ARENA_CHUNK / 4 {
            (Self::region(bytes)?, 0)
        } else {
            let mut current = self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let fits = current.as_ref().is_some_and(|(_, used)| used + bytes <= ARENA_CHUNK);
            if !fits {
                *current = Some((Self::region(ARENA_CHUNK)?, 0));
            }
            let (region, used) = current.as_mut().expect("set just above");
            let at = *used;
            *used = (at + bytes).next_multiple_of(ARENA_ALIGN);
            (Arc::clone(region), at)
        };
        let Storage::Region(map) = &*region else { unreachable!("arena storages are regions") };
        assert!(byte_offset + bytes <= map.len());
        // SAFETY: `byte_offset..byte_offset + bytes` was handed out once under the lock (or is a fresh region), so no
        // other thread writes or reads it; the source is a distinct allocation; the region is aligned for bf16.
        let dst = unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().add(byte_offset).cast::<bf16>(), len) };
        match layout {
            Layout::RowMajor => dst.copy_from_slice(src),
            Layout::Packed { group } => crate::cpu::matmul::pack(src, cols, (0, rows), group, dst),
        }
        Ok((region, byte_offset / 2))
    }
}

/// How a matrix's values are ordered in its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `[rows][cols]`, as in the checkpoint.
    #[default]
    RowMajor,
    /// Re-laid for the bf16 matmul kernels: `[row group][32-column chunk][row in group][32]`, zero-padded
    /// ([`crate::cpu::matmul::pack`]).
    Packed { group: usize },
}

/// A bf16 matrix `[rows, cols]` (a torch Linear weight is `[out, in]`), or a view of rows of one; row-major unless it
/// was re-laid for the matmul kernel when made resident.
#[derive(Debug, Clone)]
pub struct Mat {
    storage: Arc<Storage>,
    /// Offset of the first element inside the storage.
    offset: usize,
    layout: Layout,
    pub rows: usize,
    pub cols: usize,
}

impl Mat {
    /// Returns the elements, `rows * cols` of them, row-major.
    ///
    /// # Panics
    /// If the matrix was packed for the matmul kernel (only resident weights that are matmul operands are; they
    /// are read through [`crate::cpu::matmul`]).
    pub fn data(&self) -> &[bf16] {
        self.row_major().expect("Mat::data on a matrix packed for the matmul kernel")
    }

    /// The elements row-major, unless the matrix is packed.
    pub fn row_major(&self) -> Option<&[bf16]> {
        (self.layout == Layout::RowMajor).then(|| self.storage.slice(self.offset, self.rows * self.cols))
    }

    /// The stored values in the matrix's layout.
    pub(crate) fn stored(&self) -> &[bf16] {
        self.storage.slice(self.offset, self.stored_len())
    }

    fn stored_len(&self) -> usize {
        match self.layout {
            Layout::RowMajor => self.rows * self.cols,
            Layout::Packed { group } => crate::cpu::matmul::packed_len(self.rows, self.cols, group),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Returns the view of rows `start..end` of a row-major matrix.
    pub fn rows(&self, start: usize, end: usize) -> Mat {
        assert!(start <= end && end <= self.rows, "row range {start}..{end} of a {}-row matrix", self.rows);
        assert_eq!(self.layout, Layout::RowMajor, "row views are taken before packing");
        Mat {
            storage: Arc::clone(&self.storage),
            offset: self.offset + start * self.cols,
            layout: Layout::RowMajor,
            rows: end - start,
            cols: self.cols,
        }
    }

    /// Builds an owned row-major matrix (used by tests and by synthetic models).
    pub fn from_vec(rows: usize, cols: usize, data: Vec<bf16>) -> Mat {
        assert_eq!(data.len(), rows * cols);
        Mat { storage: Arc::new(Storage::Owned(data)), offset: 0, layout: Layout::RowMajor, rows, cols }
    }

    /// An owned copy of a row-major matrix packed in groups of `group` rows.
    pub fn packed_copy(&self, group: usize) -> Mat {
        let mut packed =
            crate::cpu::matmul::Aligned::zeroed(crate::cpu::matmul::packed_len(self.rows, self.cols, group));
        crate::cpu::matmul::pack(self.data(), self.cols, (0, self.rows), group, packed.as_bf16_mut());
        Mat {
            storage: Arc::new(Storage::Aligned(packed)),
            offset: 0,
            layout: Layout::Packed { group },
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// Bytes of weights this matrix holds (what a full pass over it reads).
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * 2
    }
}

#[derive(Deserialize)]
struct IndexJson {
    weight_map: HashMap<String, String>,
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<Arc<ShardFile>>,
    tensors: HashMap<String, TensorEntry>,
    /// `model.language_model.` or `model.`.
    prefix: &'static str,
    residency: Residency,
    arena: Arena,
    /// Bytes of tensor data read so far by `matrix`, `settle` and `vector` (for load progress).
    loaded: std::sync::atomic::AtomicU64,
}

impl Checkpoint {
    /// Opens and validates every safetensors file of the checkpoint in `dir`; matrices are made resident.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, Residency::Resident)
    }

    /// Opens the checkpoint in `dir`, keeping matrices as `residency` says.
    pub fn open_with(dir: &Path, residency: Residency) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (file_names, index) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: IndexJson = serde_json::from_str(&text).map_err(|e| ModelError::json(&index_path, e))?;
            let mut names: Vec<String> = index.weight_map.values().cloned().collect();
            names.sort();
            names.dedup();
            for name in &names {
                if name.contains('/') || name.contains('\\') || name == ".." {
                    return Err(ModelError::json(
                        &index_path,
                        format!("weight_map names a file outside the directory: {name:?}"),
                    ));
                }
            }
            (names, Some((index_path, index.weight_map)))
        } else if single_path.exists() {
            (vec![SINGLE_FILE.to_owned()], None)
        } else {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {SINGLE_FILE} nor {INDEX_FILE} is in the directory"),
                ),
            ));
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (file_idx, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only and private to this process; a checkpoint file that another process
            // truncates while we serve is outside what any mmap-based loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::Safetensors { path: path.clone(), message: e.to_string() })?;
            let data_start = 8 + header_len;
            for (tname, info) in metadata.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    tname,
                    TensorEntry {
                        file: file_idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push(Arc::new(ShardFile { path, map, data_start }));
        }
        if let Some((index_path, weight_map)) = index {
            for (tname, fname) in &weight_map {
                let found = tensors
                    .get(tname)
                    .map(|t| files[t.file].path.file_name().and_then(|f| f.to_str()) == Some(fname.as_str()));
                if found != Some(true) {
                    return Err(ModelError::Safetensors {
                        path: index_path,
                        message: format!("the index places tensor {tname:?} in {fname}, which does not contain it"),
                    });
                }
            }
        }
        let prefix = if tensors.contains_key("model.language_model.embed_tokens.weight") {
            "model.language_model."
        } else if tensors.contains_key("model.embed_tokens.weight") {
            "model."
        } else {
            return Err(ModelError::MissingTensor {
                dir: dir.to_owned(),
                tensor: "model.language_model.embed_tokens.weight (or model.embed_tokens.weight)".into(),
            });
        };
        Ok(Checkpoint {
            dir: dir.to_owned(),
            files,
            tensors,
            prefix,
            residency,
            arena: Arena::default(),
            loaded: Default::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The detected text-model prefix.
    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// Returns the full name of a text-model tensor (`layers.0.input_layernorm.weight` → with the prefix).
    pub fn full_name(&self, name: &str) -> String {
        if name == "lm_head.weight" {
            name.to_owned()
        } else {
            format!("{}{}", self.prefix, name)
        }
    }

    /// Returns whether the checkpoint holds the text-model tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&self.full_name(name))
    }

    /// The names of the text model's tensors (without the prefix), sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().filter_map(|k| k.strip_prefix(self.prefix)).collect();
        names.sort_unstable();
        names
    }

    /// Returns the shape of the text-model tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(&self.full_name(name)).map(|t| t.shape.as_slice())
    }

    fn entry(&self, name: &str, expected: &[usize]) -> Result<(String, &TensorEntry)> {
        let full = self.full_name(name);
        let entry = self
            .tensors
            .get(&full)
            .ok_or_else(|| ModelError::MissingTensor { dir: self.dir.clone(), tensor: full.clone() })?;
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.files[entry.file].path.clone(),
                tensor: full,
                expected: expected.to_vec(),
                actual: entry.shape.clone(),
            });
        }
        Ok((full, entry))
    }

    /// Loads a tensor of exactly `shape` as a bf16 matmul weight `[shape[0], product of the rest]`, resident (and
    /// re-laid for the matmul kernel) or mapped as the checkpoint was opened.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Mat> {
        let mat = self.matrix_view(name, shape)?;
        self.settle(&mat)
    }

    /// Bytes of tensor data loaded so far through this checkpoint.
    pub fn bytes_loaded(&self) -> u64 {
        self.loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of the text model's tensors (everything but `mtp.*` and `model.visual.*`): what a full load reads.
    pub fn text_model_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|(name, _)| !name.starts_with("mtp.") && !name.starts_with("model.visual."))
            .map(|(_, t)| (t.end - t.start) as u64)
            .sum()
    }

    /// A 64-bit FNV-1a hash of `config_bytes` (config.json as stored) and the checkpoint's tensor table (names,
    /// dtypes, shapes, sorted). Two processes that agree on it serve the same model layout; it does not read the weights.
    pub fn fingerprint(&self, config_bytes: &[u8]) -> u64 {
        let mut hash = Fnv1a::default();
        hash.write(config_bytes);
        let mut names: Vec<_> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let entry = &self.tensors[name];
            hash.write(name.as_bytes());
            hash.write(format!("{:?}", entry.dtype).as_bytes());
            for &d in &entry.shape {
                hash.write(&(d as u64).to_le_bytes());
            }
        }
        hash.0
    }

    /// Ends the current arena region: later copies go to a new one. Called after a batch of loads, so that matrices
    /// loaded together (and later unloaded together) share regions with nothing else and free them when dropped.
    pub fn seal_arena(&self) {
        *self.arena.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    /// Applies the checkpoint's residency to a matmul weight or a view of one: when resident, a copy re-laid for
    /// this process's matmul kernel ([`crate::cpu::matmul`]); when mapped, the view itself.
    pub fn settle(&self, mat: &Mat) -> Result<Mat> {
        self.settle_as(mat, crate::cpu::matmul::resident_layout())
    }

    fn settle_as(&self, mat: &Mat, layout: Layout) -> Result<Mat> {
        self.loaded.fetch_add(mat.bytes() as u64, std::sync::atomic::Ordering::Relaxed);
        if self.residency == Residency::Resident {
            // The copy reads every weight anyway; a NaN or infinity means the bytes on disk are damaged, and such a
            // weight would otherwise turn every token routed through it into NaN.
            self.check_finite(mat)?;
        }
        match (self.residency, &*mat.storage) {
            (Residency::Resident, Storage::Mapped { file, .. }) => {
                let (storage, offset) = self
                    .arena
                    .copy(mat.data(), (mat.rows, mat.cols), layout)
                    .map_err(|e| ModelError::io(&file.path, e))?;
                Ok(Mat { storage, offset, layout, rows: mat.rows, cols: mat.cols })
            }
            (Residency::Resident, Storage::Owned(_)) if layout != Layout::RowMajor => {
                let Layout::Packed { group } = layout else { unreachable!("checked just above") };
                Ok(mat.packed_copy(group))
            }
            _ => Ok(mat.clone()),
        }
    }

    /// Fails with [`ModelError::NonFiniteWeight`], naming the tensor, if `mat` holds a NaN or an infinity.
    fn check_finite(&self, mat: &Mat) -> Result<()> {
        // bf16 is non-finite exactly when its 8 exponent bits are all ones.
        let Some(at) = mat.stored().iter().position(|w| w.to_bits() & 0x7f80 == 0x7f80) else { return Ok(()) };
        let (path, tensor, index) = match &*mat.storage {
            Storage::Mapped { file, start, .. } => {
                let byte = start + 2 * (mat.offset + at);
                let owner = self
                    .tensors
                    .iter()
                    .find(|(_, t)| Arc::ptr_eq(&self.files[t.file], file) && (t.start..t.end).contains(&byte));
                match owner {
                    Some((name, t)) => (file.path.clone(), name.clone(), (byte - t.start) / 2),
                    None => (file.path.clone(), format!("at byte {byte}"), at),
                }
            }
            _ => (self.dir.clone(), "a converted tensor".to_owned(), at),
        };
        Err(ModelError::NonFiniteWeight { path, tensor, index })
    }

    /// Loads a tensor as [`Checkpoint::matrix`] does but always row-major (for tables read by row, such as the
    /// embedding).
    pub fn matrix_row_major(&self, name: &str, shape: &[usize]) -> Result<Mat> {
        let mat = self.matrix_view(name, shape)?;
        self.settle_as(&mat, Layout::RowMajor)
    }

    /// Loads a tensor as [`Checkpoint::matrix`] does but always as a view of the map (for 3-D expert tensors
    /// `[E, r, c]`, viewed as `[E·r, c]`: take per-expert views with [`Mat::rows`], then [`Checkpoint::settle`] them,
    /// so that only the selected experts are copied).
    pub fn matrix_view(&self, name: &str, shape: &[usize]) -> Result<Mat> {
        let (full, entry) = self.entry(name, shape)?;
        let file = &self.files[entry.file];
        let numel: usize = shape.iter().product();
        let (rows, cols) = match shape {
            [] => (1, 1),
            [n] => (1, *n),
            [r, rest @ ..] if shape.len() == 3 => (r * rest[0], rest[1]),
            [r, rest @ ..] => (*r, rest.iter().product()),
        };
        let bytes = &file.map[entry.start..entry.end];
        let storage = match entry.dtype {
            Dtype::BF16 if entry.start.is_multiple_of(2) => {
                Storage::Mapped { file: Arc::clone(file), start: entry.start, len: numel }
            }
            Dtype::BF16 => Storage::Owned(
                bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect(),
            ),
            Dtype::F16 => Storage::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_f32(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()))
                    .collect(),
            ),
            Dtype::F32 => Storage::Owned(
                bytes.chunks_exact(4).map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect(),
            ),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: file.path.clone(),
                    tensor: full,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let mat = Mat { storage: Arc::new(storage), offset: 0, layout: Layout::RowMajor, rows, cols };
        debug_assert_eq!(mat.data().len(), numel);
        Ok(mat)
    }

    /// Loads a tensor of exactly `shape` as f32 values, widened exactly from the stored dtype.
    pub fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (full, entry) = self.entry(name, shape)?;
        self.loaded.fetch_add((entry.end - entry.start) as u64, std::sync::atomic::Ordering::Relaxed);
        let file = &self.files[entry.file];
        let bytes = &file.map[entry.start..entry.end];
        let le16 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        Ok(match entry.dtype {
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_bits(le16(b)).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_bits(le16(b)).to_f32()).collect(),
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: file.path.clone(),
                    tensor: full,
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    /// Total bytes of the data sections of all files.
    pub fn total_bytes(&self) -> usize {
        self.files.iter().map(|f| f.map.len() - f.data_start).sum()
    }
}

/// The 64-bit FNV-1a hash: small, stable across builds and platforms (unlike `std`'s `DefaultHasher`).
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 = (self.0 ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
}
