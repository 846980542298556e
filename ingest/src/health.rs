//! Readiness, shared between a pipeline and the HTTP server.
//!
//! A pipeline knows when it can do its job (restored, connected, holding
//! its partitions or its lease); the server in the binary only reports it.
//! [`Health`] is the one piece of state they share: the pipeline flips it,
//! `/readyz` reads it. It lives here, not in the binary, so every pipeline
//! (embedded, Kafka) can flip it without depending on HTTP.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

/// Whether the process is ready to do its job, and why not. Share it as
/// `Arc<Health>`.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    /// Why not ready (empty when ready). The flag is written under this
    /// lock too, so [`Health::status`] sees a flag and reason that agree.
    reason: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

impl Health {
    /// Not ready, reason "starting".
    pub fn new() -> Health {
        Health {
            ready: AtomicBool::new(false),
            reason: Mutex::new("starting".to_owned()),
        }
    }

    /// Ready: the pipeline is processing.
    pub fn set_ready(&self) {
        let mut reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        reason.clear();
        self.ready.store(true, Ordering::Release);
    }

    /// Not ready, because of `reason` (a short sentence for operators, e.g.
    /// "standing by: another instance holds the lease").
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let mut guard = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        *guard = reason.into();
        self.ready.store(false, Ordering::Release);
    }

    /// Whether ready (lock-free).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// `Ok(())` when ready, else the reason.
    pub fn status(&self) -> Result<(), String> {
        let reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(reason.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_not_ready_and_flips_both_ways() {
        let health = Health::new();
        assert_eq!(health.status(), Err("starting".to_owned()));
        assert!(!health.is_ready());
        health.set_ready();
        assert_eq!(health.status(), Ok(()));
        assert!(health.is_ready());
        health.set_not_ready("standing by: another instance holds the lease");
        assert_eq!(
            health.status(),
            Err("standing by: another instance holds the lease".to_owned())
        );
    }
}
