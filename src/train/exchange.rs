//! Summing across processes when XLA cannot: the CPU plugin's collectives
//! stay inside one process, so a job of several CPU worker processes sums
//! gradients on the host between the two halves of the step
//! ([`gradient_step`](super::program::gradient_step) and
//! [`update_step`](super::program::update_step)). On TPU and GPU the replicas of
//! one compiled step span every process and XLA moves the gradients.

use anyhow::Result;

/// An element-wise sum over every process of a job. Every process calls
/// [`sum`](Self::sum) the same number of times with vectors of the same
/// length; each gets the same result, bit for bit.
pub trait CrossProcessSum: Send {
    /// How many processes take part.
    fn processes(&self) -> usize;
    /// Replaces `values` by their sum over the processes.
    fn sum(&mut self, values: &mut [f32]) -> Result<()>;
}
