//! The crate's error type: every fallible public function returns [`Result`].
//!
//! Back-pressure (a full tier, an exhausted budget) is a distinct variant so callers can
//! match on it and retry after freeing sequences, instead of parsing a message.

use std::fmt;

/// Which memory tier ran out of page slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The fast tier (GPU HBM on CUDA; a bounded slot pool in RAM on the CPU).
    Fast,
    /// The capacity tier (pinned host memory on CUDA; RAM on the CPU), home of every page.
    Host,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Fast => write!(f, "fast (HBM) tier"),
            Tier::Host => write!(f, "host tier"),
        }
    }
}

/// Errors returned by spinkv.
#[derive(Debug)]
pub enum Error {
    /// Bad input to an op or a cache call: the message names the op and the shapes.
    Invalid {
        /// The op or method that rejected the input, e.g. `"sparse_paged_attention"`.
        op: &'static str,
        /// What was wrong, with the shapes involved.
        msg: String,
    },
    /// Back-pressure: a tier has too few free page slots for the request. Nothing was
    /// changed; free sequences (or wait for them to finish) and retry.
    PoolExhausted {
        /// The tier that is full.
        tier: Tier,
        /// Page slots the request needed.
        needed: usize,
        /// Page slots that were free.
        free: usize,
    },
    /// A sequence id that was never added or was already removed.
    UnknownSequence(u64),
    /// A cache method called out of order (e.g. `attend` outside a step).
    StepMisuse {
        /// The method called.
        op: &'static str,
        /// Why the call is out of order.
        msg: String,
    },
    /// A bad configuration, rejected at construction.
    Config(String),
    /// Model loading, tokenization or fetching failed.
    Model(String),
    /// An error from candle (device, dtype or kernel failure).
    Candle(candle_core::Error),
    /// Allocating a cache's storage failed (on CUDA usually out of device memory, or of
    /// the pinned host memory the driver grants): `what` names the part and its size.
    /// Nothing was built; a smaller [`CacheConfig`](crate::CacheConfig) (fewer
    /// sequences or tokens) or another split between HBM and host
    /// ([`CacheConfig::with_fast_homes`](crate::CacheConfig::with_fast_homes)) may fit.
    Alloc {
        /// The constructor that allocated, e.g. `"SpinCache::new"`.
        op: &'static str,
        /// The part being allocated, with its size.
        what: String,
        /// The device's error (boxed: it keeps `Error` small).
        source: Box<candle_core::Error>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { op, msg } => write!(f, "{op}: {msg}"),
            Error::PoolExhausted { tier, needed, free } => write!(
                f,
                "{tier} exhausted: the request needs {needed} page slots but only {free} are free \
                 (back-pressure: remove or finish sequences, then retry)"
            ),
            Error::UnknownSequence(id) => {
                write!(f, "unknown sequence {id}: never added or already removed")
            }
            Error::StepMisuse { op, msg } => write!(f, "{op}: {msg}"),
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Model(msg) => write!(f, "model: {msg}"),
            Error::Candle(e) => write!(f, "candle: {e}"),
            Error::Alloc { op, what, source } => write!(
                f,
                "{op}: allocating {what} failed: {source} (a smaller CacheConfig, with fewer \
                 sequences or tokens, or another split between HBM and host memory \
                 (CacheConfig::with_fast_homes) may fit)"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Candle(e) => Some(e),
            Error::Alloc { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Model(format!("i/o error: {e}"))
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Returns `Err(Error::Invalid { op, msg })` from the enclosing function.
#[macro_export]
#[doc(hidden)]
macro_rules! invalid {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::Error::Invalid { op: $op, msg: format!($($arg)*) })
    };
}
