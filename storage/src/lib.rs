//! flowcap-storage
