//! Assembling a router: the model without its routed experts (or with them, for a single process), the experts on
//! expert nodes, the engine thread and the HTTP state. Used by the `router-node` binary and by `moectl up`.

use std::path::PathBuf;
use std::sync::Arc;

use moe_model::{Decoder, Experts, LoadedModel, Residency};

use crate::cluster::{model_shape, ClusterOptions};
use crate::engine::{self, EngineConfig};
use crate::http::{ApiConfig, AppState, ReadinessCheck};
use crate::remote::{RemoteExperts, RemoteOptions};
use crate::RouterError;

/// Where the routed experts are computed.
#[derive(Debug, Clone)]
pub enum ExpertsAt {
    /// In this process (all of them loaded here).
    Local,
    /// On these expert nodes.
    Nodes(Vec<String>, RemoteOptions),
    /// On the expert nodes of a cluster, placed by its controller (join it with [`crate::cluster::join`]).
    Cluster(ClusterOptions, RemoteOptions),
}

#[derive(Debug, Clone)]
pub struct RouterOptions {
    pub model: PathBuf,
    pub residency: Residency,
    pub experts: ExpertsAt,
    /// Where the router's layers run (`cuda:N,...`: on the first GPU listed), and with [`ExpertsAt::Local`] the
    /// routed experts too (spread over every GPU listed).
    pub device: moe_cuda::Device,
    pub engine: EngineConfig,
    /// `model_name` empty: the model directory's name.
    pub api: ApiConfig,
}

/// A router ready to serve: its HTTP state, with the engine running.
#[derive(Debug)]
pub struct PreparedRouter {
    pub state: Arc<AppState>,
    pub engine: std::thread::JoinHandle<()>,
    /// With [`ExpertsAt::Cluster`]: what joining the cluster needs.
    pub cluster: Option<ClusterJoin>,
}

/// The parts of a prepared router that take part in a cluster.
#[derive(Debug)]
pub struct ClusterJoin {
    pub remote: Arc<RemoteExperts>,
    pub config: moe_model::ModelConfig,
    pub shape: moe_placement::ModelShape,
    pub options: ClusterOptions,
}

/// Loads the model, connects to the expert nodes and starts the engine. Blocking: call it outside any async runtime.
pub fn prepare(options: RouterOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<PreparedRouter, RouterError> {
    let local = matches!(options.experts, ExpertsAt::Local);
    let on_gpu = matches!(options.device, moe_cuda::Device::Cuda(_));
    // On a GPU the host copy of the model only serves the tokenizer and the configuration: leave it mapped.
    let residency = if on_gpu { Residency::Mapped } else { options.residency };
    let lm = LoadedModel::load_selected(&options.model, residency, progress, &|_, _| local && !on_gpu)?;
    let eos_ids = lm.eos_token_ids();
    let LoadedModel { model, experts: local_experts, tokenizer, chat_template, generation, fingerprint, .. } = lm;
    let config = model.config().clone();
    let model_name = options.model.file_name().map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut cluster = None;
    let mut on_nodes = None;
    let (experts, ready): (Arc<dyn Experts>, ReadinessCheck) = match options.experts {
        ExpertsAt::Local => match &options.device {
            moe_cuda::Device::Cpu => (Arc::new(local_experts), Arc::new(|| Ok(()))),
            device => (local_on_gpu(&options.model, &config, device)?, Arc::new(|| Ok(()))),
        },
        ExpertsAt::Nodes(addrs, remote) => {
            let remote = Arc::new(RemoteExperts::connect(&addrs, &config, fingerprint, remote)?);
            on_nodes = Some(remote.clone());
            let check = Arc::clone(&remote);
            (remote, Arc::new(move || check.check_coverage()))
        }
        ExpertsAt::Cluster(cluster_options, remote) => {
            let remote = Arc::new(RemoteExperts::unplaced(&config, fingerprint, remote)?);
            on_nodes = Some(remote.clone());
            let check = Arc::clone(&remote);
            cluster = Some(ClusterJoin {
                remote: remote.clone(),
                config: config.clone(),
                shape: model_shape(&model_name, &config, fingerprint),
                options: cluster_options,
            });
            (remote, Arc::new(move || check.check_coverage()))
        }
    };
    let mut api = options.api;
    if api.model_name.is_empty() {
        api.model_name = model_name;
    }
    if api.max_model_len == 0 || api.max_model_len > config.max_position_embeddings {
        api.max_model_len = config.max_position_embeddings;
    }
    let decoder: Arc<dyn Decoder> = match &options.device {
        moe_cuda::Device::Cpu => Arc::new(model),
        device => decoder_on_gpu(&options.model, &config, device, options.engine.state_budget_bytes as usize)?,
    };
    let (handle, engine) = engine::start(decoder, experts, options.engine).map_err(RouterError::Runtime)?;
    if let Some(remote) = &on_nodes {
        // A step held for a lost expert node is worth holding while one of its sequences is still waited for.
        remote.set_interest(handle.in_step.clone());
    }
    let mut state = AppState::new(
        handle,
        Arc::new(tokenizer),
        chat_template.map(Arc::new),
        generation,
        eos_ids,
        config.vocab_size,
        api,
        ready,
    );
    state.remote = on_nodes;
    if state.config.structured_outputs {
        state.guides = guides_for(&state.tokenizer, &state.eos_ids, config.vocab_size);
    }
    let state = Arc::new(state);
    Ok(PreparedRouter { state, engine, cluster })
}

/// Constrained decoding over the model's vocabulary; a tokenizer llguidance cannot read turns it off, said once.
fn guides_for(tokenizer: &moe_model::Tokenizer, eos_ids: &[u32], vocab: usize) -> Option<Arc<crate::guide::Guides>> {
    let built = std::fs::read_to_string(tokenizer.path())
        .map_err(|e| crate::guide::GuideError::Tokenizer(format!("{}: {e}", tokenizer.path().display())))
        .and_then(|json| crate::guide::Guides::new(&json, eos_ids, vocab));
    match built {
        Ok(g) => Some(Arc::new(g)),
        Err(e) => {
            tracing::warn!("structured outputs are off: {e}");
            None
        }
    }
}

/// Every routed expert of the model in `dir`, on the GPUs of `device`.
#[cfg(feature = "cuda")]
fn local_on_gpu(
    dir: &std::path::Path,
    config: &moe_model::ModelConfig,
    device: &moe_cuda::Device,
) -> Result<Arc<dyn Experts>, RouterError> {
    let moe_cuda::Device::Cuda(ordinals) = device else {
        return Err(RouterError::Placement(format!("--device {device}: not a CUDA device")));
    };
    let experts = moe_cuda::CudaExperts::new(config, ordinals)?;
    let ckpt = moe_model::Checkpoint::open_with(dir, Residency::Mapped)?;
    let loaded = experts.load_more(&ckpt, config, |_, _| true)?;
    tracing::info!(experts = loaded.experts, gib = loaded.bytes as f64 / (1u64 << 30) as f64, "routed experts on CUDA");
    Ok(Arc::new(experts))
}

/// The router's layers on the first GPU of `device`, with KV pools of `kv_bytes`.
#[cfg(feature = "cuda")]
fn decoder_on_gpu(
    dir: &std::path::Path,
    config: &moe_model::ModelConfig,
    device: &moe_cuda::Device,
    kv_bytes: usize,
) -> Result<Arc<dyn Decoder>, RouterError> {
    let moe_cuda::Device::Cuda(ordinals) = device else {
        return Err(RouterError::Placement(format!("--device {device}: not a CUDA device")));
    };
    let ckpt = moe_model::Checkpoint::open_with(dir, Residency::Mapped)?;
    let first = ordinals.first().copied().unwrap_or(0);
    Ok(Arc::new(moe_cuda::CudaModel::load(&ckpt, config.clone(), first, kv_bytes)?))
}

#[cfg(not(feature = "cuda"))]
fn decoder_on_gpu(
    _dir: &std::path::Path,
    _config: &moe_model::ModelConfig,
    _device: &moe_cuda::Device,
    _kv_bytes: usize,
) -> Result<Arc<dyn Decoder>, RouterError> {
    Err(moe_cuda::CudaError::NotBuilt.into())
}

#[cfg(not(feature = "cuda"))]
fn local_on_gpu(
    _dir: &std::path::Path,
    _config: &moe_model::ModelConfig,
    _device: &moe_cuda::Device,
) -> Result<Arc<dyn Experts>, RouterError> {
    Err(moe_cuda::CudaError::NotBuilt.into())
}

/// How a running router stops.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// This router's member id in a cluster.
    pub node_id: String,
    /// After the shutdown signal: how long requests in flight may take to finish before the router exits anyway.
    pub grace: std::time::Duration,
}

