//! flowcap-ingest
