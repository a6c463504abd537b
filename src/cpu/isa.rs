//! Instruction-set tokens: proof, checked at run time, that the CPU has an instruction set.
//!
//! A kernel written with `#[target_feature]` intrinsics is `unsafe` to call: on a CPU without
//! those instructions it is undefined behaviour. Every such kernel in [`crate::cpu`] takes a
//! token by value, and a token has a private field, so the only way to get one is
//! [`Avx2::detect`] / [`Avx2Fma::detect`], which ask the CPU (as `matrixmultiply` and `pulp`
//! do). Safe code therefore cannot run a kernel the CPU lacks. There is one token per real
//! requirement: the integer screen needs AVX2 alone (or AVX-512 VNNI for its faster form),
//! the f32 kernels AVX2 and FMA, the conv products' wider f32 tile AVX-512 F.
//!
//! `MSAD_CPU_ISA` caps what detection reports, for the whole process (read once):
//!
//! | value | msad's own kernels |
//! |---|---|
//! | unset, `native` | the best the CPU has |
//! | `avx512-vnni`, `avx512`, `avx2-fma`, `avx2` | at most that set |
//! | `portable` | the plain-Rust reference kernels only, even where the CPU has more |
//!
//! `portable` is how the test-suite runs the engines on the reference kernels end to end (see
//! `.ci/run`); the products that go through [`super::kernels::sgemm`] stay on the `gemm`
//! crate's (or OpenBLAS's) own dispatch. An unknown value counts as unset, with a warning.

use std::fmt;
use std::sync::OnceLock;

/// The instruction sets msad's kernels are written for, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Level {
    /// Plain Rust: any CPU.
    Portable,
    /// x86-64 AVX2 (256-bit integer and float vectors), without FMA.
    Avx2,
    /// x86-64 AVX2 and FMA.
    Avx2Fma,
    /// x86-64 AVX-512 F and VL (32 registers of 16 floats), with AVX2 and FMA: Intel since
    /// Skylake-SP, AMD since Zen 4.
    Avx512,
    /// x86-64 AVX-512 F and VL with VNNI (the integer dot products `vpdpwssd`), which the
    /// CPUs that have them (Intel since Cascade Lake and Ice Lake, AMD since Zen 4) pair with
    /// AVX2 and FMA.
    Avx512Vnni,
}

impl Level {
    /// The level msad's kernels run at in this process: what the CPU has, capped by
    /// `MSAD_CPU_ISA`. Detected once.
    pub(crate) fn current() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let cap = std::env::var("MSAD_CPU_ISA").ok();
            Level::detected().min(Level::parse_cap(cap.as_deref()))
        })
    }

    /// What the CPU has.
    fn detected() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                if has!("avx512f") && has!("avx512vl") {
                    if has!("avx512vnni") {
                        return Level::Avx512Vnni;
                    }
                    return Level::Avx512;
                }
                return Level::Avx2Fma;
            }
            if has!("avx2") {
                return Level::Avx2;
            }
        }
        Level::Portable
    }

    /// The cap a value of `MSAD_CPU_ISA` sets (no cap where unset or unknown).
    fn parse_cap(value: Option<&str>) -> Level {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "native") => Level::Avx512Vnni,
            Some("avx512-vnni" | "avx512vnni") => Level::Avx512Vnni,
            Some("avx512") => Level::Avx512,
            Some("avx2-fma" | "avx2+fma" | "avx2fma") => Level::Avx2Fma,
            Some("avx2") => Level::Avx2,
            Some("portable") => Level::Portable,
            Some(other) => {
                log::warn!(
                    "MSAD_CPU_ISA={other} is not one of native, avx512-vnni, avx512, avx2-fma, avx2, \
                     portable; ignored"
                );
                Level::Avx512Vnni
            }
        }
    }

    /// Whether `MSAD_CPU_ISA=portable` asked for the reference kernels.
    pub(crate) fn portable_requested() -> bool {
        Level::current() == Level::Portable && Level::detected() > Level::Portable
    }

    /// The name the docs and test output use (`portable`, `avx2`, `avx2+fma`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx2Fma => "avx2+fma",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "avx512-vnni",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A token type: proof of an instruction set, made only by [`Token::detect`].
pub(crate) trait Token: Copy {
    /// The token, where the CPU has the instruction set (and `MSAD_CPU_ISA` allows it); for a
    /// choice of several, the best one.
    fn detect() -> Option<Self>;

