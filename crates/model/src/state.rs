//! Per-sequence decode state: a paged KV cache for each full-attention layer and a fixed-size slot (conv window and
//! fp32 recurrent state) for each Gated DeltaNet layer.
//!
//! The KV cache grows a page of [`KV_PAGE_TOKENS`] positions at a time: a sequence never holds more than one partly
//! used page per cache, growth never copies what is cached, and a server can account for memory in pages.
//!
//! Invariant: every layer's state describes exactly the first `position` tokens of the sequence. The forward pass
//! advances all layers and then `position` together; a failed forward leaves the state unusable (callers drop it).
//!
//! **Snapshots.** [`SequenceState::snapshot`] copies a state for a prefix cache. Full KV pages are shared, not
//! copied (a page is written only while it fills, and a snapshot taken at a multiple of [`ALIGN_TOKENS`] holds only
//! full pages); the Gated DeltaNet slots are copied. A state's numbers at a multiple of [`ALIGN_TOKENS`] depend only
//! on the tokens before it, not on how the forward calls cut them, as long as every call starts at such a multiple
//! or continues a single-token step: so a snapshot there continues bit for bit as the state it was taken from.

use std::sync::Arc;

use crate::config::{LayerKind, ModelConfig};

/// Positions per KV page.
pub const KV_PAGE_TOKENS: usize = 16;

/// The positions at which a state depends only on the tokens before it whatever the forward calls were (the delta
/// rule's chunk, a multiple of [`KV_PAGE_TOKENS`]): prompts are fed in pieces that end on them, and prefix caches
/// keep states taken there.
pub const ALIGN_TOKENS: usize = 32;

const _: () = assert!(ALIGN_TOKENS.is_multiple_of(KV_PAGE_TOKENS));

/// Rows of `width` values stored in pages of [`KV_PAGE_TOKENS`] rows. Pages are shared between a state and its
/// snapshots; a shared page that is still filling is copied before it is written.
#[derive(Debug, Clone)]
pub(crate) struct PagedRows {
    width: usize,
    pages: Vec<Arc<[f32]>>,
    len: usize,
}

impl PagedRows {
    fn new(width: usize) -> Self {
        PagedRows { width, pages: Vec::new(), len: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends `row` and returns the stored copy (for in-place norms and RoPE).
    pub(crate) fn push(&mut self, row: &[f32]) -> &mut [f32] {
        debug_assert_eq!(row.len(), self.width);
        let (page, slot) = (self.len / KV_PAGE_TOKENS, self.len % KV_PAGE_TOKENS);
        if page == self.pages.len() {
            self.pages.push(Arc::from(vec![0f32; KV_PAGE_TOKENS * self.width]));
        }
        self.len += 1;
        let shared = &mut self.pages[page];
        if Arc::get_mut(shared).is_none() {
            *shared = Arc::from(&shared[..]);
        }
        let Some(page) = Arc::get_mut(shared) else { unreachable!("a page just copied has one owner") };
        let stored = &mut page[slot * self.width..(slot + 1) * self.width];
        stored.copy_from_slice(row);
        stored
    }

    /// Row `j` (< `len`).
    pub(crate) fn row(&self, j: usize) -> &[f32] {
        let (page, slot) = (j / KV_PAGE_TOKENS, j % KV_PAGE_TOKENS);
        &self.pages[page][slot * self.width..(slot + 1) * self.width]
    }

    fn bytes(&self) -> usize {
        self.pages.len() * KV_PAGE_TOKENS * self.width * 4
    }
}

/// The state of one layer for one sequence.
#[derive(Debug, Clone)]
pub(crate) enum LayerState {
    Attention {
        /// Keys after k_norm and RoPE, a row of `nkv·hd` per position.
        k: PagedRows,
        /// Values, a row of `nkv·hd` per position.
        v: PagedRows,
    },
    Linear {
        /// The last K−1 pre-conv inputs, `[K−1][C]`, oldest first; zeros before the sequence starts.
        conv: Vec<f32>,
        /// Recurrent state `[Hv][dk][dv]`, fp32 as in the reference.
        s: Vec<f32>,
    },
}

/// A sequence's state held by a decoder outside this crate (on a GPU, say): whatever that decoder keeps, found again
/// with [`SequenceState::device_mut`].
pub trait DeviceState: std::any::Any + Send + std::fmt::Debug {
    /// Bytes of (device) memory the state holds now.
    fn bytes(&self) -> usize;
}

/// Everything the model remembers about one sequence between forward calls.
#[derive(Debug)]
pub struct SequenceState {
    pub(crate) layers: Vec<LayerState>,
    pub(crate) position: usize,
    /// The decoder instance this state belongs to; a state is meaningless to any other.
    pub(crate) model_id: u64,
    /// The state itself when it lives with another decoder (then `layers` is empty).
    device: Option<Box<dyn DeviceState>>,
}

/// A fresh id for a decoder instance (states carry it, so that a state cannot be fed to another decoder).
pub fn new_decoder_id() -> u64 {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl SequenceState {
    pub(crate) fn new(cfg: &ModelConfig, model_id: u64) -> Self {
        let layers = cfg
            .layer_types
            .iter()
            .map(|kind| match kind {
                LayerKind::Full => {
                    let width = cfg.num_key_value_heads * cfg.head_dim;
                    LayerState::Attention { k: PagedRows::new(width), v: PagedRows::new(width) }
                }
                LayerKind::Linear => LayerState::Linear {
                    conv: vec![0.0; (cfg.linear_conv_kernel_dim - 1) * cfg.linear_conv_channels()],
                    s: vec![0.0; cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim],
                },
            })
            .collect();
        SequenceState { layers, position: 0, model_id, device: None }
    }

    /// A state kept by another decoder (id from [`new_decoder_id`]).
    pub fn on_device(decoder_id: u64, device: Box<dyn DeviceState>) -> Self {
        SequenceState { layers: Vec::new(), position: 0, model_id: decoder_id, device: Some(device) }
    }

    /// The id of the decoder this state belongs to.
    pub fn decoder_id(&self) -> u64 {
        self.model_id
    }

    /// The state kept by another decoder, if it is of type `T`.
    pub fn device_mut<T: DeviceState>(&mut self) -> Option<&mut T> {
        let any: &mut dyn std::any::Any = self.device.as_deref_mut()?;
        any.downcast_mut::<T>()
    }

    /// Moves the position on by `tokens` (for decoders outside this crate, once they have consumed them).
    pub fn advance(&mut self, tokens: usize) {
        self.position += tokens;
    }

    /// Number of tokens the state has consumed (the position of the next token).
    pub fn position(&self) -> usize {
        self.position
    }

    /// A copy to continue from later, sharing the full KV pages (see the module docs); `None` for a state kept by
    /// another decoder, which this crate cannot copy.
    pub fn snapshot(&self) -> Option<SequenceState> {
        if self.device.is_some() {
            return None;
        }
        Some(SequenceState {
            layers: self.layers.clone(),
            position: self.position,
            model_id: self.model_id,
            device: None,
        })
    }

    /// Bytes of memory the state holds now (whole KV pages, shared ones included).
    pub fn bytes(&self) -> usize {
        self.device.as_ref().map_or(0, |d| d.bytes())
            + self
                .layers
                .iter()
                .map(|l| match l {
                    LayerState::Attention { k, v } => k.bytes() + v.bytes(),
                    LayerState::Linear { conv, s } => (conv.len() + s.len()) * 4,
                })
                .sum::<usize>()
    }
}
