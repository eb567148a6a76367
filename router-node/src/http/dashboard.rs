//! `GET /dashboard`: a live page of the cluster as this router sees it, and `GET /dashboard/data`, the JSON it polls.
//!
//! The page is one HTML file with its CSS and script inline, compiled into the binary (no build step, nothing
//! fetched from elsewhere). Its data is what `/metrics` exports and what the placement store holds: members and
//! their state, the placement epoch, tokens routed per (layer, expert) as a heatmap, (token, expert) pairs per node
//! and layer, the engine's occupancy, and tokens/s, TTFT and ITL over the last minutes from a history sampled every
//! [`SAMPLE_EVERY`].
//!
//! With API keys the page is behind one like every other route. A browser cannot add a header to a navigation, so
//! these two routes also take the key as `?key=KEY` (the page passes it on as a bearer header to its own polls).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::AppState;

/// How often the history is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How many samples are kept: five minutes.
const HISTORY: usize = 150;

const PAGE: &str = include_str!("dashboard.html");

/// One sample of the router's counters.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    unix_ms: u64,
    generated: u64,
    prompt: u64,
    ttft_us: u64,
    ttft_count: u64,
    itl_us: u64,
    itl_count: u64,
    running: usize,
    waiting: usize,
}

/// The samples of the last minutes.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    fn push(&self, s: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == HISTORY {
            samples.pop_front();
        }
        samples.push_back(s);
    }

    /// Rates between consecutive samples: (unix ms, tokens/s generated, prompt tokens/s, mean TTFT ms, mean ITL ms,
    /// running, waiting). A mean is null over an interval that saw no first token (or no later token).
    fn series(&self) -> Vec<Value> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| {
                let secs = (b.unix_ms.saturating_sub(a.unix_ms)) as f64 / 1000.0;
                let rate = |x: u64, y: u64| if secs > 0.0 { y.saturating_sub(x) as f64 / secs } else { 0.0 };
                let mean_ms = |sum: (u64, u64), n: (u64, u64)| {
                    let count = n.1.saturating_sub(n.0);
                    (count > 0).then(|| sum.1.saturating_sub(sum.0) as f64 / count as f64 / 1000.0)
                };
                json!({
                    "t": b.unix_ms,
                    "tokens_per_s": rate(a.generated, b.generated),
                    "prompt_tokens_per_s": rate(a.prompt, b.prompt),
                    "ttft_ms": mean_ms((a.ttft_us, b.ttft_us), (a.ttft_count, b.ttft_count)),
                    "itl_ms": mean_ms((a.itl_us, b.itl_us), (a.itl_count, b.itl_count)),
                    "running": b.running,
                    "waiting": b.waiting,
                })
            })
            .collect()
    }
}

fn sample(state: &AppState) -> Sample {
    let st = &state.engine.stats;
    let sums = &state.requests.sums;
    Sample {
        unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        generated: st.generated_tokens.load(Ordering::Relaxed),
        prompt: st.prompt_tokens.load(Ordering::Relaxed),
        ttft_us: sums.ttft_us.load(Ordering::Relaxed),
        ttft_count: sums.ttft_count.load(Ordering::Relaxed),
        itl_us: sums.itl_us.load(Ordering::Relaxed),
        itl_count: sums.itl_count.load(Ordering::Relaxed),
        running: st.running.load(Ordering::Relaxed),
        waiting: st.waiting.load(Ordering::Relaxed),
    }
}

/// Samples `state` every [`SAMPLE_EVERY`] while it lives (inside a tokio runtime; without one, no history).
pub(super) fn start_sampling(state: &Arc<AppState>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let weak: Weak<AppState> = Arc::downgrade(state);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { return };
            state.history.push(sample(&state));
        }
    });
}

/// Lets `?key=KEY` stand for the bearer header on the dashboard's routes.
pub(super) async fn key_from_query(mut req: Request, next: Next) -> Response {
    if !req.headers().contains_key(header::AUTHORIZATION) {
        let key = req.uri().query().and_then(|q| {
            q.split('&').find_map(|kv| kv.strip_prefix("key=")).map(|k| k.replace('+', " ")).map(percent_decode)
        });
        if let Some(value) = key.and_then(|k| header::HeaderValue::from_str(&format!("Bearer {k}")).ok()) {
            req.headers_mut().insert(header::AUTHORIZATION, value);
        }
    }
    next.run(req).await
}

