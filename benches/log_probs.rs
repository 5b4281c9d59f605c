//! Token log-probs `log_softmax(logits)[target]`, forward + backward, over `(1536, V)` logits:
//! the fused [`pgrpo::ops::log_softmax_gather`] against candle's `log_softmax` + `gather`.
//!
//! `cargo bench --bench log_probs` (about half a minute).

use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

const ROWS: usize = 1536;

fn log_probs(c: &mut Criterion) {
    let mut group = c.benchmark_group("log_softmax_gather_f32");
    for v in [8192usize, 49152] {
        let logits = Tensor::randn(0f32, 2.0, (ROWS, v), &Device::Cpu).expect("logits");
        let targets: Vec<u32> = (0..ROWS).map(|i| ((i * 7919) % v) as u32).collect();
        let targets = Tensor::from_vec(targets, ROWS, &Device::Cpu).expect("targets");
        group.throughput(Throughput::Elements((ROWS * v) as u64));
        for fused in [true, false] {
            let id = BenchmarkId::new(if fused { "fused" } else { "stock" }, v);
            group.bench_function(id, |b| {
                b.iter_batched(
                    || Var::from_tensor(&logits).expect("var"),
                    |x| {
                        let lp = if fused {
                            pgrpo::ops::log_softmax_gather(x.as_tensor(), &targets)
                        } else {
                            candle_nn::ops::log_softmax(x.as_tensor(), 1)
                                .and_then(|l| l.gather(&targets.unsqueeze(1)?, 1))
                        }
                        .expect("log-probs");
                        lp.sum_all().and_then(|l| l.backward()).expect("backward")
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = log_probs
}
criterion_main!(benches);
