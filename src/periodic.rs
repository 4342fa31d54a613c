//! The housekeeping jobs of `serve` (retention, billing close, quota expiry, alert publishing)
//! share one shape: a pass on a fixed period until shutdown.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `pass` every `period` until `shutdown` fires, the first time `first_after` from now. A
/// pass handles its own failures (log, retry at the next tick): housekeeping is never a reason
/// to stop serving. Shutdown is noticed between passes, so a pass is never cut in half.
pub async fn every<Pass: Future<Output = ()>>(
    period: Duration,
    first_after: Duration,
    shutdown: CancellationToken,
    mut pass: impl FnMut() -> Pass,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + first_after, period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        pass().await;
    }
}
