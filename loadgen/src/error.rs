//! Errors of the workload generator.

/// What can go wrong building a workload.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A configuration field is out of range or inconsistent with another.
    #[error("invalid workload config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is not valid JSON or has unknown fields.
    #[error("workload config is not valid JSON: {0}")]
    ConfigJson(#[from] serde_json::Error),
    /// A distribution could not be built from the configuration.
    #[error("invalid distribution parameter: {0}")]
    Distribution(String),
}
