//! A device that fails, and a hot executor that panics, while the daemon serves: the
//! request in flight gets an error, the model reports NOT_SERVING in health and FAILED
//! in Status, later requests to it are refused, and another model keeps serving.

use std::time::{Duration, Instant};

use powerinfer_client::{Client, ClientError, ServingStatus, greedy, proto, text_request};
use powerinfer_ops::quant::WeightType;
use powerinfer_tests::TempDir;
use powerinfer_tests::server::{TestServer, test_config};
use powerinfer_tests::synth::Spec;
use tonic::Code;

fn request(model: &str) -> proto::GenerateRequest {
    proto::GenerateRequest {
        max_tokens: 24,
        sampling: Some(greedy()),
        ..text_request(model, "once upon a time")
    }
}

async fn load(client: &Client, model: &str, device: &str) -> proto::ModelInfo {
    client
        .load(proto::LoadModelRequest {
            model: model.into(),
            device: device.into(),
            vram_budget_bytes: 64 << 20,
            context_size: 128,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{model} on {device}: {e}"))
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not happen");
}

fn code(e: &ClientError) -> Code {
    e.code()
        .unwrap_or_else(|| panic!("not a server error: {e}"))
}

#[test]
fn a_failing_device_or_a_panicking_executor_stops_its_model_and_no_other() {
    let dir = TempDir::new("device-faults");
    for name in ["healthy", "failing", "panicking"] {
        Spec {
            wtype: WeightType::Q4_1,
            n_ff: 256,
            n_layer: 3,
            seed: 611,
            ..Spec::default()
        }
        .write_to(dir.path(), name);
    }
    let server = TestServer::start(test_config(dir.path()));
    let client = server.client();
    server.block_on(async {
        load(&client, "healthy", "cpu").await;
        // Each device fails some way into the first request's decoding.
        let failing = load(&client, "failing", "sim,fail_after=60").await;
        assert!(failing.hot_bytes > 0, "placed on the device");
        load(&client, "panicking", "sim,panic_after=60").await;

        for (model, why) in [("failing", "injected fault"), ("panicking", "panicked")] {
            let e = client.generate_all(request(model)).await.unwrap_err();
            assert!(e.to_string().contains(why), "{model}: {e}");
            wait_for("NOT_SERVING", async || {
                client.health(model).await.ok() == Some(ServingStatus::NotServing)
            })
            .await;
            let again = client.generate_all(request(model)).await.unwrap_err();
            assert_eq!(code(&again), Code::Unavailable, "{model}: {again}");
            assert!(again.to_string().contains("failed"), "{again}");
        }

        let status = client.status().await.unwrap();
        let state = |name: &str| {
            let m = status.models.iter().find(|m| m.name == name).unwrap();
            (
                proto::ModelState::try_from(m.state).unwrap(),
                m.failure.clone(),
            )
        };
        assert_eq!(
            state("healthy"),
            (proto::ModelState::Serving, String::new())
        );
        for model in ["failing", "panicking"] {
            let (s, why) = state(model);
            assert_eq!(s, proto::ModelState::Failed);
            assert!(!why.is_empty());
        }
    });
    // pictl shows which model failed and why.
    let st = server.pictl(&["status"]);
    assert_eq!(st.status, 0, "{}", st.stderr);
    assert!(
        st.stdout.contains("STATE") && st.stdout.contains("serving"),
        "{}",
        st.stdout
    );
    assert!(
        st.stdout
            .contains("failing failed: device: device failure: injected fault"),
        "{}",
        st.stdout
    );
    server.block_on(async {
        // The other model serves on, and the failed ones come back by loading again.
        let out = client.generate_all(request("healthy")).await.unwrap();
        assert_eq!(out.tokens.len(), 24);
        assert_eq!(
            client.health("healthy").await.unwrap(),
            ServingStatus::Serving
        );
        client.unload("failing").await.unwrap();
        load(&client, "failing", "sim").await;
        let out = client.generate_all(request("failing")).await.unwrap();
        assert!(!out.tokens.is_empty());
        assert_eq!(
            client.health("failing").await.unwrap(),
            ServingStatus::Serving
        );
    });
}
