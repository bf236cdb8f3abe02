//! Hot/cold placement: the solver honours the budget, the order of parts, frequency
//! order and the per-layer minimum; gpuidx files round-trip, PowerInfer-style files are
//! read by position, and hostile ones are refused with a reason.

use powerinfer_daemon::generation::LoadedModel;
use powerinfer_daemon::model::placement::{self, DeviceProfile};
use powerinfer_daemon::model::sidecar::{self, SidecarData};
use powerinfer_daemon::model::{KvType, SparsityMode};
use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufWriter, Value};
use powerinfer_ops::pod::as_bytes;
use powerinfer_ops::quant::WeightType;
use powerinfer_ops::sparse::NEURON_RANGE;
use powerinfer_tests::synth::Spec;
use powerinfer_tests::{TempDir, powerinferd};

const N_FF: usize = 256;

/// A model with a sidecar of made-up frequencies: neuron `i` of layer `l` fires with a
/// rate that falls with `(i * 7 + l * 13) % N_FF`, so every layer ranks differently.
fn model_with_frequencies(dir: &TempDir) -> (std::path::PathBuf, LoadedModel) {
    let spec = Spec {
        wtype: WeightType::Q8_0,
        n_ff: N_FF,
        n_layer: 3,
        seed: 81,
        ..Spec::default()
    };
    let path = spec.write_to(dir.path(), "placed");
    let probe = LoadedModel::load(&path).unwrap();
    let c = probe.model.config.clone();
    let freqs: Vec<Vec<f32>> = (0..c.n_layer)
        .map(|l| {
            (0..N_FF)
                .map(|i| 1.0 - ((i * 7 + l * 13) % N_FF) as f32 / N_FF as f32)
                .collect()
        })
        .collect();
    sidecar::write(
        &sidecar::path_for(&path),
        &c,
        &SidecarData {
            calibration_tokens: 100,
            frequencies: Some(freqs),
            ..SidecarData::default()
        },
    )
    .unwrap();
    let mut loaded = LoadedModel::load_for(&path, SparsityMode::Dense).unwrap();
    loaded.model.ensure_neuron_form();
    (path, loaded)
}

#[test]
fn the_solver_fills_the_budget_by_frequency_with_the_per_layer_minimum() {
    let dir = TempDir::new("placement-solve");
    let (_, loaded) = model_with_frequencies(&dir);
    let model = &loaded.model;
    let c = &model.config;
    let freqs = model.sparsity.frequencies.clone().unwrap();
    let everything = {
        let p = placement::solve(
            model,
            &DeviceProfile::for_device("cuda:0", u64::MAX / 2),
            64,
            1,
            KvType::F16,
        );
        assert!(p.parts.iter().all(|x| x.on_device));
        assert!(p.hot.iter().all(|h| h.len() == N_FF));
        assert_eq!(p.expected_hit_rate, 1.0);
        p.fixed_bytes()
    };
    let neuron = placement::solve(
        model,
        &DeviceProfile::for_device("sim", 0),
        64,
        1,
        KvType::F16,
    )
    .neuron_bytes;

    for extra_neurons in [0, 40, 300, 500] {
        let budget = everything + extra_neurons * neuron[0];
        let mut device = DeviceProfile::for_device("sim", budget);
        // A small synchronisation cost, so C_l is a few dozen neurons here.
        device.sync_seconds = 40.0 * neuron[0] as f64 / device.host_bandwidth;
        let p = placement::solve(model, &device, 64, 1, KvType::F16);
        assert!(p.parts.iter().all(|x| x.on_device));
        assert!(p.fixed_bytes() + p.hot_bytes() <= budget, "over budget");
        let hot: usize = p.hot.iter().map(Vec::len).sum();
        for (l, h) in p.hot.iter().enumerate() {
            assert!(
                h.is_empty() || h.len() >= p.min_hot[l],
                "layer {l}: {} hot, minimum {}",
                h.len(),
                p.min_hot[l]
            );
            assert!(
                h.len() % NEURON_RANGE == 0 || h.len() == N_FF,
                "layer {l}: whole neuron ranges, {}",
                h.len()
            );
            assert!(h.windows(2).all(|w| w[0] < w[1]));
            // Within a layer, no cold neuron is more frequent than a hot one.
            let coldest_hot = h
                .iter()
                .map(|&i| freqs[l][i as usize])
                .fold(f32::MAX, f32::min);
            let hottest_cold = (0..N_FF as u32)
                .filter(|i| !h.contains(i))
                .map(|i| freqs[l][i as usize])
                .fold(f32::MIN, f32::max);
            assert!(h.is_empty() || coldest_hot >= hottest_cold, "layer {l}");
        }
        // Opening a layer takes the ranges holding its C_l neurons.
        let opening = (p.min_hot[0].div_ceil(NEURON_RANGE) * NEURON_RANGE) as u64;
        if extra_neurons < opening {
            assert_eq!(hot, 0, "{extra_neurons} neurons cannot open a layer");
        } else {
            // What is left after the greedy fill is less than a range or an opening.
            assert!(
                hot as u64 + opening.max(NEURON_RANGE as u64) > extra_neurons,
                "{hot} of {extra_neurons}"
            );
        }
        assert!(
            p.expected_hit_rate >= p.hot_share(c.n_ff) - 1e-9,
            "frequent neurons first"
        );
    }

    // A budget below the fixed parts: parts that fit go, in order, then nothing else.
    let p = placement::solve(
        model,
        &DeviceProfile::for_device("cuda:0", everything / 2),
        64,
        1,
        KvType::F16,
    );
    assert!(p.parts.iter().any(|x| !x.on_device));
    assert!(p.fixed_bytes() <= everything / 2);
    assert!(p.parts[0].on_device, "layer 0's attention first");
    // Neurons go only to layers whose attention is on the device.
    for (l, h) in p.hot.iter().enumerate() {
        assert!(h.is_empty() || p.attention_on_device(l), "layer {l}");
    }
}

