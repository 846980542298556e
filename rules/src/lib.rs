//! # flowcap-rules
//!
//! Automation rules (SPEC section 6): matching, crossing detection, reminder
//! windows, payload templates and notification delivery.
//!
//! Not built yet: issue #6. The rule *registry* (upsert, enable, disable,
//! remove, and the references it validates) already lives in the engine's
//! command handling, so rule definitions are journaled and snapshotted from
//! the start; firing and delivery will live here.
