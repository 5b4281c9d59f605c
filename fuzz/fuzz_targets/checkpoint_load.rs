//! Fuzzes checkpoint and reward-history loading: nothing may panic, every failure must be a
//! typed error, and whatever loads must resume a trainer or be refused with a typed error.
//!
//! Input layout: byte 0 picks the mode, byte 1 the file, the rest is data.
//! - mode 0: the data is a reward-history JSON document;
//! - mode 1: a valid checkpoint with one file replaced by the data and the manifest re-signed
//!   (so the parsers behind the checksum see the data);
//! - mode 2: the same without re-signing (checksum and size checks);
//! - mode 3: a valid checkpoint with byte edits: the data is (offset u16, value u8) triples
//!   applied to the chosen file, then re-signed.

#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use pgrpo::tasks::bandit::PreferenceBandit;
use pgrpo::checkpoint::{files, sha256_hex};
use pgrpo::models::TabularPolicy;
use pgrpo::checkpoint::Checkpoint;
use pgrpo::{Error, GroupKey, GroupedPrompt, HistoryKind, RewardHistory, Trainer};

fn bandit() -> PreferenceBandit {
    PreferenceBandit::new(vec![0.6, 0.4], vec![1.0, 0.5], 3, 0.5, 0.2).unwrap()
}

/// A valid checkpoint (tabular bandit, beta > 0, exponential history), as in-memory files.
fn base() -> &'static BTreeMap<String, Vec<u8>> {
    static BASE: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    BASE.get_or_init(|| {
        let b = bandit();
        let mut cfg = pgrpo::TrainerConfig {
            num_generations: 3,
            learning_rate: 0.05,
            history: HistoryKind::Exponential { half_life: 8.0 },
            ..Default::default()
        };
        cfg.objective.beta = 0.04;
        let mut t = Trainer::new(b.policy(&Device::Cpu).unwrap(), b.reward_fn(1), cfg).unwrap();
        let batch = [GroupedPrompt::new(0u32, "a"), GroupedPrompt::new(1u32, "b")];
        for _ in 0..3 {
            t.step(&batch).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("pgrpo-fuzz-base-{}", std::process::id()));
        let ck = t.save(&dir).unwrap();
        let mut map = BTreeMap::new();
        for e in std::fs::read_dir(&ck).unwrap() {
            let e = e.unwrap();
            map.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        // To seed a corpus: the valid files, one per mode-1 input.
        if let Some(out) = std::env::var_os("PGRPO_FUZZ_DUMP_SEEDS") {
            let out = std::path::PathBuf::from(out);
            let _ = std::fs::create_dir_all(&out);
            let names: Vec<&str> = std::iter::once(files::MANIFEST).chain(files::ALL).collect();
            for (i, n) in names.iter().enumerate() {
                if let Some(bytes) = map.get(*n) {
                    let mut seed = vec![1u8, i as u8];
                    seed.extend_from_slice(bytes);
                    let _ = std::fs::write(out.join(format!("seed-{n}")), &seed);
                    if n.ends_with(".json") {
                        seed[0] = 0;
                        let _ = std::fs::write(out.join(format!("seed0-{n}")), &seed);
                    }
                }
            }
        }
        map
    })
}

fn resign(map: &mut BTreeMap<String, Vec<u8>>, name: &str) {
    let Some(bytes) = map.get(name).cloned() else {
        return;
    };
    let Some(m) = map.get(files::MANIFEST) else {
        return;
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(m) else {
        return;
    };
    if let Some(list) = v.get_mut("files").and_then(|f| f.as_array_mut()) {
        for e in list {
            if e.get("name").and_then(|n| n.as_str()) == Some(name) {
                e["bytes"] = (bytes.len() as u64).into();
                e["sha256"] = sha256_hex(&bytes).into();
            }
        }
    }
    map.insert(files::MANIFEST.to_owned(), serde_json::to_vec(&v).unwrap());
}

fn check_typed(e: &Error) {
    // Every loading failure names a file.
    match e {
        Error::Checkpoint { path, problem } => {
            let _ = (path, problem.to_string());
        }
        other => panic!("untyped loading error: {other}"),
    }
}

fn try_resume(map: &BTreeMap<String, Vec<u8>>) {
    match Checkpoint::from_files(map, "fuzz", &Device::Cpu) {
        Err(e) => check_typed(&e),
        Ok(ck) => {
            let b = bandit();
            let policy = TabularPolicy::new(2, 3, true, &Device::Cpu).unwrap();
            match Trainer::resume_from(ck, policy, b.reward_fn(0)) {
                Ok(mut t) => {
                    // A resumed trainer must be usable: a step either works or fails typed.
                    let batch = [GroupedPrompt::new(0u32, GroupKey::from("a"))];
                    let _ = t.step(&batch);
                }
                Err(Error::Checkpoint { .. }) | Err(Error::InvalidConfig { .. }) => {}
                Err(e) => panic!("untyped resume error: {e}"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (mode, which, rest) = (data[0] % 4, data[1], &data[2..]);
    let names: Vec<&str> = std::iter::once(files::MANIFEST).chain(files::ALL).collect();
    let name = names[which as usize % names.len()];
    match mode {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                match RewardHistory::from_json(text) {
                    Ok(h) => {
                        // What loads must serialize and load again, identically.
                        let back = RewardHistory::from_json(&h.to_json().unwrap()).unwrap();
                        assert_eq!(back, h);
                    }
                    Err(
                        Error::Json(_)
                        | Error::InvalidHistory(_)
                        | Error::UnsupportedVersion { .. },
                    ) => {}
                    Err(e) => panic!("unexpected history error: {e}"),
                }
            }
        }
        1 | 2 => {
            let mut map = base().clone();
            map.insert(name.to_owned(), rest.to_vec());
            if mode == 1 && name != files::MANIFEST {
                resign(&mut map, name);
            }
            try_resume(&map);
        }
        _ => {
            let mut map = base().clone();
            if let Some(file) = map.get_mut(name) {
                for t in rest.chunks_exact(3) {
                    if file.is_empty() {
                        break;
                    }
                    let off = u16::from_le_bytes([t[0], t[1]]) as usize % file.len();
                    file[off] = t[2];
                }
            }
            if name != files::MANIFEST {
                resign(&mut map, name);
            }
            try_resume(&map);
        }
    }
});
