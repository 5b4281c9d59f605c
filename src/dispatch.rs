//! Run-time selection of vector instructions: a function compiled three times — for
//! AVX-512, AVX2+FMA and the baseline target — and picked at run time, so one binary uses
//! the widest vectors the CPU has and still runs everywhere. Used by the fused kernels
//! (`ops`, cargo feature `lm`) and the fused advantage pass (core).
//!
//! Rust never contracts `a * b + c` into an FMA on its own, so a body that does not call
//! `mul_add` gives the same bits in all three compilations.

/// Defines `fn name(args) -> ret` from a generic body plus AVX-512 and AVX2 clones, chosen at
/// run time.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn generic($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

#[allow(unused_imports)]
pub(crate) use multiversion;
