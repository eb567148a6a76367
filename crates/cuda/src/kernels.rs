//! The CUDA C sources of the backend and their compilation with NVRTC.
//!
//! Each source is compiled on its own, with `kernels/common.cuh` (bf16 conversions, block reductions) in front, for
//! the virtual architecture of the card (`compute_90` on Hopper); the driver turns the PTX into the card's code when
//! the module loads. The sources need no CUDA headers, so NVRTC alone compiles them: the tests do so on machines
//! without a GPU whenever libnvrtc can be found.

/// One kernel source file and the entry points it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

/// Prepended to every source.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "experts.cu",
        source: include_str!("../kernels/experts.cu"),
        entries: &["gather_rows_bf16", "swiglu_bf16", "combine_rows"],
    },
    KernelSource {
        name: "norm.cu",
        source: include_str!("../kernels/norm.cu"),
        entries: &["rms_norm_offset", "rms_norm_gated", "rope_partial"],
    },
    KernelSource { name: "routing.cu", source: include_str!("../kernels/routing.cu"), entries: &["softmax_topk"] },
    KernelSource {
        name: "gdn.cu",
        source: include_str!("../kernels/gdn.cu"),
        entries: &[
            "causal_conv_silu",
            "gdn_prepare",
            "gated_delta_recurrent",
            "gated_delta_chunked",
            "gdn_output_norm",
            "conv_step_multi",
            "gated_delta_step_multi",
        ],
    },
    KernelSource {
        name: "model.cu",
        source: include_str!("../kernels/model.cu"),
        entries: &["embed_rows", "to_bf16", "gather_rows_f32", "moe_residual", "scatter_rows_f32"],
    },
    KernelSource {
        name: "attention.cu",
        source: include_str!("../kernels/attention.cu"),
        entries: &["kv_append", "attention_paged", "kv_append_multi", "attention_paged_multi"],
    },
];

/// The chunk length of `gated_delta_chunked` (`GDN_CHUNK` in gdn.cu), as in the reference.
pub const GDN_CHUNK: usize = 64;

/// Doubles of scratch `gated_delta_chunked` needs per value head.
pub fn gdn_chunked_scratch(dk: usize, dv: usize) -> usize {
    dk * dv + GDN_CHUNK * GDN_CHUNK + 2 * GDN_CHUNK * dv + GDN_CHUNK * dk
}

impl KernelSource {
    /// The text NVRTC compiles: [`COMMON`], then the file.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.name, self.source)
    }
}

/// The NVRTC architecture option for a compute capability: `compute_90` for (9, 0).
pub fn arch_option(capability: (i32, i32)) -> String {
    format!("--gpu-architecture=compute_{}{}", capability.0, capability.1)
}

/// Compiles `src` to PTX for `capability`.
#[cfg(feature = "cuda")]
pub fn compile(src: &KernelSource, capability: (i32, i32)) -> crate::Result<cudarc::nvrtc::Ptx> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![arch_option(capability), "--std=c++17".into()],
        fmad: Some(true),
        name: Some(src.name.to_owned()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src.full_source(), opts)
        .map_err(|e| crate::CudaError::Compile { source_name: src.name, log: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_defined_once() {
        for src in SOURCES {
            for entry in src.entries {
                let decl = format!("extern \"C\" __global__ void {entry}(");
                assert_eq!(src.source.matches(&decl).count(), 1, "{} defines {entry} once", src.name);
            }
            assert_eq!(
                src.source.matches("extern \"C\" __global__").count(),
                src.entries.len(),
                "{} lists all its entries",
                src.name
            );
        }
        assert!(SOURCES[3].source.contains(&format!("#define GDN_CHUNK {GDN_CHUNK}")));
    }

    /// Compiles every source with NVRTC for Hopper, where libnvrtc can be loaded (no GPU needed): `.ci/run` installs
    /// NVIDIA's NVRTC wheel and points `LD_LIBRARY_PATH` at it, so this runs in CI.
    #[cfg(feature = "cuda")]
    #[test]
    fn sources_compile_with_nvrtc_for_hopper() {
        // SAFETY: only loads the library to see whether it is there.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            // CI installs NVRTC and sets MOE_REQUIRE_NVRTC, so that this test cannot pass there without compiling.
            assert!(
                std::env::var_os("MOE_REQUIRE_NVRTC").is_none(),
                "MOE_REQUIRE_NVRTC is set but libnvrtc is not found"
            );
            eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA 12 NVRTC)");
            return;
        }
        for src in SOURCES {
            let ptx = match compile(src, (9, 0)) {
                Ok(ptx) => ptx.to_src(),
                Err(e) => panic!("{e}"),
            };
            for entry in src.entries {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{}: no entry {entry} in the PTX", src.name);
            }
            assert!(ptx.contains(".target sm_90"), "{}: compiled for sm_90", src.name);
        }
    }
}
