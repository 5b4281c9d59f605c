//! Tensors to and from the bytes of a checkpoint's `.safetensors` files, through candle's own
//! safetensors support: candle's `Tensor` implements `safetensors::View`, so
//! `safetensors::serialize` writes it, and [`candle_core::safetensors::Load`] turns a view of
//! a parsed file back into a tensor. This module adds the checkpoint's rules on top:
//!
//! - only the nine dtypes of format version 1 are stored ([`STORED`]); candle knows more
//!   (`F8E4M3`, the MX types) and safetensors more still (`U16`, `BOOL`, …), and both sides
//!   refuse them, so that every build that reads version 1 reads every version-1 file;
//! - a file holds exactly the tensors expected, by name (`var.00000`, `var.00001`, … for
//!   weights; the names `optimizer.json` lists for the optimizer state);
//! - every failure is an [`Error::Checkpoint`](crate::Error::Checkpoint) naming the file.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::SafeTensors;

use super::problem;
use crate::error::CheckpointProblem;
use crate::Result;

/// The dtypes a checkpoint stores.
pub(super) const STORED: [DType; 9] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::U8,
    DType::U32,
    DType::I16,
    DType::I32,
    DType::I64,
];

/// The names of `n` vars in a weights file: `var.00000`, `var.00001`, …
pub(super) fn var_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("var.{i:05}")).collect()
}

/// Encodes `named` tensors as a safetensors file meant for `path` (named in errors).
///
/// Tensors on another device are copied to the host first: candle's `View::data` makes that
/// copy itself but cannot report a failure, so it is done here, where it can.
///
/// # Errors
/// [`CheckpointProblem::UnsupportedDType`] for a dtype outside [`STORED`],
/// [`CheckpointProblem::Safetensors`] if the encoder fails, [`Error::Candle`](crate::Error::Candle)
/// if a device copy does.
pub(super) fn encode<'a>(
    named: impl IntoIterator<Item = (String, &'a Tensor)>,
    path: &Path,
) -> Result<Vec<u8>> {
    let mut host = Vec::new();
    for (name, t) in named {
        if !STORED.contains(&t.dtype()) {
            return Err(problem(
                path,
                CheckpointProblem::UnsupportedDType {
                    tensor: name,
                    dtype: t.dtype(),
                },
            ));
        }
        host.push((name, t.to_device(&Device::Cpu)?));
    }
    safetensors::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| problem(path, CheckpointProblem::Safetensors(e)))
}

/// Encodes vars as a weights file: the `i`-th tensor is named `var.{i:05}`.
pub(super) fn encode_vars<'a>(
    vars: impl ExactSizeIterator<Item = &'a Tensor>,
    path: &Path,
) -> Result<Vec<u8>> {
    encode(var_names(vars.len()).into_iter().zip(vars), path)
}

/// Decodes a weights file: its tensors must be named `var.00000 .. var.{n-1}`; they come
/// back in that order.
pub(super) fn decode_vars(bytes: &[u8], path: &Path, device: &Device) -> Result<Vec<Tensor>> {
    let file = parse(bytes, path)?;
    let want = var_names(file.len());
    // Sorted, so that the first stranger reported does not depend on hashing.
    let have: BTreeSet<&str> = file.names().into_iter().collect();
    if let Some(bad) = have.iter().find(|n| !want.iter().any(|w| w == *n)) {
        return Err(malformed(
            path,
            format!(
                "unexpected tensor `{bad}` (expected var.00000 .. var.{:05})",
                want.len().saturating_sub(1)
            ),
        ));
    }
    load_all(&file, &want, path, device)
}

/// Decodes exactly the tensors `names` (in that order) from a safetensors file; any other
/// tensor in the file is an error.
pub(super) fn decode(
    bytes: &[u8],
    names: &[String],
    path: &Path,
    device: &Device,
) -> Result<Vec<Tensor>> {
    let file = parse(bytes, path)?;
    if file.len() != names.len() {
        return Err(malformed(
            path,
            format!("holds {} tensors, expected {}", file.len(), names.len()),
        ));
    }
    load_all(&file, names, path, device)
}

fn malformed(path: &Path, m: String) -> crate::Error {
    problem(path, CheckpointProblem::Malformed(m))
}

/// Parses the header (and checks that every tensor's bytes lie inside the file).
fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| malformed(path, e.to_string()))
}

fn load_all(
    file: &SafeTensors<'_>,
    names: &[String],
    path: &Path,
    device: &Device,
) -> Result<Vec<Tensor>> {
    names
        .iter()
        .map(|name| {
            let view = file
                .tensor(name)
                .map_err(|_| malformed(path, format!("no tensor `{name}`")))?;
            // Checked before `load`, which would widen a U16 tensor to U32.
            let stored = DType::try_from(view.dtype()).is_ok_and(|d| STORED.contains(&d));
            if !stored {
                return Err(malformed(
                    path,
                    format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
                ));
            }
            view.load(device)
                .map_err(|e| malformed(path, format!("tensor `{name}`: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use safetensors::tensor::{Dtype, TensorView};

    fn problem_of(r: Result<impl std::fmt::Debug>) -> CheckpointProblem {
        match r {
            Err(Error::Checkpoint { problem, .. }) => problem,
            other => panic!("expected a checkpoint error, got {other:?}"),
        }
    }

    #[test]
    fn every_stored_dtype_round_trips_bit_for_bit() {
        let dev = Device::Cpu;
        let base = Tensor::new(&[0.0f64, 1.0, -2.5, 7.0, 0.5, 3.0], &dev).unwrap();
        let ts: Vec<Tensor> = STORED
            .iter()
            .map(|d| base.abs().unwrap().to_dtype(*d).unwrap())
            .collect();
        let bytes = encode_vars(ts.iter(), Path::new("m")).unwrap();
        let back = decode_vars(&bytes, Path::new("m"), &dev).unwrap();
        for (a, b) in ts.iter().zip(&back) {
            assert_eq!(a.dtype(), b.dtype());
            assert_eq!(a.dims(), b.dims());
            let bits = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(bits(a), bits(b), "{:?}", a.dtype());
        }
    }

    #[test]
    fn an_unstored_dtype_is_refused_when_writing() {
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let p = problem_of(encode([("var.00000".to_owned(), &t)], Path::new("m")));
        assert!(
            matches!(&p, CheckpointProblem::UnsupportedDType { tensor, dtype: DType::F8E4M3 } if tensor == "var.00000"),
            "{p}"
        );
    }

    #[test]
    fn an_unstored_dtype_is_refused_when_reading() {
        // A U16 tensor: candle would load it as U32; the checkpoint format does not hold it.
        let data = [1u8, 0, 2, 0];
        let view = TensorView::new(Dtype::U16, vec![2], &data).unwrap();
        let bytes = safetensors::serialize([("var.00000", view)], None).unwrap();
        let p = problem_of(decode_vars(&bytes, Path::new("m"), &Device::Cpu));
        assert!(
            matches!(&p, CheckpointProblem::Malformed(m) if m.contains("unsupported dtype U16")),
            "{p}"
        );
    }
}