/// Serves `prepared` on `listener` until `shutdown` resolves, then drains: `/readyz` turns 503, no new connection is
/// accepted, requests in flight finish (for at most `config.grace`), and the router leaves its cluster (also when
/// the store does not answer). The binary's whole life; tests run it in-process too.
pub async fn run(
    prepared: PreparedRouter,
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    let addr = listener.local_addr().map_err(RouterError::Serve)?;
    let state = prepared.state;
    let membership = match prepared.cluster {
        Some(join) => Some(
            crate::cluster::join_prepared(join, config.node_id.clone(), format!("http://{addr}"))
                .await
                .map_err(|e| RouterError::Placement(format!("joining the cluster: {e}")))?,
        ),
        None => None,
    };
    tracing::info!(%addr, model = %state.config.model_name, "serving");
    let app = crate::http::router(Arc::clone(&state));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = state.config.connections;
    let mut server = tokio::spawn(crate::http::serve(listener, app, limits, async {
        let _ = stopped.await;
    }));
    tokio::pin!(shutdown);
    let served = tokio::select! {
        _ = &mut shutdown => None,
        done = &mut server => Some(done),
    };
    let result = match served {
        // The server only ends by itself on an error.
        Some(done) => {
            done.map_err(|e| RouterError::Serve(std::io::Error::other(e))).and_then(|r| r.map_err(RouterError::Serve))
        }
        None => {
            state.draining.store(true, std::sync::atomic::Ordering::Release);
            tracing::info!(grace = ?config.grace, "draining: requests in flight finish, new connections are refused");
            let _ = stop.send(());
            match tokio::time::timeout(config.grace, &mut server).await {
                Ok(Ok(r)) => r.map_err(RouterError::Serve),
                Ok(Err(e)) => Err(RouterError::Serve(std::io::Error::other(e))),
                Err(_) => {
                    tracing::warn!("requests still in flight after {:?}; closing them", config.grace);
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    if let Some(m) = membership {
        if tokio::time::timeout(LEAVE_TIMEOUT, m.leave()).await.is_err() {
            tracing::warn!("the cluster store did not answer within {LEAVE_TIMEOUT:?}; leaving with the lease");
        }
    }
    tracing::info!("stopped");
    result
}

/// The longest leaving a cluster may take; past it the lease expires by itself.
const LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
