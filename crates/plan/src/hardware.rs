//! Hardware profiles: one machine's roofline (memory bandwidth, matmul and vector FLOP/s), its memory, its network
//! link and its price, with measured corrections per stage where a calibration wrote them. A file holds one or
//! more profiles as JSON; [`HardwareFile::load`] checks every number before anything is planned with it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};

/// A stage of a step, as `moectl bench-model` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    RoutedExperts,
    DenseProjections,
    DeltanetChunked,
    DeltanetRecurrent,
    AttentionCore,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::RoutedExperts,
        Stage::DenseProjections,
        Stage::DeltanetChunked,
        Stage::DeltanetRecurrent,
        Stage::AttentionCore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::RoutedExperts => "routed_experts",
            Stage::DenseProjections => "dense_projections",
            Stage::DeltanetChunked => "deltanet_chunked",
            Stage::DeltanetRecurrent => "deltanet_recurrent",
            Stage::AttentionCore => "attention_core",
        }
    }

    /// Whether the stage is matmuls (bound by the matmul kernel's peak) or vector work (bound by the FMA peak).
    pub fn is_matmul(self) -> bool {
        matches!(self, Stage::RoutedExperts | Stage::DenseProjections)
    }
}

/// The link a node reaches the others over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Bytes per second each way.
    pub bandwidth_bytes_per_s: f64,
    /// One round trip of a small message between a router and an expert node, with the node's handling of it.
    pub round_trip_s: f64,
    /// Activation bytes per second that encoding, TLS and decoding move through one router-node exchange (both
    /// ends' work, beyond the link's own bandwidth); 0: not measured, taken as half the memory bandwidth.
    #[serde(default)]
    pub codec_bytes_per_s: f64,
}

/// Time a step costs beyond its stages: a fixed part and a part per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overhead {
    #[serde(default)]
    pub per_step_s: f64,
    #[serde(default)]
    pub per_token_s: f64,
}

impl Network {
    /// [`Network::codec_bytes_per_s`], or half the memory bandwidth where it was not measured.
    pub fn codec_rate(&self, memory_bandwidth_bytes_per_s: f64) -> f64 {
        if self.codec_bytes_per_s > 0.0 {
            self.codec_bytes_per_s
        } else {
            memory_bandwidth_bytes_per_s / 2.0
        }
    }
}

impl Overhead {
    pub fn at(&self, tokens: f64) -> f64 {
        self.per_step_s + self.per_token_s * tokens
    }
}

/// One kind of machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// Where the figures come from: "measured ..." (a calibration) or "published ..." (a datasheet).
    pub source: String,
    /// Price of one machine, in dollars per hour.
    pub cost_per_hour: f64,
    /// Memory the weights, caches and buffers may use, in bytes (after the system's own share).
    pub memory_bytes: f64,
    pub memory_bandwidth_bytes_per_s: f64,
    /// Peak of the matmul kernel the machine runs (AMX, AVX-512, tensor cores), FLOP/s.
    pub matmul_flops_per_s: f64,
    /// Peak of the vector units for the rest (FMA), FLOP/s.
    pub vector_flops_per_s: f64,
    /// Cores (or SMs) the peaks are for: a process given fewer runs proportionally slower.
    pub cores: usize,
    pub network: Network,
    /// Measured time over the roofline, per stage, at the step sizes (tokens) it was measured at: `[[tokens,
    /// ratio], ...]`, ascending in tokens. A stage without a table is taken at its roofline (ratio 1).
    #[serde(default)]
    pub corrections: BTreeMap<Stage, Vec<[f64; 2]>>,
    /// Work of a forward step no stage covers (norms, residuals, embedding, routing), measured.
    #[serde(default)]
    pub rest: Overhead,
    /// What the server adds to each step beyond the forward pass (scheduling, sampling, streaming), measured.
    #[serde(default)]
    pub serving: Overhead,
}

impl Profile {
    /// The measured ratio of a stage's time to its roofline at a step of `tokens` tokens: interpolated in log
    /// tokens between the measured points, the nearest point's beyond them.
    pub fn correction(&self, stage: Stage, tokens: f64) -> f64 {
        let Some(points) = self.corrections.get(&stage).filter(|p| !p.is_empty()) else {
            return 1.0;
        };
        let t = tokens.max(1.0);
        let first = points[0];
        let last = points[points.len() - 1];
        if t <= first[0] {
            return first[1];
        }
        if t >= last[0] {
            return last[1];
        }
        for w in points.windows(2) {
            let ([t0, r0], [t1, r1]) = (w[0], w[1]);
            if t <= t1 {
                let f = (t.ln() - t0.ln()) / (t1.ln() - t0.ln());
                return r0 + f * (r1 - r0);
            }
        }
        last[1]
    }

