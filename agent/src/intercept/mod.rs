//! (being written by the eBPF/intercept work)
