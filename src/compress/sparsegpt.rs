//! SparseGPT and magnitude pruning. Being written.
