//! The layers of the decoder: the two mixers, the MoE block with its experts seam, and the SwiGLU MLP they share.

pub(crate) mod attention;
pub(crate) mod gdn;
pub mod moe;

/// Where one sequence's tokens sit in a batch: rows `start..start + len` of the activations, at sequence positions
/// `pos..pos + len`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub start: usize,
    pub len: usize,
    pub pos: usize,
}

/// Splits a `ntok × width` buffer into the disjoint row blocks of each span (spans are back to back from row 0).
pub(crate) fn split_rows<'a>(buf: &'a mut [f32], spans: &[Span], width: usize) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(spans.len());
    let mut rest = buf;
    for span in spans {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(span.len * width);
        parts.push(head);
        rest = tail;
    }
    parts
}
