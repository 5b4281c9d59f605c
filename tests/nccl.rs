//! The GPU check of the `nccl` feature: NCCL gradient all-reduce and weight broadcast on CUDA
//! tensors, against the MPI host path and against one process.
//!
//! `harness = false`, `required-features = ["nccl"]`: needs the CUDA toolkit, NCCL, MPI and
//! at least one GPU. Run without a launcher it relaunches itself under
//! `mpirun -np <GPUs, at most 2>` (one rank per GPU; with one GPU a world of one still runs
//! the device code path). Not run by CI (no GPU there); see the README for its status.
//!
//! ```text
//! cargo test --release --features nccl --test nccl
//! ```

use std::process::{Command, ExitCode, Stdio};

use candle_core::{DType, Device, Tensor, Var};
use pgrpo::distributed::{local_rank, Collective, Mpi, Nccl};
use pgrpo::models::MlpPolicy;
use pgrpo::{GroupKey, GroupedPrompt, Policy, Trainer, TrainerConfig};

fn main() -> ExitCode {
    let under_launcher = std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
        || std::env::var_os("PMI_SIZE").is_some();
    if under_launcher {
        rank_main();
        return ExitCode::SUCCESS;
    }
    let gpus = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0);
    if gpus == 0 {
        eprintln!("nccl test FAILED: no GPU found (`nvidia-smi -L`)");
        return ExitCode::FAILURE;
    }
    let np = gpus.min(2);
    println!("nccl test: mpirun -np {np} ({gpus} GPUs)");
    let status = Command::new("mpirun")
        .args(["-np", &np.to_string(), "--bind-to", "none"])
        .arg(std::env::current_exe().expect("test binary"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        other => {
            eprintln!("nccl test FAILED: {other:?}");
            ExitCode::FAILURE
        }
    }
}

fn rank_main() {
    let mpi = Mpi::init().expect("MPI init");
    let device = Device::new_cuda(local_rank().unwrap_or(0)).expect("CUDA device");
    let nccl = Nccl::new(mpi, &device).expect("NCCL communicator");
    let (rank, world) = (nccl.rank(), nccl.world());
    let say = |what: &str| {
        if rank == 0 {
            println!("  [{world} GPU ranks] {what}: ok");
        }
    };

    // Gradients of known values: rank r contributes (r + 1) · x; one var has no gradient
    // on odd ranks, one on no rank.
    let a = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &device).unwrap();
    let b = Var::new(&[0.5f32, -1.0, 2.0], &device).unwrap();
    let unused = Var::new(&[0f32; 4], &device).unwrap();
    let scale = (rank + 1) as f64;
    let mut loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap() * scale).unwrap();
    if rank % 2 == 0 {
        loss = (loss + (b.as_tensor().sum_all().unwrap() * scale).unwrap()).unwrap();
    }
    let mut grads = loss.backward().unwrap();
    let vars = [a.clone(), unused.clone(), b.clone()];
    nccl.all_reduce_gradients(&vars, &mut grads).unwrap();
    let total: f64 = (1..=world).map(|r| r as f64).sum();
    let even: f64 = (1..=world).step_by(2).map(|r| r as f64).sum();
    let ga = grads.get(a.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(
        ga,
        [[2.0, 4.0], [6.0, 8.0]].map(|r| r.map(|x| x * total as f32))
    );
    let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(gb, vec![even as f32; 3]);
    assert!(grads.get(unused.as_tensor()).is_none());
    say("ncclAllReduce of gradient buckets (missing gradients, presence flags)");

    // Broadcast: every rank starts from its own values and ends with rank 0's, per dtype.
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let v = Var::from_tensor(
            &Tensor::full(rank as f32 + 1.0, (3, 5), &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        nccl.broadcast_vars(std::slice::from_ref(&v), 0).unwrap();
        let got = v
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), vec![1.0; 15], "{dtype:?}");
    }
    say("ncclBroadcast of weights (f32, bf16, f64)");

    // Training: a data-parallel trainer against one process on the same GPU.
    let cfg = TrainerConfig {
        num_generations: 4,
        learning_rate: 0.01,
        seed: 3,
        ..Default::default()
    };
    let policy = || MlpPolicy::new(8, 64, 4, 5, &device).unwrap();
    let reward = |x: &Vec<f32>, a: &u32, _g: &GroupKey| x[*a as usize % 8];
    let batch: Vec<GroupedPrompt<Vec<f32>>> = (0..6)
        .map(|i| {
            let x: Vec<f32> = (0..8).map(|j| ((i * 7 + j * 3) % 5) as f32 / 4.0).collect();
            GroupedPrompt::new(x, (i % 2) as u32)
        })
        .collect();
    let mut many = Trainer::new(policy(), reward, cfg.clone())
        .unwrap()
        .with_collective(&nccl)
        .unwrap();
    let mut one = Trainer::new(policy(), reward, cfg).unwrap();
    let r1 = one.rollout(&batch).unwrap();
    let rn = many.rollout(&batch).unwrap();
    if world == 1 {
        let g1 = one.gradients(&r1).unwrap();
        let gn = many.gradients(&rn).unwrap();
        for (x, y) in g1.iter().zip(&gn) {
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
    }
    drop((r1, rn));
    for _ in 0..3 {
        many.step(&batch).unwrap();
    }
    many.check_replicas().unwrap();
    let n: usize = many.policy().vars().iter().map(|v| v.elem_count()).sum();
    say(&format!(
        "3 data-parallel steps, {n} parameters bit-identical on every rank"
    ));
}
