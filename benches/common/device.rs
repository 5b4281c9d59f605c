//! The device a bench runs on: the CPU unless `PGRPO_BENCH_DEVICE` says otherwise.
//!
//! `PGRPO_BENCH_DEVICE=cuda` (or `cuda:N`) runs on CUDA GPU 0 (or N); it needs a build with
//! `--features cuda` (`scripts/cuda-build.sh`, `scripts/gpu-check.sh`). Unset, empty or `cpu`
//! leaves the bench exactly as it is on the CPU.

use candle_core::Device;

/// The device named by `PGRPO_BENCH_DEVICE`; panics on a name it doesn't know or a device
/// that can't be opened (a bench that silently fell back to the CPU would mislabel its numbers).
pub fn bench_device() -> Device {
    let name = std::env::var("PGRPO_BENCH_DEVICE").unwrap_or_default();
    match name.as_str() {
        "" | "cpu" => Device::Cpu,
        "cuda" => open_cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(ordinal) => open_cuda(ordinal),
            None => panic!("PGRPO_BENCH_DEVICE={s}: expected cpu, cuda or cuda:N"),
        },
    }
}

fn open_cuda(ordinal: usize) -> Device {
    Device::new_cuda(ordinal).unwrap_or_else(|e| {
        panic!("PGRPO_BENCH_DEVICE: CUDA device {ordinal} did not open (a --features cuda build and a GPU are needed): {e}")
    })
}

/// The criterion group name, with the device appended when it isn't the CPU (so GPU results
/// are kept apart from the CPU baselines under target/criterion).
pub fn group_name(base: &str, device: &Device) -> String {
    match device {
        Device::Cpu => base.to_string(),
        Device::Cuda(_) => format!("{base}_cuda"),
        Device::Metal(_) => format!("{base}_metal"),
    }
}