fn percent_decode(s: String) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page needs is in it: nothing from elsewhere may run or load.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                 img-src data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

pub(super) async fn data(State(state): State<Arc<AppState>>) -> Response {
    let body = tokio::task::spawn_blocking(move || snapshot(&state)).await.unwrap_or_else(|e| {
        tracing::error!("the dashboard snapshot failed: {e}");
        json!({"error": "the snapshot failed"})
    });
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

/// Everything the page draws.
fn snapshot(state: &AppState) -> Value {
    let st = &state.engine.stats;
    let budget = state.engine.state_budget();
    let reserved = st.state_bytes_reserved.load(Ordering::Relaxed);
    let mut out = json!({
        "model": state.config.model_name,
        "now_ms": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "running": st.running.load(Ordering::Relaxed),
        "waiting": st.waiting.load(Ordering::Relaxed),
        "kv_usage": if budget > 0 { reserved as f64 / budget as f64 } else { 0.0 },
        "generated_tokens": st.generated_tokens.load(Ordering::Relaxed),
        "prompt_tokens": st.prompt_tokens.load(Ordering::Relaxed),
        "history": state.history.series(),
        "sample_every_ms": SAMPLE_EVERY.as_millis() as u64,
    });
    let Some(remote) = &state.remote else {
        out["experts"] = json!("in this process");
        return out;
    };
    out["epoch"] = json!(remote.epoch());
    let links: BTreeMap<String, (String, &'static str)> =
        remote.health().into_iter().map(|(id, addr, health)| (id, (addr, health))).collect();
    let view = remote.cluster_view.read().unwrap_or_else(|p| p.into_inner()).clone();
    out["members"] = members(&links, view.as_deref());
    if let Some(view) = &view {
        out["leader"] = json!(view.leader);
        out["store_epoch"] = json!(view.placement.as_ref().map(|p| p.epoch));
    }
    let routed = remote.series.routed_counts();
    let moe: Vec<usize> = routed.iter().enumerate().filter(|(_, r)| !r.is_empty()).map(|(l, _)| l).collect();
    out["layers"] = json!(moe);
    out["experts"] = json!(routed.iter().map(Vec::len).max().unwrap_or(0));
    out["heatmap"] = json!(moe.iter().map(|&l| &routed[l]).collect::<Vec<_>>());
    let by_layer = remote.series.layer_node_pairs();
    out["node_load"] = json!(moe.iter().map(|&l| by_layer.get(l).cloned().unwrap_or_default()).collect::<Vec<_>>());
    out
}

/// Expert nodes of the placement in use with their link state, and, in a cluster, every member with what the
/// store says of it (drain, loaded epoch, the epoch a router uses).
fn members(links: &BTreeMap<String, (String, &'static str)>, view: Option<&moe_placement::ClusterView>) -> Value {
    let mut rows: BTreeMap<String, Value> = BTreeMap::new();
    if let Some(view) = view {
        for (id, m) in &view.members {
            let role = match m.role {
                moe_placement::Role::Expert => "expert",
                moe_placement::Role::Router => "router",
            };
            let state = if view.drains.contains(id) {
                "draining"
            } else if let Some((_, link)) = links.get(id) {
                link
            } else if m.role == moe_placement::Role::Expert {
                "not in the placement in use"
            } else {
                "member"
            };
            rows.insert(
                id.clone(),
                json!({"id": id, "role": role, "addr": m.addr, "state": state, "devices": m.devices,
                       "ready_epoch": view.ready.get(id), "using_epoch": view.using.get(id),
                       "leader": view.leader.as_deref() == Some(id.as_str())}),
            );
        }
    }
    for (id, (addr, link)) in links {
        rows.entry(id.clone()).or_insert_with(|| json!({"id": id, "role": "expert", "addr": addr, "state": link}));
    }
    json!(rows.into_values().collect::<Vec<_>>())
}
