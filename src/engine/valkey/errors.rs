//! Fred client errors mapped to the engine's error kinds.

use crate::error::EngineError;

/// Maps a client error to the engine's two kinds: the storage could not be
/// reached (retry later) or answered nonsense (a bug).
pub(super) fn err(e: fred::error::Error) -> EngineError {
    use fred::error::ErrorKind as K;
    let transient = match e.kind() {
        K::IO | K::Timeout | K::Canceled | K::Routing | K::Cluster | K::Sentinel | K::Backpressure | K::Replica => true,
        K::Tls | K::Auth => true,
        _ => {
            let d = e.details();
            ["OOM", "LOADING", "MASTERDOWN", "READONLY", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS"]
                .iter()
                .any(|p| d.contains(p))
        }
    };
    if transient { EngineError::Unavailable(e.to_string()) } else { EngineError::Internal(e.to_string()) }
}