    /// The time of `flops` and `bytes` of a stage's work at its roofline on `share` of this machine's cores (and,
    /// as the other processes computing at the same time read memory too, that share of its bandwidth), times its
    /// measured correction at a step of `tokens` tokens.
    pub fn stage_time(&self, stage: Stage, flops: f64, bytes: f64, tokens: f64, share: f64) -> f64 {
        let peak = if stage.is_matmul() { self.matmul_flops_per_s } else { self.vector_flops_per_s };
        let share = share.clamp(1e-6, 1.0);
        let roof = (flops / (peak * share)).max(bytes / (self.memory_bandwidth_bytes_per_s * share));
        roof * self.correction(stage, tokens)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| PlanError::Hardware { path: path.to_owned(), message };
        let name = &self.name;
        if name.trim().is_empty() {
            return Err(bad("a profile has an empty name".into()));
        }
        let positive = [
            ("memory_bytes", self.memory_bytes),
            ("memory_bandwidth_bytes_per_s", self.memory_bandwidth_bytes_per_s),
            ("matmul_flops_per_s", self.matmul_flops_per_s),
            ("vector_flops_per_s", self.vector_flops_per_s),
            ("network.bandwidth_bytes_per_s", self.network.bandwidth_bytes_per_s),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(format!("profile {name:?}: {field} must be a positive number, not {v}")));
            }
        }
        let non_negative = [
            ("cost_per_hour", self.cost_per_hour),
            ("network.round_trip_s", self.network.round_trip_s),
            ("network.codec_bytes_per_s", self.network.codec_bytes_per_s),
            ("rest.per_step_s", self.rest.per_step_s),
            ("rest.per_token_s", self.rest.per_token_s),
            ("serving.per_step_s", self.serving.per_step_s),
            ("serving.per_token_s", self.serving.per_token_s),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(bad(format!("profile {name:?}: {field} must be zero or more, not {v}")));
            }
        }
        if self.cores == 0 {
            return Err(bad(format!("profile {name:?}: cores must be at least 1")));
        }
        for (stage, points) in &self.corrections {
            let mut previous = 0.0;
            for &[tokens, ratio] in points {
                if !(tokens.is_finite() && tokens >= 1.0 && tokens > previous) {
                    return Err(bad(format!(
                        "profile {name:?}: corrections.{}: token counts must be at least 1 and ascending",
                        stage.name()
                    )));
                }
                if !(ratio.is_finite() && ratio > 0.0) {
                    return Err(bad(format!(
                        "profile {name:?}: corrections.{}: ratio {ratio} at {tokens} tokens is not a positive number",
                        stage.name()
                    )));
                }
                previous = tokens;
            }
        }
        Ok(())
    }
}

/// A hardware file: `{"profiles": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareFile {
    pub profiles: Vec<Profile>,
}

impl HardwareFile {
    pub fn load(path: &Path) -> Result<HardwareFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PlanError::Io { path: path.to_owned(), message: e.to_string() })?;
        Self::parse(&text, path)
    }

    /// Parses and checks the text of a hardware file; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<HardwareFile> {
        let file: HardwareFile = serde_json::from_str(text)
            .map_err(|e| PlanError::Hardware { path: path.to_owned(), message: e.to_string() })?;
        if file.profiles.is_empty() {
            return Err(PlanError::Hardware { path: path.to_owned(), message: "no profiles".into() });
        }
        for (i, p) in file.profiles.iter().enumerate() {
            p.check(path)?;
            if file.profiles[..i].iter().any(|q| q.name == p.name) {
                return Err(PlanError::Hardware {
                    path: path.to_owned(),
                    message: format!("two profiles are named {:?}", p.name),
                });
            }
        }
        Ok(file)
    }

    /// The profile called `name`, or the first when no name is given.
    pub fn get(&self, name: Option<&str>) -> Result<&Profile> {
        match name {
            None => Ok(&self.profiles[0]),
            Some(n) => self.profiles.iter().find(|p| p.name == n).ok_or_else(|| {
                let names: Vec<&str> = self.profiles.iter().map(|p| p.name.as_str()).collect();
                PlanError::argument("hardware", format!("no profile named {n:?} (the file has {})", names.join(", ")))
            }),
        }
    }
}
