//! Errors raised while tracing, differentiating, emitting or running a graph.

/// A mistake caught at trace time (shapes, dtypes, misuse of the tracer), or
/// a runtime failure passed through from PJRT.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// An op rejected its operands; `op` is the op's name (e.g. `dot_general`).
    #[error("{op}: {msg}")]
    Op { op: &'static str, msg: String },
    /// The tracer was used the wrong way (tensor from another graph, a
    /// parameter declared inside a loop body, ...).
    #[error("{0}")]
    Usage(String),
    /// Compilation or execution failed inside the PJRT plugin.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
}

pub type Result<T> = std::result::Result<T, GraphError>;

/// Shorthand for an op's shape/dtype error.
pub(crate) fn op_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(GraphError::Op {
        op,
        msg: msg.into(),
    })
}

pub(crate) fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(GraphError::Usage(msg.into()))
}