#[test]
fn gpuidx_files_round_trip_and_hostile_ones_are_refused() {
    let dir = TempDir::new("placement-gpuidx");
    let (path, loaded) = model_with_frequencies(&dir);
    let c = &loaded.model.config;
    // The command writes NAME.generated.gpuidx next to the model; the budget holds every
    // fixed part and one and a half layers of neurons.
    let device = |budget| DeviceProfile::for_device("sim", budget);
    let all = placement::solve(&loaded.model, &device(u64::MAX / 2), 64, 1, KvType::F16);
    let budget = all.fixed_bytes() + all.neuron_bytes[0] * (N_FF as u64 * 3 / 2);
    let o = powerinferd(&[
        "place",
        path.to_str().unwrap(),
        "--budget",
        &budget.to_string(),
        "--device",
        "sim",
        "--ctx",
        "64",
    ]);
    assert_eq!(o.status, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("expected hot hit rate"), "{}", o.stdout);
    let file = placement::path_for(&path);
    let read = placement::read(&file, c.n_layer, c.n_ff).unwrap();
    assert_eq!(read.vram_capacity, budget);
    let solved = placement::solve(&loaded.model, &device(budget), 64, 1, KvType::F16);
    assert_eq!(read.hot, solved.hot);
    assert!(read.hot.iter().any(|h| !h.is_empty()) && read.hot.iter().any(Vec::is_empty));

    // A file as PowerInfer's tools write it (no keys of ours) reads by position.
    let write = |name: &str, arch: &str, tensors: Vec<(String, Vec<i32>)>| {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", Value::String(arch.into()))
            .unwrap();
        w.add_metadata("split.vram_capacity", Value::U64(123))
            .unwrap();
        for (n, v) in &tensors {
            w.add_tensor(n, GgmlType::I32, &[v.len() as u64], as_bytes(v).to_vec())
                .unwrap();
        }
        let p = dir.path().join(name);
        w.write_file(&p).unwrap();
        p
    };
    let layer = |l: usize, hot: &[i32]| {
        let mut m = vec![0i32; N_FF];
        hot.iter().for_each(|&i| m[i as usize] = 1);
        vec![
            (format!("blk.{l}.gpu_idx"), m),
            (format!("blk.{l}.gpu_bucket"), hot.to_vec()),
        ]
    };
    let good: Vec<_> = (0..3).flat_map(|l| layer(l, &[1, 5, 200])).collect();
    let p = write("pi.gpuidx", "generic.gpu_index", good.clone());
    let g = placement::read(&p, 3, N_FF).unwrap();
    assert_eq!(g.vram_capacity, 123);
    assert_eq!(g.hot, vec![vec![1, 5, 200]; 3]);

    let refused = |name: &str, arch: &str, tensors: Vec<(String, Vec<i32>)>, why: &str| {
        let p = write(name, arch, tensors);
        let e = placement::read(&p, 3, N_FF).unwrap_err().to_string();
        assert!(e.contains(why), "{name}: {e}");
    };
    refused("arch.gpuidx", "llama", good.clone(), "general.architecture");
    let mut swapped = good.clone();
    swapped.swap(0, 2);
    refused(
        "order.gpuidx",
        "generic.gpu_index",
        swapped,
        "expected \"blk.0.gpu_idx\"",
    );
    refused(
        "count.gpuidx",
        "generic.gpu_index",
        good[..4].to_vec(),
        "2 per layer",
    );
    let mut two = good.clone();
    two[2].1[7] = 2;
    refused("value.gpuidx", "generic.gpu_index", two, "expected 0 or 1");
    let mut unsorted = good.clone();
    unsorted[1].1 = vec![5, 1, 200];
    refused("sorted.gpuidx", "generic.gpu_index", unsorted, "ascending");
    let mut short = good.clone();
    short[4].1.truncate(10);
    refused("short.gpuidx", "generic.gpu_index", short, "256 neurons");
    let mut range = good;
    range[1].1 = vec![1, 5, -3];
    refused("range.gpuidx", "generic.gpu_index", range, "ascending");
    // Not a GGUF at all.
    let junk = dir.path().join("junk.gpuidx");
    std::fs::write(&junk, b"not a gguf").unwrap();
    assert!(placement::read(&junk, 3, N_FF).is_err());
}
