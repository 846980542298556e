//! flowcap-loadgen
