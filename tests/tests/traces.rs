//! Traces across processes: a real OTLP/gRPC receiver (the OTLP protos' TraceService, served by this test) collects
//! what a router and two expert nodes export, and a completion through both nodes is one trace whose node spans
//! are children of the router's dispatch spans.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_e2e::{fixture, ExpertNodeProcess, Launch, RouterProcess};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::json;

/// One span as received, with its process's `service.name`.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn text(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace: s.trace_id,
                        id: s.span_id,
                        parent: s.parent_span_id,
                        attributes: text(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_through_two_nodes_is_one_trace_with_node_spans_under_the_dispatches() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let otlp = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = fixture("qwen35");
    // Export promptly rather than every 5 s.
    let launch = Launch { env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())], ..Launch::default() };
    let trace = ["--otlp-endpoint", &otlp, "--trace-sample-ratio", "1"];
    let nodes = [
        ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "0-3", &trace, &launch).expect("node"),
        ExpertNodeProcess::launch(&dir, "127.0.0.1:0", "4-7", &trace, &launch).expect("node"),
    ];
    let at = format!("{},{}", nodes[0].addr(), nodes[1].addr());
    let mut args = vec!["--experts-at", &at];
    args.extend(trace);
    let router = RouterProcess::launch(&dir, &args, &launch).expect("router");

    let body = json!({"model": "qwen35", "prompt": (1..9).collect::<Vec<u32>>(), "max_tokens": 4, "temperature": 0,
                      "ignore_eos": true});
    let resp =
        reqwest::Client::new().post(format!("{}/v1/completions", router.url())).json(&body).send().await.expect("sent");
    assert_eq!(resp.status().as_u16(), 200);

    // Wait (bounded) until the request's spans are all in: the request span, its four steps, and a node span for
    // every dispatch span, from both nodes. The processes export on their own schedules (every 100 ms here, later
    // on a loaded machine), so what has arrived is read again until it is whole.
    let started = Instant::now();
    let spans = loop {
        let spans = receiver.spans.lock().expect("lock").clone();
        let count = |name: &str| spans.iter().filter(|s| s.name == name).count();
        let nodes_seen: BTreeSet<String> = spans
            .iter()
            .filter(|s| s.name == "expert.compute")
            .filter_map(|s| s.attributes.get("node").cloned())
            .collect();
        let whole = spans.iter().any(|s| s.name.starts_with("text_completion"))
            && count("engine.step") >= 4
            && count("moe.dispatch") > 0
            && count("expert.compute") >= count("moe.dispatch")
            && nodes_seen.len() == 2;
        if whole {
            // One more export period, for anything that would come in excess.
            tokio::time::sleep(Duration::from_millis(500)).await;
            break receiver.spans.lock().expect("lock").clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "traces did not arrive: {:#?}\nrouter log:\n{}",
            spans.iter().map(|s| (&s.service, &s.name)).collect::<Vec<_>>(),
            router.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let request: Vec<&Got> = spans.iter().filter(|s| s.name.starts_with("text_completion")).collect();
    assert_eq!(request.len(), 1, "one request span");
    let request = request[0];
    assert_eq!(request.service, "router-node");
    assert!(request.parent.is_empty(), "the request span is the root");
    assert_eq!(request.name, "text_completion qwen35");
    for (k, v) in [
        ("gen_ai.operation.name", "text_completion"),
        ("gen_ai.request.model", "qwen35"),
        ("gen_ai.usage.input_tokens", "8"),
        ("gen_ai.usage.output_tokens", "4"),
        ("gen_ai.request.max_tokens", "4"),
    ] {
        assert_eq!(request.attributes.get(k).map(String::as_str), Some(v), "{k} on {:?}", request.attributes);
    }
    // Everything of this request is in its trace.
    let in_trace: Vec<&Got> = spans.iter().filter(|s| s.trace == request.trace).collect();
    let steps: Vec<&Got> = in_trace.iter().copied().filter(|s| s.name == "engine.step").collect();
    // Prefill and three decode steps (the fourth token needs no forward).
    assert_eq!(steps.len(), 4, "engine steps: {steps:#?}");
    assert!(steps.iter().all(|s| s.parent == request.id), "steps are children of the request");
    let step_ids: BTreeSet<&Vec<u8>> = steps.iter().map(|s| &s.id).collect();
    let dispatches: Vec<&Got> = in_trace.iter().copied().filter(|s| s.name == "moe.dispatch").collect();
    assert!(!dispatches.is_empty());
    assert!(dispatches.iter().all(|d| step_ids.contains(&d.parent)), "dispatches are children of steps");
    let dispatch_ids: BTreeSet<&Vec<u8>> = dispatches.iter().map(|s| &s.id).collect();
    let computes: Vec<&Got> = in_trace.iter().copied().filter(|s| s.name == "expert.compute").collect();
    assert_eq!(computes.len(), dispatches.len(), "one node span per message");
    for c in &computes {
        assert_eq!(c.service, "expert-node");
        assert!(dispatch_ids.contains(&c.parent), "a node span outside the dispatches: {c:?}");
    }
    let nodes_seen: BTreeSet<&String> = computes.iter().filter_map(|c| c.attributes.get("node")).collect();
    assert_eq!(nodes_seen.len(), 2, "both nodes computed for the request");
    // Nothing traced outside this request's trace.
    let traces: BTreeSet<&Vec<u8>> = spans.iter().map(|s| &s.trace).collect();
    assert_eq!(traces.len(), 1, "one trace in all");
    server.abort();
}
