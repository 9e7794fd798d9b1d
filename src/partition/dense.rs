//! `Dense`: attends every page — the baseline through the same API and kernels.

use super::{SelectInput, Selection, SparseAlgorithm};
use crate::{CacheConfig, Result};

/// Full attention over all pages.
#[derive(Debug, Clone, Default)]
pub struct Dense;

impl Dense {
    /// The dense baseline.
    pub fn new() -> Self {
        Self
    }
}

impl SparseAlgorithm for Dense {
    fn name(&self) -> String {
        "dense".into()
    }

    fn init(&mut self, _cfg: &CacheConfig) -> Result<()> {
        Ok(())
    }

    fn select(&mut self, _input: &SelectInput<'_>) -> Result<Selection> {
        Ok(Selection::All)
    }

    fn device_only_decode(&self) -> bool {
        true
    }
}