    /// Every token this CPU allows (for a choice of several, each one it has), for tests.
    #[cfg(test)]
    fn all_detected() -> Vec<Self> {
        Self::detect().into_iter().collect()
    }

    /// The instruction set the token proves.
    #[cfg(test)]
    fn level(self) -> Level;
}

/// Which of a kernel's two implementations runs: the intrinsics the token `T` allows, or the
/// plain-Rust reference they are tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel<T> {
    /// The intrinsics; the token proves the CPU has them.
    Fast(T),
    /// Plain Rust.
    Portable,
}

impl<T: Token> Kernel<T> {
    /// The kernel the engines run: the fast one where the CPU has its instruction set; the
    /// portable one where `MSAD_CPU_ISA=portable` asks for it; otherwise `None`, and the
    /// callers take their general path (faster there than the portable kernel).
    pub(crate) fn select() -> Option<Self> {
        match T::detect() {
            Some(token) => Some(Self::Fast(token)),
            None => Level::portable_requested().then_some(Self::Portable),
        }
    }

    /// Every kernel this CPU runs, the portable one first: what the tests compare.
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Self> {
        let mut all = vec![Self::Portable];
        all.extend(T::all_detected().into_iter().map(Self::Fast));
        all
    }

    /// The instruction set it runs on.
    #[cfg(test)]
    pub(crate) fn level(self) -> Level {
        match self {
            Self::Fast(token) => token.level(),
            Self::Portable => Level::Portable,
        }
    }
}

/// Says on the test process's stderr (past the harness's capture) which instruction sets a
/// kernel test ran, so that the test output names them.
#[cfg(test)]
pub(crate) fn report_tested<T: Token>(kernel: &str, kernels: &[Kernel<T>]) {
    use std::io::Write;
    let names: Vec<&str> = kernels.iter().map(|k| k.level().name()).collect();
    let _ = writeln!(
        std::io::stderr(),
        "{kernel}: tested on {}",
        names.join(", ")
    );
}

/// A token type for the instruction set `$level`: a private field, so that only its
/// [`Token::detect`] makes one.
macro_rules! token {
    ($(#[$doc:meta])* $name:ident, $level:expr) => {
        $(#[$doc])*
        ///
        /// Only its [`Token::detect`] makes one.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) struct $name {
            _private: (),
        }

        impl Token for $name {
            fn detect() -> Option<Self> {
                (Level::current() >= $level).then_some(Self { _private: () })
            }

            #[cfg(test)]
            fn level(self) -> Level {
                $level
            }
        }
    };
}

token!(
    /// Proof that this CPU has AVX2 (and that `MSAD_CPU_ISA` allows it).
    Avx2,
    Level::Avx2
);

token!(
    /// Proof that this CPU has AVX2 and FMA (and that `MSAD_CPU_ISA` allows them).
    Avx2Fma,
    Level::Avx2Fma
);

token!(
    /// Proof that this CPU has AVX-512 F and VL, with AVX2 and FMA (and that `MSAD_CPU_ISA`
    /// allows them).
    Avx512,
    Level::Avx512
);

token!(
    /// Proof that this CPU has AVX-512 F, VL and VNNI, with AVX2 and FMA (and that
    /// `MSAD_CPU_ISA` allows them).
    Avx512Vnni,
    Level::Avx512Vnni
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_only_lowers_the_level() {
        assert_eq!(Level::parse_cap(None), Level::Avx512Vnni);
        assert_eq!(Level::parse_cap(Some("avx2-fma")), Level::Avx2Fma);
        assert_eq!(Level::parse_cap(Some(" Portable ")), Level::Portable);
        assert_eq!(Level::parse_cap(Some("avx2")), Level::Avx2);
        assert_eq!(Level::parse_cap(Some("avx512")), Level::Avx512);
        assert_eq!(Level::parse_cap(Some("sse9")), Level::Avx512Vnni);
        assert!(Level::current() <= Level::detected());
    }

    #[test]
    fn tokens_exist_exactly_where_the_level_allows() {
        let level = Level::current();
        assert_eq!(Avx2::detect().is_some(), level >= Level::Avx2);
        assert_eq!(Avx2Fma::detect().is_some(), level >= Level::Avx2Fma);
        assert_eq!(Avx512::detect().is_some(), level >= Level::Avx512);
        assert_eq!(Avx512Vnni::detect().is_some(), level >= Level::Avx512Vnni);
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "instruction sets: detected {}, in use {level}",
            Level::detected()
        );
    }
}
