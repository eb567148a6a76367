//! A live expert node answers every malformed request with INVALID_ARGUMENT or FAILED_PRECONDITION naming the field,
//! on the same stream, and goes on serving that stream, other streams, and routers that come after one that vanished.

use std::time::Duration;

use moe_e2e::{bin, fixture, ExpertNodeProcess};
use moe_proto::codec;
use moe_proto::v1::{
    forward_response, Dtype, ErrorCode, ExpertSet, ForwardRequest, ForwardResponse, LayerExperts, LoadExpertsRequest,
    Reduce, Routing, StatusRequest, UnloadExpertsRequest,
};
use moe_proto::ExpertServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const HIDDEN: usize = 64;

struct Stream {
    tx: mpsc::Sender<ForwardRequest>,
    rx: tonic::Streaming<ForwardResponse>,
}

impl Stream {
    async fn open(client: &mut ExpertServiceClient<Channel>) -> Self {
        let (tx, out) = mpsc::channel(16);
        let rx = client.forward(ReceiverStream::new(out)).await.expect("stream opens").into_inner();
        Stream { tx, rx }
    }

    async fn call(&mut self, req: ForwardRequest) -> ForwardResponse {
        let id = req.id;
        self.tx.send(req).await.expect("sent");
        let resp = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("answered in time")
            .expect("stream alive")
            .expect("a message");
        assert_eq!(resp.id, id);
        resp
    }
}

/// A well-formed request: `n` tokens of layer `layer`, each routed to experts `experts` with weight 0.5.
fn request(id: u64, layer: u32, n: usize, experts: &[u32]) -> ForwardRequest {
    let hidden: Vec<f32> = (0..n * HIDDEN).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let mut routing = Routing { offsets: vec![0], ..Default::default() };
    for _ in 0..n {
        routing.experts.extend_from_slice(experts);
        routing.weights.extend(experts.iter().map(|_| 0.5));
        routing.offsets.push(routing.experts.len() as u32);
    }
    ForwardRequest {
        id,
        layer,
        epoch: 0,
        dtype: Dtype::F32 as i32,
        hidden_size: HIDDEN as u32,
        num_tokens: n as u32,
        activations: codec::encode(&hidden, Dtype::F32),
        routing: Some(routing),
        deadline_us: 10_000_000,
        traceparent: String::new(),
        reduce: 0,
        cancel: Vec::new(),
    }
}

fn expect_error(resp: &ForwardResponse, code: ErrorCode, field: &str) {
    match &resp.result {
        Some(forward_response::Result::Error(e)) => {
            assert_eq!(e.code, code as i32, "{e:?}");
            assert_eq!(e.field, field, "{e:?}");
            assert!(!e.message.is_empty());
        }
        other => panic!("expected {code:?} on {field}, got {other:?}"),
    }
}

fn expect_sums(resp: &ForwardResponse, n: usize) -> Vec<f32> {
    match &resp.result {
        Some(forward_response::Result::Sums(s)) => {
            let mut out = vec![0f32; n * HIDDEN];
            codec::decode_into(&s.sums, Dtype::try_from(s.dtype).expect("dtype"), &mut out).expect("length");
            out
        }
        other => panic!("expected sums, got {other:?}"),
    }
}

