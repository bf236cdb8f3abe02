//! Traces over OTLP/gRPC: an OTLP trace collector in-process (the real protocol, served by
//! tonic), the daemon's telemetry pointed at it, and one request whose span tree and
//! `gen_ai.*` attributes must arrive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use powerinfer_client::{greedy, proto, text_request};
use powerinfer_daemon::server::telemetry::{Logs, Telemetry};
use powerinfer_ops::quant::WeightType;
use powerinfer_tests::TempDir;
use powerinfer_tests::server::{TestServer, test_config};
use powerinfer_tests::synth::Spec;

/// A collected span with its resource's service name.
#[derive(Clone, Debug)]
struct Collected {
    service: String,
    span: Span,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Collected>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Collected {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|a| Some((a.key.clone(), text(a.value.as_ref()?.value.as_ref()?)?)))
        .collect()
}

/// The collector and the process-wide telemetry, set up once (a process has one
/// subscriber), on a runtime that lives as long as the process.
fn telemetry() -> &'static (Collector, Telemetry) {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static SETUP: OnceLock<(Collector, Telemetry)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap()
        });
        rt.block_on(async {
            let collector = Collector::default();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(collector.clone()))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            let t = Telemetry::install(Some(&format!("http://{addr}")), Logs::Off).unwrap();
            (collector, t)
        })
    })
}

#[test]
fn one_request_s_spans_and_attributes_arrive_over_otlp() {
    let (collector, telemetry) = telemetry();
    let dir = TempDir::new("otel");
    Spec {
        wtype: WeightType::Q8_0,
        seed: 77,
        ..Spec::default()
    }
    .write_to(dir.path(), "otel-tiny");
    let server = TestServer::start(test_config(dir.path()));
    let client = server.client();
    let request = proto::GenerateRequest {
        max_tokens: 20,
        sampling: Some(greedy()),
        ..text_request("otel-tiny", "trace this request")
    };
    let generated = server.block_on(client.generate_all(request)).unwrap();
    let usage = generated.summary.usage.unwrap();
    assert_eq!(usage.completion_tokens, 20);

    // Spans are exported in batches: flush until the request's span tree is complete.
    let start = Instant::now();
    let (root, tree) = loop {
        telemetry.flush();
        let spans = collector.0.lock().unwrap().clone();
        let root = spans.iter().find(|c| {
            let a = attributes(&c.span);
            c.span.name == "text_completion otel-tiny"
                && a.get("gen_ai.usage.output_tokens").map(String::as_str) == Some("20")
        });
        if let Some(root) = root {
            let tree: Vec<Collected> = spans
                .iter()
                .filter(|c| c.span.trace_id == root.span.trace_id)
                .cloned()
                .collect();
            let names: Vec<&str> = tree.iter().map(|c| c.span.name.as_str()).collect();
            let complete = [
                "queue",
                "prefill",
                "decode",
                "step",
                "cold.forward",
                "sample",
            ]
            .iter()
            .all(|n| names.contains(n));
            if complete {
                break (root.clone(), tree);
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the request's spans did not arrive: {:?}",
            spans.iter().map(|c| &c.span.name).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    assert_eq!(root.service, "powerinferd");
    let a = attributes(&root.span);
    assert_eq!(a["gen_ai.operation.name"], "text_completion");
    assert_eq!(a["gen_ai.request.model"], "otel-tiny");
    assert_eq!(
        a["gen_ai.usage.input_tokens"],
        usage.prompt_tokens.to_string()
    );
    assert_eq!(a["gen_ai.usage.output_tokens"], "20");
    assert_eq!(a["gen_ai.response.finish_reasons"], "length");
    assert!(
        root.span.parent_span_id.is_empty(),
        "the request span is the root"
    );

    let by_id: HashMap<&[u8], &Span> = tree
        .iter()
        .map(|c| (c.span.span_id.as_slice(), &c.span))
        .collect();
    let parent_name = |s: &Span| {
        by_id
            .get(s.parent_span_id.as_slice())
            .map(|p| p.name.clone())
    };
    for c in &tree {
        let s = &c.span;
        let want_parent = match s.name.as_str() {
            "queue" | "prefill" | "decode" => Some("text_completion otel-tiny"),
            "cold.forward" | "sample" => Some("step"),
            _ => None,
        };
        if let Some(p) = want_parent {
            assert_eq!(parent_name(s).as_deref(), Some(p), "parent of {}", s.name);
        }
        if s.name == "step" {
            let p = parent_name(s);
            assert!(
                matches!(p.as_deref(), Some("prefill" | "decode")),
                "a step belongs to a phase, not {p:?}"
            );
        }
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    }
    // Decode steps are sampled: fewer step spans than tokens.
    let steps = tree.iter().filter(|c| c.span.name == "step").count();
    assert!((2..20).contains(&steps), "{steps} step spans");
}