async fn connect(addr: &str) -> ExpertServiceClient<Channel> {
    moe_e2e::tls::client(addr, moe_tls::Role::Controller).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_request_is_refused_by_field_and_the_stream_goes_on() {
    // Experts 0-3 of every layer: 4-7 exist in the model but are not loaded here.
    let node = ExpertNodeProcess::start(&fixture("qwen35"), "0-3", &[]).expect("node starts");
    let mut client = connect(node.addr()).await;
    let mut s = Stream::open(&mut client).await;
    let good = expect_sums(&s.call(request(1, 0, 3, &[0, 2])).await, 3);
    assert!(good.iter().all(|v| v.is_finite()) && good.iter().any(|&v| v != 0.0));

    let mut cases: Vec<(ForwardRequest, ErrorCode, &str)> = Vec::new();
    let mut r = request(10, 0, 2, &[9]);
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing.experts[0]"));
    r = request(11, 0, 2, &[1, 5]);
    cases.push((r.clone(), ErrorCode::FailedPrecondition, "routing.experts[1]"));
    r = request(12, 4, 1, &[0]);
    cases.push((r.clone(), ErrorCode::InvalidArgument, "layer"));
    r = request(13, 0, 1, &[0]);
    r.hidden_size = 32;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "hidden_size"));
    r = request(14, 0, 1, &[0]);
    r.dtype = Dtype::Unspecified as i32;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "dtype"));
    r = request(15, 0, 1, &[0]);
    r.dtype = 42;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "dtype"));
    r = request(16, 0, 2, &[0]);
    r.dtype = Dtype::Bf16 as i32; // f32 payload labelled bf16: twice the bytes expected
    cases.push((r.clone(), ErrorCode::InvalidArgument, "activations"));
    r = request(17, 0, 2, &[0]);
    r.activations = r.activations.slice(..r.activations.len() - 4);
    cases.push((r.clone(), ErrorCode::InvalidArgument, "activations"));
    r = request(18, 0, 2, &[0]);
    r.num_tokens = 3;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "activations"));
    r = request(19, 0, 2, &[0, 1]);
    r.routing.as_mut().expect("routing").weights[3] = f32::NAN;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing.weights[3]"));
    r = request(20, 0, 1, &[0]);
    r.routing.as_mut().expect("routing").weights[0] = f32::INFINITY;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing.weights[0]"));
    r = request(21, 0, 1, &[0]);
    r.epoch = 7;
    cases.push((r.clone(), ErrorCode::FailedPrecondition, "epoch"));
    r = request(22, 0, 2, &[0]);
    r.routing.as_mut().expect("routing").offsets.pop();
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing.offsets"));
    r = request(23, 0, 2, &[0]);
    r.routing.as_mut().expect("routing").offsets[1] = 5;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing.offsets[1]"));
    r = request(24, 0, 1, &[0, 0]);
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing.experts[1]"));
    r = request(25, 0, 1, &[0]);
    r.routing = None;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing"));
    r = request(26, 0, 1, &[0]);
    r.routing.as_mut().expect("routing").weights.push(1.0);
    cases.push((r.clone(), ErrorCode::InvalidArgument, "routing.weights"));
    r = request(27, 0, 0, &[0]);
    cases.push((r.clone(), ErrorCode::InvalidArgument, "num_tokens"));
    r = request(28, 0, 1, &[0]);
    r.reduce = 9;
    cases.push((r.clone(), ErrorCode::InvalidArgument, "reduce"));

    for (req, code, field) in cases {
        let resp = s.call(req).await;
        expect_error(&resp, code, field);
        // The same stream still computes, and gives the same answer as before.
        let again = expect_sums(&s.call(request(100, 0, 3, &[0, 2])).await, 3);
        assert_eq!(again, good, "a refused request changed a later answer");
    }

    // Asked per pair, the node answers each expert's output; weighed and added in expert order, they are the bits
    // of the node's own per-token sum.
    let mut per_pair = request(200, 0, 3, &[2, 0]);
    per_pair.reduce = Reduce::Pair as i32;
    let rows = expect_sums(&s.call(per_pair).await, 6);
    let mut combined = vec![0f32; 3 * HIDDEN];
    for (t, out) in combined.chunks_mut(HIDDEN).enumerate() {
        let row = |k: usize| &rows[(2 * t + k) * HIDDEN..(2 * t + k + 1) * HIDDEN];
        moe_model::combine_experts(out, [(2, 0.5, row(0)), (0, 0.5, row(1))]);
    }
    assert!(combined == good, "the per-pair rows do not add up to the per-token sums bit for bit");

    let status = client.status(StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.errors, 19);
    assert!(status.requests >= 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_vanishes_mid_stream_leaves_the_node_serving() {
    let node = ExpertNodeProcess::start(&fixture("qwen35"), "all", &[]).expect("node starts");

    // A router process that opens a stream, sends work and is killed while its requests are in flight.
    let script = format!(
        "exec {} generate --model {} --prompt-ids 1,2,3,4,5,6,7,8 --max-tokens 4000 --temperature 0 \
         --experts-at {} --json {}",
        bin("moectl").display(),
        fixture("qwen35").display(),
        node.addr(),
        moe_e2e::tls::flags(moe_tls::Role::Router).join(" ")
    );
    let mut router = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("router starts");
    let mut client = connect(node.addr()).await;
    let before = client.status(StatusRequest {}).await.expect("status").into_inner().requests;
    // Wait until the router has streamed work, then kill it.
    let mut streamed = false;
    for _ in 0..400 {
        let now = client.status(StatusRequest {}).await.expect("status").into_inner().requests;
        if now > before + 20 {
            streamed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(streamed, "the router process sent no work");
    router.kill().expect("kill");
    router.wait().expect("reaped");

    // And one that drops its stream without closing it, mid-request, from this process.
    {
        let mut other = connect(node.addr()).await;
        let s = Stream::open(&mut other).await;
        s.tx.send(request(1, 0, 64, &[0, 1, 2])).await.expect("sent");
        drop(s);
        drop(other);
    }

    let mut s = Stream::open(&mut client).await;
    let resp = s.call(request(2, 1, 2, &[4, 7])).await;
    expect_sums(&resp, 2);
    let mut node = node;
    assert!(node.is_running(), "the node died:\n{}", node.log_text());
    let exit = node.terminate().expect("stops on SIGTERM");
    assert!(exit.success(), "exit status {exit}:\n{}", node.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experts_load_and_unload_while_serving_and_memory_follows_the_shard() {
    let dir = fixture("qwen35");
    let all = ExpertNodeProcess::start(&dir, "all", &[]).expect("node starts");
    let node = ExpertNodeProcess::start(&dir, "layers=0:experts=0-1", &[]).expect("node starts");
    let mut reference = connect(all.addr()).await;
    let mut client = connect(node.addr()).await;
    let status = |set: &ExpertSet| set.layers.iter().map(|l| (l.layer, l.experts.clone())).collect::<Vec<_>>();

    let full = reference.status(StatusRequest {}).await.expect("status").into_inner();
    let small = client.status(StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status(&small.hosted.clone().unwrap_or_default()), vec![(0, vec![0, 1])]);
    // 2 of the 32 (layer, expert) pairs: its resident weights are exactly 1/16 of the full node's.
    assert_eq!(small.resident_bytes * 16, full.resident_bytes);
    assert_eq!(small.model, full.model, "both report the same model");

    let mut s = Stream::open(&mut client).await;
    let mut r = Stream::open(&mut reference).await;
    expect_error(&s.call(request(1, 2, 1, &[5])).await, ErrorCode::FailedPrecondition, "routing.experts[0]");

    let set = ExpertSet { layers: vec![LayerExperts { layer: 2, experts: vec![5, 6] }] };
    let change =
        client.load_experts(LoadExpertsRequest { experts: Some(set.clone()) }).await.expect("loads").into_inner();
    assert_eq!(change.experts_changed, 2);
    assert_eq!(status(&change.hosted.unwrap_or_default()), vec![(0, vec![0, 1]), (2, vec![5, 6])]);
    let got = expect_sums(&s.call(request(2, 2, 3, &[5, 6])).await, 3);
    let want = expect_sums(&r.call(request(2, 2, 3, &[5, 6])).await, 3);
    assert_eq!(got, want, "a loaded expert computes what a node started with it computes");

    let change =
        client.unload_experts(UnloadExpertsRequest { experts: Some(set) }).await.expect("unloads").into_inner();
    assert_eq!(change.experts_changed, 2);
    assert_eq!(change.resident_bytes, small.resident_bytes);
    expect_error(&s.call(request(3, 2, 1, &[6])).await, ErrorCode::FailedPrecondition, "routing.experts[0]");

    // A set that names what the model lacks is refused whole.
    let bad = ExpertSet { layers: vec![LayerExperts { layer: 9, experts: vec![0] }] };
    let e = client.load_experts(LoadExpertsRequest { experts: Some(bad) }).await.expect_err("no layer 9");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("experts.layers[0].layer"), "{}", e.message());
    let bad = ExpertSet { layers: vec![LayerExperts { layer: 1, experts: vec![8] }] };
    let e = client.load_experts(LoadExpertsRequest { experts: Some(bad) }).await.expect_err("no expert 8");
    assert!(e.message().contains("experts.layers[0].experts[0]"), "{}", e.message());

    // The standard health service answers SERVING for the expert service.
    let channel = moe_e2e::tls::channel(node.addr(), moe_tls::Role::Router).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest { service: "moe.v1.ExpertService".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(resp.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_only_its_own_stream() {
    let node = ExpertNodeProcess::start(&fixture("qwen35"), "all", &["--max-message-mib", "1"]).expect("starts");
    let client = connect(node.addr()).await;
    let client = client.clone().max_encoding_message_size(64 << 20);
    let mut big = client.clone();
    let mut s = Stream::open(&mut big).await;
    // 5000 tokens × 64 × 4 bytes = 1.2 MiB, over the node's 1 MiB.
    s.tx.send(request(1, 0, 5000, &[0])).await.expect("sent");
    let end = tokio::time::timeout(Duration::from_secs(10), s.rx.message()).await.expect("answered in time");
    // The stream ends (with the size status, or reset by HTTP/2 when the node stops reading it) without an answer.
    match end {
        Err(status) => assert!(
            matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::Internal),
            "{status:?}"
        ),
        Ok(message) => assert!(message.is_none(), "an oversized request was answered"),
    }
    assert!(node.log_text().contains("too large"), "{}", node.log_text());
    let mut fresh = client.clone();
    let mut s = Stream::open(&mut fresh).await;
    expect_sums(&s.call(request(2, 0, 100, &[0])).await, 100);
}
